"""What every task of a ringctl job runs (submitit pickles `run_job` and calls it per task).

    torch.distributed from submitit's environment (gloo on CPU, NCCL on CUDA, timeout=)
    -> node names all_gathered (SLURMD_NODENAME under SLURM, else the hostname)
    -> Topology.discover -> make_plan (identical on every rank)
    -> the workload -> results.json in the job folder, W&B from rank 0.

The config arrives as a plain dict (resolved on the submitting side), so the job never
re-runs Hydra and never depends on the submitting machine's working directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable

RESULTS_NAME = "results.json"


def node_name() -> str:
    """Where this rank really runs. Under SLURM the node's name (the dev cluster's nodes
    all share the host's hostname), elsewhere the hostname."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def link_kwargs(topology_cfg: Any) -> dict[str, Any]:
    """The Topology fields that discovery cannot see (link classes, NICs, FLOP rate)."""
    from ringctl.topology import Topology

    base = Topology.from_config(topology_cfg)
    return {
        "intra": base.intra, "inter": base.inter,
        "nics_per_node": base.nics_per_node, "compute_tflops": base.compute_tflops,
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

    @property
    def position(self) -> int:
        """This rank's position on the ring (which shard it holds)."""
        return self.plan.position(self.rank)


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


def _init_distributed(cfg: Any) -> tuple[Any, Any]:
    """init_process_group from submitit's job environment (submitit's
    TorchDistributedEnvironment: MASTER_ADDR = first node, port from the job id); returns
    (device, env)."""
    import submitit
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    use_cuda = torch.cuda.is_available() and int(cfg.resources.gpus_per_node) > 0
    if use_cuda:
        device = torch.device("cuda", env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    _bind_gloo_nic(env.local_rank)
    timeout_s = int(cfg.launcher.get("init_timeout_s", 120))
    dist.init_process_group(
        backend="nccl" if use_cuda else "gloo",
        rank=env.rank, world_size=env.world_size, timeout=timedelta(seconds=timeout_s),
    )
    return device, env


def _bind_gloo_nic(local_rank: int) -> None:
    """On a fabric with one NIC per rank (slurm/dev-cluster --fabric ...,nics=L), the node
    lists its NIC names in RINGCTL_NICS (comma-separated); rank l binds gloo to NIC l mod n."""
    nics = [n for n in os.environ.get("RINGCTL_NICS", "").split(",") if n]
    if nics and "GLOO_SOCKET_IFNAME" not in os.environ:
        os.environ["GLOO_SOCKET_IFNAME"] = nics[local_rank % len(nics)]


def _job_folder() -> Path:
    import submitit

    try:
        return Path(str(submitit.JobEnvironment().paths.folder))
    except RuntimeError:  # called outside submitit (tests, a plain torchrun)
        return Path(os.environ.get("RINGCTL_JOB_FOLDER", ".")).resolve()


def run_job(config: dict[str, Any]) -> dict[str, Any]:
    """The task body. Every rank returns its results; rank 0 writes results.json.

    A rank whose workload raises writes its traceback to `rank<R>.error` in the job folder
    before re-raising, so `ringctl launch` can show the root cause (the first error file)
    rather than the peers' "connection closed" that follows it."""
    threads = set_threads(config)  # first: OpenMP reads OMP_NUM_THREADS when torch loads
    import torch.distributed as dist
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(config)
    folder = _job_folder()
    device, env = _init_distributed(cfg)
    rank = dist.get_rank()
    threads_per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(threads_per_rank, threads.count)
    ctx: RunContext | None = None
    try:
        try:
            ctx = _context(cfg, folder, device, env.local_rank)
            ctx.threads = {"per_rank": threads_per_rank, "source": threads.source}
            results = _run_workload(cfg, config, ctx)
        except BaseException:
            error = traceback.format_exc()
            (folder / f"rank{rank}.error").write_text(error)
            if ctx is not None:
                ctx.metrics.finish(failed=True)
            if rank == 0:
                header = _header(config, ctx) if ctx is not None else {"config": config}
                write_results(folder, {**header, "error": error})
            raise
        if results.get("failures"):
            raise RuntimeError("; ".join(results["failures"]))
        return results
    finally:
        dist.destroy_process_group()


def _context(cfg: Any, folder: Path, device: Any, local_rank: int) -> RunContext:
    """Discover where the ranks run, plan the ring, open W&B: the workload's context."""
    import torch.distributed as dist

    from ringctl.metrics import Metrics
    from ringctl.plan import plan_from_config

    rank, world = dist.get_rank(), dist.get_world_size()
    names: list[Any] = [None] * world
    dist.all_gather_object(names, node_name())
    topology = discover(cfg.topology, list(names), cfg.resources.virtual_node_size)
    plan, _ = plan_from_config(topology, cfg.topology, cfg.workload)
    ctx = RunContext(
        cfg=cfg, rank=rank, world_size=world, local_rank=local_rank, device=device,
        group=dist.group.WORLD, plan=plan, topology=topology, node_names=list(names),
        folder=folder, metrics=Metrics(cfg, folder, rank, plan=plan, topology=topology),
    )
    ctx.ring_attention = _bound_ring_attention(ctx)
    return ctx


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

    from ringctl.workloads import get_workload

    started = time.time()
    result = get_workload(cfg.workload.name)(cfg, ctx)
    dist.barrier()  # every rank finished its workload (a crashed peer surfaces here)
    results = {**_header(config, ctx), "wall_s": time.time() - started, **result}
    summary = ctx.metrics.finish(summary=_scalars(results))
    if ctx.rank == 0:
        results["wandb"] = summary
        write_results(ctx.folder, results)
    return results


def _bound_ring_attention(ctx: RunContext) -> Callable[..., Any]:
    """ring_attention with this job's group, plan and layout filled in."""
    from ringctl.ring import ring_attention

    return partial(
        ring_attention, group=ctx.group, plan=ctx.plan,
        layout=ctx.cfg.workload.layout, causal=bool(ctx.cfg.workload.causal),
    )


def env_job_id() -> str:
    import submitit

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
