"""What every task of a ringctl job runs (submitit pickles `run_job` and calls it per task).

    torch.distributed from submitit's environment (gloo on CPU, NCCL on CUDA, timeout=)
    -> node names all_gathered (SLURMD_NODENAME under SLURM, else the hostname)
    -> Topology.discover -> make_plan (identical on every rank)
    -> the workload -> results.json in the job folder, W&B from rank 0.

The config arrives as a plain dict (resolved on the submitting side), so the job never
re-runs Hydra and never depends on the submitting machine's working directory.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import pickle_load

RESULTS_NAME = "results.json"


def node_name() -> str:
    """Where this rank really runs. Under SLURM the node's name (the dev cluster's nodes
    all share the host's hostname), elsewhere the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def link_kwargs(topology_cfg: Any) -> dict[str, Any]:
    """The Topology fields that discovery cannot see (link classes, NICs, FLOP rate, memory)."""
    from ringctl.topology import Topology

    base = Topology.from_config(topology_cfg)
    return {
        "intra": base.intra, "inter": base.inter,
        "nics_per_node": base.nics_per_node, "compute_tflops": base.compute_tflops,
        "step_overhead_us": base.step_overhead_us, "memory_bandwidth_GBps": base.memory_bandwidth_GBps,
        "memory_per_rank_GB": base.memory_per_rank_GB,
    }


def discover(topology_cfg: Any, names: list[str], virtual_node_size: int | None) -> Any:
    """Topology of this run: the config's link classes, the ranks' real placement."""
    from ringctl.topology import Topology

    return Topology.discover(names, virtual_node_size=virtual_node_size, **link_kwargs(topology_cfg))


def planned_topology(cfg: Any, res: Any) -> Any:
    """The topology the job will discover, predicted before submission (for validation):
    SLURM places ranks block-wise or cyclically over nodes; locally, virtual nodes."""
    world = res.world_size
    if res.virtual_node_size is not None:
        names = ["localhost"] * world
    elif cfg.topology.get("distribution") == "cyclic":
        names = [f"node{r % res.nodes}" for r in range(world)]
    else:
        names = [f"node{r // res.ranks_per_node}" for r in range(world)]
    return discover(cfg.topology, names, res.virtual_node_size)


@dataclass
class RunContext:
    """What a workload gets on every rank (also what a custom entry point receives)."""

    cfg: Any  # the whole job config (OmegaConf, attribute access)
    rank: int
    world_size: int
    local_rank: int
    device: Any  # torch.device
    group: Any  # the torch.distributed process group of the ring
    plan: Any  # RingPlan
    topology: Any
    node_names: list[str]
    folder: Path  # the job folder
    metrics: Any  # ringctl.metrics.Metrics (no-op on ranks other than 0)
    ring_attention: Callable[..., Any] = field(repr=False, default=None)  # type: ignore[assignment]
    # CPU threads: {"per_rank": [torch threads of each rank], "source": the setting that chose them}
    threads: dict[str, Any] = field(default_factory=dict)
    attempt: int = 0  # 0, then 1, 2, ... after each requeue (same job, same folder)
    # what the workload has measured so far (losses ...): kept in results.json if the job fails
    progress: dict[str, Any] = field(default_factory=dict)

    @property
    def position(self) -> int:
        """This rank's position on the ring (which shard it holds)."""
        return self.plan.position(self.rank)

    def stop_at_step_ends(self) -> None:
        """The workload checks `stop_requested()` at every step end: SIGTERM and the
        warning signal then wait for the step end instead of interrupting the rank."""
        _STOP.cooperative = True

    def stop_requested(self) -> list[int] | None:
        """Collective (every rank at the same step end): what each rank received
        (STOP_TERM, STOP_WARN or 0), or None when no rank received a stop signal."""
        codes = stop_codes(self)
        return codes if any(codes) else None

    def stop(self, step: int, checkpoint: str | None) -> None:
        """Collective, after a stop was requested and a checkpoint of `step` saved: look
        once more (a job-wide signal reaches every rank within moments), then raise
        StopJob on every rank; run_job requeues, ends quietly, or fails naming the rank."""
        time.sleep(0.5)
        raise StopJob(stop_codes(self), step, checkpoint)


