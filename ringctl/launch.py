"""Launchers: turn a validated config into submitit jobs, on SLURM or as local processes.

The base class owns the flow (validate -> job folder -> executor -> submit -> index);
`SlurmLauncher` and `LocalLauncher` fill two hooks: how many nodes/tasks the job gets
and which submitit executor sends it. Validation runs before anything touches the disk,
so bad input leaves no job folder behind.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import submitit

from ringctl.config import LAUNCHER_KINDS, WANDB_MODES, TopologyConfig
from ringctl.errors import ConfigError, check_positive_int
from ringctl.job import cpus_per_task

#: the file (under the runs root) mapping job id -> job folder, one JSON object a line
INDEX_NAME = "index.jsonl"
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")
# sbatch options that ringctl sets itself from the topology; `additional` may not override them
_OWNED_SBATCH = {"nodes", "ntasks_per_node", "gpus_per_node", "time", "job_name", "setup"}


def runs_root(cfg_root: str | None = None) -> Path:
    """The folder holding job folders and the index: RINGCTL_RUNS, else the config, else ./runs."""
    return Path(os.environ.get("RINGCTL_RUNS") or cfg_root or "runs").resolve()


class SubmissionError(RuntimeError):
    """sbatch (or the local controller) refused the job; carries the tool's own text."""


def resolve_kind(kind: str) -> str:
    """`auto` -> `slurm` when `sbatch` is on PATH and a cluster answers `sinfo`, else `local`
    (SLURM's packages without a running cluster, e.g. after `slurm/dev-cluster down`,
    must not break the embedded default)."""
    if kind not in LAUNCHER_KINDS:
        raise ConfigError("launcher.kind", kind, " | ".join(LAUNCHER_KINDS))
    if kind == "auto":
        return "slurm" if _slurm_answers() else "local"
    return kind


@functools.cache
def _slurm_answers() -> bool:
    """Asked once per process: a sweep's points and the launcher share the answer."""
    if not (shutil.which("sbatch") and shutil.which("sinfo")):
        return False
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@dataclass(frozen=True)
class Resources:
    """What one job asks for. Locally all ranks share one machine, grouped into virtual
    nodes of `virtual_node_size` ranks; under SLURM every rank runs on its real node."""

    kind: str
    nodes: int  # topology nodes (real under SLURM, virtual locally)
    ranks_per_node: int
    gpus_per_node: int
    virtual_node_size: int | None

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


def resources(cfg: Any) -> Resources:
    """Nodes and ranks per node from the topology, capped by the launcher."""
    kind = resolve_kind(str(cfg.launcher.kind))
    topo, defaults = cfg.topology, TopologyConfig()  # keys a topology leaves out: the schema's
    nodes = check_positive_int("topology.nodes", topo.get("nodes", defaults.nodes))
    per_node = topo.get("ranks_per_node", defaults.ranks_per_node)
    if not isinstance(per_node, int):
        counts = [check_positive_int("topology.ranks_per_node", n) for n in per_node]
        if len(set(counts)) != 1:
            raise ConfigError(
                "topology.ranks_per_node", list(counts),
                "the same count on every node for `ringctl launch` (SLURM --ntasks-per-node)",
            )
        if len(counts) != nodes:
            raise ConfigError("topology.ranks_per_node", list(counts), f"one entry per node ({nodes})")
        per_node = counts[0]
    per_node = check_positive_int("topology.ranks_per_node", per_node)
    cap, cap_key = cfg.launcher.get("max_ranks_per_node"), "launcher.max_ranks_per_node"
    if cap is None and kind == "local":
        cap, cap_key = cfg.launcher.get("local_ranks_per_node", 2), "launcher.local_ranks_per_node"
    if cap is not None:
        per_node = min(per_node, check_positive_int(cap_key, cap))
    gpus = cfg.launcher.get("gpus_per_node")
    if gpus is None and kind == "local":
        gpus = 0  # local processes run on CPU with gloo unless launcher.gpus_per_node asks
    if gpus is None:
        wants = int(topo.get("gpus_per_node", 0) or 0) > 0
        gpus = per_node if wants and _cluster_has_gpus(cfg.launcher.get("partition")) else 0
    try:
        gpus = int(gpus)
    except (TypeError, ValueError):
        raise ConfigError("launcher.gpus_per_node", gpus, "an integer >= 0 or null") from None
    if gpus < 0:
        raise ConfigError("launcher.gpus_per_node", gpus, "an integer >= 0 or null")
    virtual = topo.get("virtual_node_size")
    if virtual is not None:
        virtual = check_positive_int("topology.virtual_node_size", virtual)
        if (nodes * per_node) % virtual:
            raise ConfigError(
                "topology.virtual_node_size", virtual,
                f"a divisor of the {nodes * per_node} ranks (nodes {nodes} x ranks per node {per_node})",
            )
    elif kind == "local":
        virtual = per_node
    return Resources(kind, nodes, per_node, gpus, virtual)