#: --cpus-per-task of a GPU rank when launcher.cpus_per_task is null: its host work (kernel
#: launches, NCCL's proxy thread, data loading, CPU ops) wants a few cores, and nodes carry at
#: least 8 cores per GPU (a DGX H100: 112 for 8). CPU-only ranks (the dev cluster, whose nodes
#: may declare more CPUs than the host has) ask for 1.
GPU_RANK_CPUS = 8


def cpus_per_task(launcher_cfg: Any, gpus_per_node: int) -> int:
    """CPUs one rank owns: `launcher.cpus_per_task`, or by default GPU_RANK_CPUS for GPU
    ranks and 1 for CPU-only ranks."""
    from ringctl.errors import check_positive_int

    value = launcher_cfg.get("cpus_per_task")
    if value is None:
        return GPU_RANK_CPUS if gpus_per_node > 0 else 1
    return check_positive_int("launcher.cpus_per_task", value)


@dataclass(frozen=True)
class Threads:
    """The intra-op thread count of this rank and the setting it came from."""

    count: int
    source: str  # OMP_NUM_THREADS | SLURM_CPUS_PER_TASK | launcher.cpus_per_task | cores/local_ranks


def choose_threads(config: dict[str, Any], environ: Any = os.environ) -> Threads:
    """Threads for one rank from the cores it owns, so ranks sharing a machine do not each
    start one thread per core (4 ranks x 2 threads on 2 cores ran 5x slower than 1 each).

    A user's OMP_NUM_THREADS wins; under SLURM, SLURM_CPUS_PER_TASK; on the local launcher,
    launcher.cpus_per_task if set, else the usable cores (sched_getaffinity) divided by the
    ranks on this machine (all of them, locally), at least 1."""
    user = environ.get("OMP_NUM_THREADS", "").strip()
    if user:
        first = user.split(",")[0]  # OpenMP also accepts a nested list "4,2"
        if not first.isdigit() or int(first) < 1:
            raise ValueError(f"OMP_NUM_THREADS={user!r} is invalid; allowed: an integer >= 1")
        return Threads(int(first), "OMP_NUM_THREADS")
    res = config.get("resources") or {}
    launcher = config.get("launcher") or {}
    if res.get("kind") == "slurm" and environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return Threads(max(1, int(environ["SLURM_CPUS_PER_TASK"])), "SLURM_CPUS_PER_TASK")
    if res.get("kind") != "slurm" and launcher.get("cpus_per_task") is not None:
        return Threads(cpus_per_task(launcher, 0), "launcher.cpus_per_task")
    if res.get("kind") == "slurm":
        local_ranks = int(res.get("ranks_per_node") or 1)
    else:  # every rank of every (virtual) node runs on this machine
        local_ranks = int(res.get("nodes") or 1) * int(res.get("ranks_per_node") or 1)
    return Threads(max(1, len(os.sched_getaffinity(0)) // local_ranks), "cores/local_ranks")


def set_threads(config: dict[str, Any]) -> Threads:
    """Apply `choose_threads`: OMP_NUM_THREADS for what this process starts (and for OpenMP,
    when torch is not imported yet: call this first) and torch.set_num_threads."""
    threads = choose_threads(config)
    os.environ["OMP_NUM_THREADS"] = str(threads.count)
    import torch

    torch.set_num_threads(threads.count)
    return threads


def _init_distributed(cfg: Any, folder: Path, attempt: int) -> tuple[Any, Any]:
    """init_process_group from submitit's job environment (submitit's
    TorchDistributedEnvironment: MASTER_ADDR = first node), on a port known free (see
    `_rendezvous_port`); returns (device, env)."""
    import submitit
    import torch
    import torch.distributed as dist

    from ringctl.local_controller import PORT_ENV

    dist_env = submitit.helpers.TorchDistributedEnvironment()
    timeout_s = int(cfg.launcher.get("init_timeout_s", 120))
    if os.environ.get(PORT_ENV):  # a local attempt: the port its controller found free
        dist_env.master_port = int(os.environ[PORT_ENV])
    elif os.environ.get("SLURM_JOB_ID"):
        dist_env.master_port = _rendezvous_port(folder, dist_env.rank, attempt, timeout_s)
    env = dist_env.export(set_cuda_visible_devices=False)
    use_cuda = torch.cuda.is_available() and int(cfg.resources.gpus_per_node) > 0
    if use_cuda:
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    _bind_gloo_nic(env.local_rank)
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s),
    )
    return device, env


def _rendezvous_port(folder: Path, rank: int, attempt: int, timeout_s: float) -> int:
    """The TCPStore port of a SLURM job attempt. submitit draws it from the job id in
    20000-60000, which overlaps the kernel's ephemeral range, so any connection on the
    first node (another job's gloo, for one) can hold it and fail rank 0 with EADDRINUSE.
    Instead rank 0 (on the first node, MASTER_ADDR) takes a port the kernel reports free and
    publishes it in the job folder (shared by every node, as submitit requires); the other
    ranks wait for it there."""
    from ringctl.local_controller import free_port

    step = os.environ.get("SLURM_STEP_ID", "0")
    path = folder / f"{os.environ['SLURM_JOB_ID']}_rendezvous_{attempt}_{step}.port"
    if rank == 0:
        port = free_port()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(path)  # atomic: a reader sees the whole port or no file
        return port
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = path.read_text().strip()
            if text.isdigit():
                return int(text)
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"rank {rank}: rank 0 published no rendezvous port in {path} within "
                f"launcher.init_timeout_s={timeout_s:g} s (is the job folder shared by every node, "
                "and did rank 0 start?)"
            )
        time.sleep(0.05)


def _bind_gloo_nic(local_rank: int) -> None:
    """On a fabric with one NIC per rank (slurm/dev-cluster --fabric ...,nics=L), the node
    lists its NIC names in RINGCTL_NICS (comma-separated); rank l binds gloo to NIC l mod n."""
    nics = [n for n in os.environ.get("RINGCTL_NICS", "").split(",") if n]
    if nics and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = nics[local_rank % len(nics)]


def _job_folder() -> Path:
    try:
        return Path(str(submitit.JobEnvironment().paths.folder))
    except RuntimeError:  # called outside submitit (tests, a plain torchrun)
        return Path(os.environ.get("RINGCTL_JOB_FOLDER", ".")).resolve()


# ---- stopping: signals, agreed stops at step boundaries, requeue ------------------------


class Terminated(BaseException):
    """SIGTERM/SIGINT reached a rank whose workload cannot stop at a step boundary.
    A BaseException, so user code's `except Exception` does not swallow it."""

    def __init__(self, signum: int) -> None:
        from ringctl.health import signal_name

        super().__init__(f"received {signal_name(signum)}")
        self.signum = signum


class _Recorded(RuntimeError):
    """A failure already recorded (results.json, the rank's record) by the stop path."""


class StopJob(BaseException):
    """Raised on every rank at the same step boundary once the ranks agreed to stop:
    `codes[r]` says what rank r received (STOP_TERM, STOP_WARN or 0)."""

    def __init__(self, codes: list[int], step: int, checkpoint: str | None) -> None:
        super().__init__(f"stop agreed at step {step}: {codes}")
        self.codes, self.step, self.checkpoint = codes, step, checkpoint


STOP_TERM = 1  # SIGTERM / SIGINT: scancel, requeue, preemption, ringctl cancel, or a stray kill
STOP_WARN = 2  # the warning signal (--signal, submitit's USR2) before a time limit or preemption


@dataclass
class _StopState:
    received: dict[int, float] = field(default_factory=dict)  # signum -> when
    cooperative: bool = False  # the workload checks `RunContext.stop_requested` at step ends
    exiting: bool = False  # stopping already (requeued, cancelled): later signals change nothing


_STOP = _StopState()


def _warn_signal() -> int:
    return int(submitit.JobEnvironment._usr_sig())


def _on_signal(signum: int, frame: Any) -> None:
    """SIGTERM/SIGINT/SIGUSR2 (replacing submitit's handlers, which ignore SIGTERM and
    requeue from rank 0 alone mid-step): a cooperative workload stops at its next step
    boundary with every rank agreeing; any other stops now (SIGTERM) or runs on (warning)."""
    if _STOP.exiting:
        return
    _STOP.received.setdefault(signum, time.time())
    print(f"ringctl: rank received signal {signum} at {time.strftime('%H:%M:%S')}", flush=True)
    if _STOP.cooperative:
        return
    if signum == _warn_signal():
        print("ringctl: this workload cannot checkpoint; it runs on until the time limit", flush=True)
        return
    raise Terminated(signum)