@functools.cache
def _cluster_has_gpus(partition: str | None) -> bool:
    """Whether the SLURM partition's nodes offer GPU GRES (`sinfo %G`); a CPU-only cluster
    such as slurm/dev-cluster runs a GPU topology's ranks on CPUs (gloo)."""
    cmd = ["sinfo", "-h", "-o", "%G"] + (["-p", str(partition)] if partition else [])
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return True  # cannot tell: ask for what the topology says
    return done.returncode != 0 or "gpu" in done.stdout


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, " | ".join(allowed))


def _check_no_newline(key: str, value: Any) -> None:
    if isinstance(value, (list, tuple)):
        for item in value:
            _check_no_newline(key, item)
    elif isinstance(value, str) and ("\n" in value or "\r" in value):
        raise ConfigError(key, value, "a single line (no newline: it would inject lines into the sbatch file)")


def sbatch_parameters(cfg: Any, res: Resources, name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters, validated: known keys only, no newlines."""
    launcher = cfg.launcher
    params: dict[str, Any] = {
        "job_name": name,
        "nodes": res.nodes,
        "ntasks_per_node": res.ranks_per_node,
        "cpus_per_task": cpus_per_task(launcher, res.gpus_per_node),  # null: 8 per GPU rank, else 1
        "time": check_positive_int("launcher.time_min", launcher.get("time_min", 10)),
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        value = launcher.get(key)
        if value is not None:
            _check_no_newline(f"launcher.{key}", value)
            params[key] = str(value)
    if launcher.get("exclusive"):
        params["exclusive"] = True
    setup = list(launcher.get("setup") or [])
    _check_no_newline("launcher.setup", setup)
    if setup:
        params["setup"] = setup
    distribution = cfg.topology.get("distribution")
    extra: dict[str, Any] = {}
    if distribution:
        _check_no_newline("topology.distribution", distribution)
        extra["distribution"] = str(distribution)
    known = submitit.SlurmExecutor._valid_parameters()
    for key, value in dict(launcher.get("additional") or {}).items():
        full = f"launcher.additional.{key}"
        if not _SBATCH_KEY.match(str(key)):
            raise ConfigError(full, value, "an sbatch option name: lowercase letters, digits, '-', '_'")
        if key in _OWNED_SBATCH:
            raise ConfigError(full, value, "options ringctl does not set itself (nodes and tasks come from the topology)")
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(full, value, "a string, number or boolean")
        _check_no_newline(full, value)
        if key.replace("-", "_") in known:
            params[key.replace("-", "_")] = value
        else:
            extra[key] = value
    if extra:
        params["additional_parameters"] = extra
    return params


def validate(cfg: Any) -> Resources:
    """Every check that can fail before submission; raises ConfigError naming the key.

    It builds what the job builds (the topology the ranks will discover, the RingPlan and
    its Workload, through the same functions), so a config that validates is one that runs.
    """
    from ringctl.job import planned_topology
    from ringctl.plan import check_seq_len, plan_from_config

    res = resources(cfg)
    _check_choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    if cfg.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("wandb.mode", "online", "offline | disabled, or set WANDB_API_KEY in the environment")
    plan, _ = plan_from_config(planned_topology(cfg, res), cfg.topology, cfg.workload)
    work = cfg.workload
    if work.name == "attention" and work.get("check"):
        check_seq_len(work.check_seq_len, plan.layout, plan.world_size, key="workload.check_seq_len")
    if work.name == "train":
        check_positive_int("workload.steps", work.steps)
        check_positive_int("workload.vocab", work.vocab)
    if work.name == "custom":
        _check_entry(str(work.entry))
    if res.kind == "slurm":
        sbatch_parameters(cfg, res, str(cfg.get("name", "ringctl")))
    return res


def _check_entry(entry: str) -> None:
    """`pkg.module:function`, importable here (the job imports it the same way)."""
    import importlib.util

    module, _, function = entry.partition(":")
    if not module or not function.isidentifier():
        raise ConfigError("workload.entry", entry, "pkg.module:function")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigError("workload.entry", entry, f"an importable module (module {module!r} not found)")


@dataclass
class Submitted:
    """One submitted job: what `ringctl status` and the progress display need."""

    job: submitit.Job
    folder: Path
    name: str
    kind: str
    overrides: tuple[str, ...] = ()

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)


class Launcher:
    """Submits validated configs with a submitit executor; subclasses pick the executor."""

    kind = ""

    def __init__(self, root: Path) -> None:
        self.root = root

    def executor(self, folder: Path, cfg: Any, res: Resources, name: str) -> submitit.Executor:
        raise NotImplementedError

    def new_folder(self, name: str) -> Path:
        """runs/<time>-<name>; the job folders (one per job id) go inside it."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = self.root / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        folder, n = base, 1
        while folder.exists():
            folder, n = Path(f"{base}-{n}"), n + 1
        return folder

    def submit(
        self, points: list[tuple[Any, Resources]], name: str, overrides: list[tuple[str, ...]] | None = None
    ) -> list[Submitted]:
        """Submit validated points (each a config and the Resources `validate` returned for
        it) all at once: under SLURM one job array per set of points that share resources
        and sbatch options (one array for a usual sweep)."""
        cfgs = [cfg for cfg, _ in points]
        overrides = overrides or [() for _ in cfgs]
        groups: dict[str, list[int]] = {}
        for i, (cfg, res) in enumerate(points):
            groups.setdefault(_submission_key(cfg, res), []).append(i)
        submitted: dict[int, Submitted] = {}
        for indices in groups.values():
            jobs = self._submit_batch([cfgs[i] for i in indices], points[indices[0]][1], name)
            for i, job in zip(indices, jobs):
                submitted[i] = Submitted(job, Path(str(job.paths.folder)), name, self.kind, tuple(overrides[i]))
        out = [submitted[i] for i in range(len(cfgs))]
        record(self.root, out, self.kind)
        return out

    def _submit_batch(self, cfgs: list[Any], res: Resources, name: str) -> list[submitit.Job]:
        from omegaconf import OmegaConf

        from ringctl.job import run_job

        base = self.new_folder(name)
        executor = self.executor(base / "%j", cfgs[0], res, name)
        payloads = [OmegaConf.to_container(cfg, resolve=True) for cfg in cfgs]
        for payload in payloads:  # what the job needs to know of this submission
            payload["resources"] = asdict(res)
        try:
            with self.quiet(), executor.batch():
                return [executor.submit(run_job, payload) for payload in payloads]
        except (submitit.core.utils.FailedJobError, OSError) as exc:
            shutil.rmtree(base, ignore_errors=True)  # nothing was submitted: leave no folder
            raise SubmissionError(f"{self.kind} submission failed: {exc}") from exc

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


def _submission_key(cfg: Any, res: Resources) -> str:
    """Points with equal keys can share one sbatch (array): same resources, same options."""
    from omegaconf import OmegaConf

    launcher = OmegaConf.to_container(cfg.launcher, resolve=True)
    return json.dumps([asdict(res), launcher, cfg.topology.get("distribution")], sort_keys=True, default=str)


@contextlib.contextmanager
def _stdio_to_devnull() -> Iterator[None]:
    """Local jobs' controller processes inherit stdout/stderr; point them at /dev/null (the
    tasks log to files in the job folder) so a caller reading our output through a pipe is
    not held open until the job ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


class SlurmLauncher(Launcher):
    """sbatch through submitit; several configs become one job array."""

    kind = "slurm"

    def executor(self, folder: Path, cfg: Any, res: Resources, name: str) -> submitit.Executor:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
        executor.update_parameters(**sbatch_parameters(cfg, res, name))
        return executor


class LocalLauncher(Launcher):
    """Local processes via submitit's LocalExecutor: all ranks of all (virtual) nodes here."""

    kind = "local"

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        return _stdio_to_devnull()

    def executor(self, folder: Path, cfg: Any, res: Resources, name: str) -> submitit.Executor:
        # each rank sets its own threads (ringctl.job.set_threads: launcher.cpus_per_task, else
        # the cores / ranks here); a bad value fails here, before any folder exists
        if cfg.launcher.get("cpus_per_task") is not None:
            cpus_per_task(cfg.launcher, res.gpus_per_node)
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=0)
        params: dict[str, Any] = {
            "tasks_per_node": res.world_size,
            "timeout_min": check_positive_int("launcher.time_min", cfg.launcher.get("time_min", 10)),
            "gpus_per_node": res.gpus_per_node,
        }
        setup = list(cfg.launcher.get("setup") or [])
        if setup:
            params["setup"] = setup
        executor.update_parameters(**params)
        return executor


def make_launcher(res: Resources, root: str | None = None) -> Launcher:
    """The launcher for validated Resources (`launcher.kind`, auto already resolved)."""
    folder = runs_root(root)
    return SlurmLauncher(folder) if res.kind == "slurm" else LocalLauncher(folder)


# ---- the job index: job id -> folder, so job control works from any shell ----------------


def record(root: Path, submitted: list[Submitted], kind: str) -> None:
    """Append the submitted jobs to <root>/index.jsonl."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / INDEX_NAME, "a") as index:
        for item in submitted:
            entry = {
                "job_id": item.job_id, "folder": str(item.folder), "kind": kind,
                "name": item.name, "overrides": list(item.overrides), "submitted": time.time(),
            }
            index.write(json.dumps(entry) + "\n")


def read_index(root: Path) -> list[dict[str, Any]]:
    """All recorded jobs, oldest first (a job id recorded twice: the later entry wins)."""
    path = root / INDEX_NAME
    if not path.exists():
        return []
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {e["job_id"]: e for e in entries}
    return sorted(latest.values(), key=lambda e: e["submitted"])