def _install_signal_handlers() -> None:
    import signal

    for signum in (signal.SIGTERM, signal.SIGINT, _warn_signal()):
        signal.signal(signum, _on_signal)


def _pending_code() -> int:
    if _warn_signal() in _STOP.received:
        return STOP_WARN
    return STOP_TERM if _STOP.received else 0


def stop_codes(ctx: RunContext) -> list[int]:
    """Collective: what every rank received (STOP_* per rank). Every rank calls it at the
    same point (a step end); one small all_reduce."""
    import torch
    import torch.distributed as dist

    codes = torch.zeros(ctx.world_size, dtype=torch.int64, device=ctx.device)
    codes[ctx.rank] = _pending_code()
    dist.all_reduce(codes, group=ctx.group)
    return [int(c) for c in codes.tolist()]


def requeues_left(cfg: Any, attempt: int) -> int:
    """How many more times this job may requeue itself (launcher.max_requeues, default 3)."""
    return int(cfg.launcher.get("max_requeues", DEFAULT_MAX_REQUEUES)) - attempt


DEFAULT_MAX_REQUEUES = 3


# ---- the task body -------------------------------------------------------------------------

_FAILING = threading.Lock()  # one failure path per process: the main thread's or the watchdog's


@dataclass
class _Attempt:
    """What the failure and stop paths need, on every rank."""

    config: dict[str, Any]
    folder: Path
    rank: int
    world_size: int
    attempt: int
    heartbeat: Any
    ctx: RunContext | None = None


def heartbeat_timeout_s(cfg: Any) -> float:
    """A peer silent this long is taken as stopped or hung: launcher.heartbeat_timeout_s,
    else launcher.init_timeout_s (the process group's own timeout)."""
    value = cfg.launcher.get("heartbeat_timeout_s")
    if value is None:
        value = cfg.launcher.get("init_timeout_s", 120)
    return float(value)


class RingctlJob(submitit.helpers.Checkpointable):
    """The task body as submitit's Checkpointable callable: submitit pickles it and calls it
    on every task. Its state (checkpoints, W&B run id, attempts) lives in the job folder,
    so `checkpoint()` resubmits the same call and a requeued job resumes from the folder;
    submitit's own warning-signal handler (active until `__call__` installs ringctl's) does
    exactly that."""

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        results = _run(config)
        atexit.register(_exit_if_saved_success)
        return results

    def checkpoint(self, config: dict[str, Any]) -> Any:
        return submitit.helpers.DelayedSubmission(self, config)


run_job = RingctlJob()


def _exit_if_saved_success() -> None:
    """At interpreter exit, once submitit has saved this task's successful result: end the
    process there (os._exit(0)), before C++ objects are torn down. A finished rank could
    abort in that teardown ("terminate called without an active exception", SIGABRT) after
    its results and submitit's result pickle were written, and SLURM then counted the task
    FAILED (2 of 5 runs of test_readme's sweep one day, on a rank other than 0). Any other
    ending (an exception, a result submitit could not save) exits as it would have."""
    try:
        outcome = pickle_load(submitit.JobEnvironment().paths.result_pickle)[0]
    except Exception:  # noqa: BLE001 -- at exit, whatever went wrong: the ordinary exit
        return
    if outcome != "success":
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def _run(config: dict[str, Any]) -> dict[str, Any]:
    """Every rank returns its results; rank 0 writes results.json.

    A rank whose workload raises writes its traceback to `rank<R>.error` and a final
    record (ringctl.health) before re-raising; a rank whose collective failed first looks
    for the peer that caused it, so `ringctl launch` names the first cause rather than the
    peers' "connection closed". A watchdog thread ends the rank when a peer goes silent."""
    threads = set_threads(config)  # first: OpenMP reads OMP_NUM_THREADS when torch loads
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from ringctl.health import Heartbeat, current_attempt

    cfg = OmegaConf.create(config)
    folder = _job_folder()
    rank, world = _task_identity()
    attempt = current_attempt()
    if attempt > 0:  # a requeued job: what an earlier attempt left must not speak for this one
        _clear_stale_result()
        if rank == 0:
            _archive_errors(folder, attempt)
    state = _Attempt(config, folder, rank, world, attempt, heartbeat=None)
    state.heartbeat = Heartbeat(
        folder, rank, world, node_name(), attempt, heartbeat_timeout_s(cfg),
        on_silent=lambda ranks, reason: _abort_for_silent(state, ranks, reason),
    ).start()
    _install_signal_handlers()
    try:
        try:
            device, env = _init_distributed(cfg, folder, attempt)
            threads_per_rank: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(threads_per_rank, threads.count)
            state.ctx = _context(cfg, folder, device, env.local_rank, attempt)
            state.ctx.threads = {"per_rank": threads_per_rank, "source": threads.source}
            results = _run_workload(cfg, config, state.ctx)
        except StopJob as stop:
            _stopped(state, stop)  # always raises: SystemExit (requeue, job-wide stop) or _Recorded
    except SystemExit:
        raise  # a requeue or a job-wide stop: recorded, and not a failure of this rank
    except BaseException as exc:
        if not isinstance(exc, _Recorded):
            _failed(state, exc)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    state.heartbeat.finish("done")
    if results.get("failures"):
        raise RuntimeError("; ".join(results["failures"]))
    return results


def _task_identity() -> tuple[int, int]:
    """(rank, world size) before torch.distributed exists: submitit's environment, else
    torchrun's RANK/WORLD_SIZE."""
    try:
        env = submitit.JobEnvironment()
        return env.global_rank, env.num_tasks
    except RuntimeError:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _clear_stale_result() -> None:
    """This task's result pickle from an earlier attempt (one that failed, then was
    requeued by a node failure): `ringctl status` would take it as this attempt's end."""
    try:
        submitit.JobEnvironment().paths.result_pickle.unlink(missing_ok=True)
    except (RuntimeError, OSError):
        pass


def _archive_errors(folder: Path, attempt: int) -> None:
    """Rank 0 of a requeued job: the previous attempt's rank*.error files move to its
    health folder, so they never become this attempt's reported cause."""
    from ringctl.health import attempt_dir

    started = time.time() - 2.0  # this attempt's ranks start together; older files are stale
    for path in folder.glob("rank*.error"):
        try:
            if path.stat().st_mtime < started:
                target = attempt_dir(folder, attempt - 1)
                target.mkdir(parents=True, exist_ok=True)
                path.replace(target / path.name)
        except OSError:
            continue


def _progress(state: _Attempt) -> dict[str, Any]:
    return dict(state.ctx.progress) if state.ctx is not None else {}


def _failure_results(state: _Attempt, failure: Any, error: str) -> dict[str, Any]:
    from ringctl.health import read_attempts

    header = _header(state.config, state.ctx) if state.ctx is not None else {"config": state.config}
    return {
        **header, **_progress(state), "error": error,
        "failure": failure.to_dict() if failure is not None else None,
        "attempt": state.attempt, "attempts": read_attempts(state.folder),
    }


def _writer(state: _Attempt, failure: Any) -> bool:
    """The lowest rank that is not the dead or silent one writes results.json."""
    culprit = failure.rank if failure is not None and failure.kind in ("died", "silent", "not-started") else None
    return state.rank == min(r for r in range(state.world_size) if r != culprit) if state.world_size > 1 else True


def _write_error(state: _Attempt, text: str) -> None:
    try:
        (state.folder / f"rank{state.rank}.error").write_text(text)
    except OSError:
        pass


def _finish_metrics(state: _Attempt, *, failed: bool = False, preempting: bool = False, timeout_s: float = 10.0) -> bool:
    """W&B's finish, bounded: a stuck upload never keeps a failing or stopping rank alive
    (SLURM kills a requeued job's processes KillWait seconds after SIGTERM). True when the
    run's data is safe: finished cleanly (SLURM's SIGTERM also kills W&B's own service
    process, and with it what it had not written yet)."""
    if state.ctx is None or state.ctx.metrics is None:
        return True
    metrics = state.ctx.metrics
    worker = threading.Thread(target=lambda: metrics.finish(failed=failed, preempting=preempting), daemon=True)
    worker.start()
    worker.join(timeout=timeout_s)
    return bool(getattr(metrics, "finished", True)) and not worker.is_alive()


def _failed(state: _Attempt, exc: BaseException) -> None:
    """This rank's workload (or a collective) raised: find the first cause, record it."""
    from ringctl.health import COMM, DIAGNOSE_WINDOW_S, ERROR, SIGNALLED, is_comm_error

    error = traceback.format_exc()
    if isinstance(exc, Terminated):
        kind, reason = SIGNALLED, str(exc)
    elif is_comm_error(error):
        kind, reason = COMM, f"a collective failed: {_last_line(error)}"
    else:
        kind, reason = ERROR, _last_line(error)
    with _FAILING:
        _STOP.exiting = True
        _write_error(state, error)
        if kind == COMM:  # a peer's fault: which one? (a dead peer's heartbeat goes stale)
            failure = _find_cause(state, DIAGNOSE_WINDOW_S, collective_failed=True)
            blames = [failure.rank] if failure is not None and failure.rank not in (-1, state.rank) else []
            if blames:
                reason = f"{reason} (after rank {failure.rank}: {failure.reason})"
            state.heartbeat.finish("failed", kind, reason, blames)
        else:
            state.heartbeat.finish("failed", kind, reason)
            # a job-wide SIGTERM reaches every rank within moments: wait to tell it from a stray one
            failure = _find_cause(state, 2.0 if kind == SIGNALLED else 0.0, want_stopped=kind == SIGNALLED)
        if _writer(state, failure):
            results = _failure_results(state, failure, error)
            if failure is not None and failure.kind == "stopped":
                results["stopped"] = failure.reason
            write_results(state.folder, results)
        _finish_metrics(state, failed=True)


def _find_cause(state: _Attempt, window_s: float, *, collective_failed: bool = False, want_stopped: bool = False) -> Any:
    """This attempt's diagnosis; waits up to `window_s` for a peer at fault to show (a
    failing peer writes its record; a dead peer's heartbeat goes stale)."""
    from ringctl.health import diagnose

    deadline = time.time() + window_s
    while True:
        failure = diagnose(state.folder, state.attempt, state.world_size, collective_failed=collective_failed)
        if want_stopped:
            if failure is not None and failure.kind == "stopped":
                return failure
        elif failure is not None and failure.rank != state.rank:
            return failure
        if time.time() >= deadline:
            return failure
        time.sleep(0.25)


def _abort_for_silent(state: _Attempt, ranks: list[int], reason: str) -> None:
    """Watchdog (heartbeat thread): a peer went silent while this rank may be stuck in a
    collective waiting for it. Record why, and end the process: a collective cannot be
    interrupted from another thread."""
    from ringctl.health import SILENT_PEER, diagnose

    if not _FAILING.acquire(blocking=False):
        return  # the main thread is already failing
    _STOP.exiting = True
    error = f"rank {state.rank} stopped waiting: {reason}\n"
    _write_error(state, error)
    state.heartbeat.finish("failed", SILENT_PEER, reason, ranks)
    failure = diagnose(state.folder, state.attempt, state.world_size)
    if _writer(state, failure):
        write_results(state.folder, _failure_results(state, failure, error))
    _finish_metrics(state, failed=True)
    print(f"ringctl: {error}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def _stopped(state: _Attempt, stop: StopJob) -> None:
    """Every rank agreed to stop at the same step (a checkpoint is saved). Requeue on the
    warning signal; on a SIGTERM every rank received (scancel, requeue, preemption, ringctl
    cancel), end quietly and let the scheduler say what happened; a SIGTERM only some ranks
    received fails the job naming them."""
    import subprocess

    import torch.distributed as dist

    from ringctl.health import Failure, record_attempt

    ctx = state.ctx
    assert ctx is not None
    node = ctx.node_names
    warned = [r for r, c in enumerate(stop.codes) if c == STOP_WARN]
    termed = [r for r, c in enumerate(stop.codes) if c == STOP_TERM]
    where = f"at step {stop.step} (checkpoint {stop.checkpoint})"
    if warned:
        left = requeues_left(ctx.cfg, state.attempt)
        if left > 0:
            reason = f"time limit or preemption warning {where}: requeued ({left - 1} requeues left)"
            if state.rank == 0:
                safe = _finish_metrics(state, preempting=True)
                record_attempt(state.folder, {
                    "attempt": state.attempt, "event": "requeue", "step": stop.step, "time": time.time(),
                    "reason": reason, "wandb_finished": safe,
                })
                try:
                    _requeue(state)
                except (OSError, subprocess.SubprocessError) as exc:
                    failure = Failure(-1, "", "stopped", f"{reason.split(': requeued')[0]}; the requeue failed: {exc}", state.attempt)
                    _end_stopped(state, failure, failed=True)
                    raise _Recorded(failure.reason) from exc
            state.heartbeat.finish("stopped", "requeue", reason)
            dist.barrier()  # nobody leaves before rank 0 asked for the requeue
            _STOP.exiting = True
            _exit_for_requeue()
        limit = int(ctx.cfg.launcher.get("max_requeues", DEFAULT_MAX_REQUEUES))
        failure = Failure(
            -1, "", "stopped",
            f"time limit or preemption warning {where}; not requeued: launcher.max_requeues={limit} "
            f"reached (this is attempt {state.attempt}); raise it or launcher.time_min",
            state.attempt,
        )
        _end_stopped(state, failure, failed=True)
        raise _Recorded(failure.reason)
    if len(termed) == state.world_size:
        failure = Failure(-1, "", "stopped", f"SIGTERM on every rank {where} (scancel, requeue, preemption or ringctl cancel)", state.attempt)
        _end_stopped(state, failure, failed=False)
        _STOP.exiting = True
        raise SystemExit(143)
    first = termed[0]
    failure = Failure(first, node[first], "signal", f"received SIGTERM {where}", state.attempt)
    if state.rank in termed:
        state.heartbeat.finish("failed", "signal", failure.reason)
    else:
        state.heartbeat.finish("failed", "comm", f"stopped with rank {first}: {failure.reason}", [first])
    _end_stopped(state, failure, failed=True, record=False)
    raise _Recorded(f"rank {first} on node {node[first]} {failure.reason}")


def _end_stopped(state: _Attempt, failure: Any, *, failed: bool, record: bool = True) -> None:
    from ringctl.health import record_attempt

    _STOP.exiting = True
    if state.rank == 0:
        event = {
            "attempt": state.attempt, "event": "stopped", "step": state.ctx.progress.get("step") if state.ctx else None,
            "time": time.time(), "reason": failure.reason,
        }
        results = _failure_results(state, failure, failure.reason)
        results["attempts"].append(event)
        if not failed:
            results["stopped"] = failure.reason
            results.pop("error")
        write_results(state.folder, results)  # first: SLURM's SIGKILL may follow its SIGTERM soon
        event["wandb_finished"] = _finish_metrics(state, failed=failed, preempting=not failed, timeout_s=3.0)
        record_attempt(state.folder, event)
    if record:
        state.heartbeat.finish("stopped" if not failed else "failed", "signal", failure.reason)


def _requeue(state: _Attempt) -> None:
    """Ask for the requeue: SLURM requeues the job (same id, same folder); locally the
    controller restarts the tasks when they exit with submitit's requeue code."""
    import subprocess

    env = submitit.JobEnvironment()
    if env.cluster == "slurm":
        subprocess.run(["scontrol", "requeue", env.job_id], check=True, timeout=60, capture_output=True)


def _exit_for_requeue() -> None:
    from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

    sys.stdout.flush()
    sys.stderr.flush()
    code = LOCAL_REQUEUE_RETURN_CODE if submitit.JobEnvironment().cluster == "local" else 0
    raise SystemExit(code)  # not an Exception: submitit writes no result, the job is not over


def _last_line(text: str) -> str:
    """An exception's last line, without gloo's source location and advice."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[-1] if lines else ""
    line = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\] ", "", line)
    return line.split(". This is typically caused")[0]


def _context(cfg: Any, folder: Path, device: Any, local_rank: int, attempt: int = 0) -> RunContext:
    """Discover where the ranks run, plan the ring, open W&B: the workload's context. A
    requeued job runs this again: the ring is planned for the nodes it has now, and
    attempts.jsonl records each attempt's nodes and ring."""
    import torch.distributed as dist

    from ringctl.health import record_attempt
    from ringctl.metrics import Metrics
    from ringctl.plan import plan_from_config

    rank, world = dist.get_rank(), dist.get_world_size()
    names: list[Any] = [None] * world
    dist.all_gather_object(names, node_name())
    topology = discover(cfg.topology, list(names), cfg.resources.virtual_node_size)
    plan, _ = plan_from_config(topology, cfg.topology, cfg.workload)
    run_id = _wandb_run_id(folder) if rank == 0 else None
    if rank == 0:
        record_attempt(folder, {
            "attempt": attempt, "event": "start", "time": time.time(), "job_id": env_job_id(),
            "node_names": list(names), "ring_order": list(plan.ring_order),
        })
    ctx = RunContext(
        cfg=cfg, rank=rank, world_size=world, local_rank=local_rank, device=device,
        group=dist.group.WORLD, plan=plan, topology=topology, node_names=list(names),
        folder=folder, metrics=None, attempt=attempt,
    )
    ctx.metrics = Metrics(cfg, folder, rank, plan=plan, topology=topology, run_id=run_id, resumed=attempt > 0)
    ctx.ring_attention = _bound_ring_attention(ctx)
    return ctx


def _wandb_run_id(folder: Path) -> str:
    """One W&B run per job, whatever the attempts: its id is made once and kept in the folder."""
    import secrets

    path = folder / "wandb_run_id"
    try:
        return path.read_text().strip()
    except OSError:
        pass
    run_id = secrets.token_hex(6)
    tmp = path.with_name(".wandb_run_id.tmp")
    tmp.write_text(run_id)
    tmp.replace(path)
    return run_id


def _header(config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """What results.json says about the run whatever the workload measured."""
    return {
        "config": config,
        "job_id": env_job_id(),
        "node_names": ctx.node_names,
        "nodes": ctx.plan.nodes,
        "virtual_nodes": ctx.cfg.resources.virtual_node_size is not None,
        "plan": plan_dict(ctx.plan, ctx.cfg.workload),
        "threads": ctx.threads,
    }


def _run_workload(cfg: Any, config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Run the workload; once every rank finished it, rank 0 writes results.json."""
    import torch.distributed as dist

    from ringctl.health import read_attempts
    from ringctl.workloads import get_workload

    started = time.time()
    result = get_workload(cfg.workload.name)(cfg, ctx)
    dist.barrier()  # every rank finished its workload (a crashed peer surfaces here)
    results = {**_header(config, ctx), "wall_s": time.time() - started, **result}
    summary = ctx.metrics.finish(summary=_scalars(results))
    if ctx.rank == 0:
        results["wandb"] = summary
        results["attempt"] = ctx.attempt
        results["attempts"] = read_attempts(ctx.folder)
        write_results(ctx.folder, results)
    _STOP.exiting = True
    # every rank leaves together: srun --wait and the local controller give the others only
    # a short grace once the first task has exited
    dist.barrier()
    return results


def _bound_ring_attention(ctx: RunContext) -> Callable[..., Any]:
    """ring_attention with this job's group, plan and layout filled in."""
    from ringctl.ring import ring_attention

    return partial(
        ring_attention, group=ctx.group, plan=ctx.plan,
        layout=ctx.cfg.workload.layout, causal=bool(ctx.cfg.workload.causal),
    )


def env_job_id() -> str:
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:
        return ""


def plan_dict(plan: Any, workload_cfg: Any) -> dict[str, Any]:
    """The plan as `ringctl plan --json` prints it for this workload (with predictions)."""
    from ringctl.plan import Workload

    return plan.to_dict(Workload.from_config(workload_cfg))


def _scalars(results: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten the numeric leaves of results for the W&B summary."""
    out: dict[str, Any] = {}
    for key, value in results.items():
        if key in ("config", "plan", "node_names"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalars(value, name + "/"))
        elif isinstance(value, (bool, int, float)):
            out[name] = value
    return out


def write_results(folder: Path, results: dict[str, Any]) -> Path:
    """results.json, written atomically (status readers never see half a file)."""
    path = folder / RESULTS_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str))
    tmp.replace(path)
    return path
