"""Launchers: turn a validated config into submitit jobs, on SLURM or as local processes.

The base class owns the flow (validate -> job folder -> executor -> submit -> index);
`SlurmLauncher` and `LocalLauncher` fill two hooks: how many nodes/tasks the job gets
and which submitit executor sends it. Validation runs before anything touches the disk,
so bad input leaves no job folder behind.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import functools
import io
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import submitit

from ringctl.config import LAUNCHER_KINDS, WANDB_MODES
from ringctl.errors import ConfigError, check_positive_int
from ringctl.job import cpus_per_task

#: the file (under the runs root) mapping job id -> job folder, one JSON object a line
INDEX_NAME = "index.jsonl"
_SBATCH_KEY = re.compile(r"^[a-z][a-z0-9_-]*$")
# sbatch options that ringctl sets itself; `additional` may not override them (key with '_')
_OWNED_SBATCH = {
    "nodes": "nodes come from the topology",
    "ntasks_per_node": "tasks per node come from the topology (and launcher.max_ranks_per_node)",
    "ntasks": "tasks come from the topology (nodes x ranks per node)",
    "gpus_per_node": "set launcher.gpus_per_node",
    "num_gpus": "set launcher.gpus_per_node",
    "time": "set launcher.time_min",
    "job_name": "set name=...",
    "setup": "set launcher.setup",
    "partition": "set launcher.partition",
    "account": "set launcher.account",
    "qos": "set launcher.qos",
    "constraint": "set launcher.constraint",
    "exclusive": "set launcher.exclusive",
    "cpus_per_task": "set launcher.cpus_per_task",
    "array_parallelism": "set launcher.array_parallelism",
    "srun_args": "set launcher.container_image / launcher.container_mounts",
}
# options that would break the job as ringctl runs it, and why
_REFUSED_SBATCH = {
    "use_srun": "ringctl starts one task per rank with srun; without srun one process runs and the ring never forms",
    "output": "the job's logs go to <job folder>/<job id>_<task>_log.out, where `ringctl logs` reads them",
    "error": "the job's errors go to <job folder>/<job id>_<task>_log.err, where `ringctl logs` reads them",
    "stderr_to_stdout": "ringctl reads each rank's own stderr log",
    "array": "sweeps (-m) become job arrays by themselves; cap running tasks with launcher.array_parallelism",
    "wrap": "the job script is submitit's; --wrap would replace it",
    "teardown": "not settable as one value",
    "additional_parameters": "put each option under launcher.additional itself",
    "map_count": "submitit sets it for arrays",
    "parsable": "an sbatch command-line mode, not a job option (submitit reads sbatch's usual output)",
    "test_only": "ask for it with `ringctl launch ... --preflight`",
    "wait": "an sbatch command-line mode (ringctl launch waits by itself unless wait=false)",
    "help": "an sbatch command-line mode, not a job option",
    "usage": "an sbatch command-line mode, not a job option",
    "version": "an sbatch command-line mode, not a job option",
    "verbose": "an sbatch command-line mode, not a job option",
    "quiet": "an sbatch command-line mode, not a job option",
}
# submitit parameters that are no sbatch option but may be set through `additional`
_SUBMITIT_ONLY = {"signal_delay_s"}
# GPU requests besides launcher.gpus_per_node (gres only when it names a gpu)
_GPU_OPTIONS = {"gpus", "gpus_per_task", "gpus_per_socket", "gres"}

#: sbatch's long options as `sbatch --help` lists them, SLURM 22.05.8 (Debian 12's
#: slurm-client), for machines where `sbatch --help` cannot run (no sbatch, or no
#: slurm.conf to read); where it runs, its own list is used instead (see sbatch_options).
SBATCH_OPTIONS_22_05 = frozenset((
    "account", "array", "bb", "bbf", "begin", "chdir", "cluster-constraint", "clusters", "comment",
    "constraint", "container", "contiguous", "core-spec", "cores-per-socket", "cpu-freq",
    "cpus-per-gpu", "cpus-per-task", "deadline", "delay-boot", "dependency", "distribution",
    "error", "exclude", "exclusive", "export", "export-file", "extra-node-info", "get-user-env",
    "gid", "gpu-bind", "gpu-freq", "gpus", "gpus-per-node", "gpus-per-socket", "gpus-per-task",
    "gres", "gres-flags", "help", "hold", "ignore-pbs", "input", "job-name", "licenses",
    "mail-type", "mail-user", "mcs-label", "mem", "mem-per-cpu", "mem-per-gpu", "mincpus", "nice",
    "no-kill", "no-requeue", "nodefile", "nodelist", "nodes", "ntasks", "ntasks-per-core",
    "ntasks-per-node", "ntasks-per-socket", "output", "overcommit", "oversubscribe", "parsable",
    "partition", "power", "priority", "profile", "propagate", "qos", "quiet", "reboot", "requeue",
    "reservation", "signal", "sockets-per-node", "spread-job", "switches", "thread-spec",
    "threads-per-core", "time", "time-min", "tmp", "uid", "usage", "use-min-nodes", "verbose",
    "version", "wait", "wckey", "wrap",
))
#: options sbatch accepts (its man page, SLURM 22.05) that `sbatch --help` does not list
SBATCH_OPTIONS_MAN_ONLY = frozenset((
    "acctg-freq", "batch", "hint", "kill-on-invalid-dep", "mem-bind", "network", "open-mode", "test-only",
    "tres-per-task",
))

#: job names name the job folder (runs/<stamp>-<name>), the SLURM job and the W&B run. The
#: folder adds a 16-character stamp and maybe a suffix; Linux allows 255 bytes per name.
NAME_MAX = 200
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
_NAME_ALLOWED = (
    f"1-{NAME_MAX} characters of letters, digits, '_', '.', '+', '-', starting with a letter "
    "or digit (it names the job folder and the SLURM job)"
)
# SLURM object names (partition, account, qos), comma-separated lists of them
_SLURM_NAMES = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# one word of a command line that needs no shell quoting (launcher.python)
_WORD = re.compile(r"[A-Za-z0-9_./+=:@%-]+")
# a container image as pyxis/enroot name it: [USER@][REGISTRY#]IMAGE[:TAG], or a file path
_IMAGE = re.compile(r"[A-Za-z0-9_./:@#+-]+")
# one pyxis mount: SRC:DST[:FLAGS], absolute paths without ',' or ':'
_MOUNT = re.compile(r"/[A-Za-z0-9_./+@=-]*:/[A-Za-z0-9_./+@=-]*(:[a-z+]+)?")
#: free space a runs root needs: job folders hold pickles, logs, W&B files and results
MIN_FREE_BYTES = 16 * 2**20
#: environment variables whose values are secrets: never written into a job folder
SECRET_ENV = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
_SECRET_MIN_LEN = 8  # shorter values ("1", "true") are flags, not secrets; matching them misfires


def runs_root(cfg_root: str | None = None) -> Path:
    """The folder holding job folders and the index: RINGCTL_RUNS, else the config, else ./runs."""
    return Path(os.environ.get("RINGCTL_RUNS") or cfg_root or "runs").resolve()


def user_index_root() -> Path:
    """Where the per-user index lives (every job this user launched, from any directory):
    RINGCTL_STATE_DIR, else $XDG_STATE_HOME/ringctl, else ~/.local/state/ringctl."""
    explicit = os.environ.get("RINGCTL_STATE_DIR")
    if explicit:
        return Path(explicit).resolve()
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state).resolve() / "ringctl"


def known_jobs(root: Path, *, everywhere: bool = True) -> list[dict[str, Any]]:
    """The jobs under `root`'s index and (with `everywhere`) the per-user index, oldest first:
    one entry per job folder (the runs root's wins), so `status`, `logs` and `cancel` find a
    job wherever it was launched from."""
    merged: dict[str, dict[str, Any]] = {}
    user = user_index_root()
    for index_root in ([user] if everywhere and user != root else []) + [root]:
        for entry in read_index(index_root):
            merged[entry["folder"]] = entry
    return sorted(merged.values(), key=lambda e: float(e.get("submitted") or 0))


class SubmissionError(RuntimeError):
    """sbatch (or the local controller) refused the job: one line naming the cause;
    `user_input` when the cause is what was asked (an unknown partition, say): exit 2."""

    def __init__(self, message: str, user_input: bool = False) -> None:
        super().__init__(message)
        self.user_input = user_input


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
    topo = cfg.topology  # composed: every key is present (the schema names any left unset)
    nodes = check_positive_int("topology.nodes", topo.nodes)
    per_node = topo.ranks_per_node
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


def _shown(value: Any) -> Any:
    """A value as an error message shows it: long strings cut, so the line stays readable."""
    if isinstance(value, str) and len(value) > 80:
        return f"{value[:60]}... ({len(value)} characters)"
    return value


def check_name(key: str, value: Any, limit: int = NAME_MAX) -> str:
    """A job name: it names a folder (no '/', no leading '.'), the SLURM job and the W&B run."""
    if not isinstance(value, str) or len(value) > limit or not _NAME.fullmatch(value):
        raise ConfigError(key, _shown(value), _NAME_ALLOWED)
    return value


def _check_line(key: str, value: Any) -> str:
    """One line of the sbatch script: no newline or other control character (it would add
    lines, and so directives, to the script), and no `#SBATCH` (sbatch reads directives
    from every line before the first command, setup lines included)."""
    text = str(value)
    if _CONTROL.search(text):
        raise ConfigError(
            key, _shown(value), "a single line (no newline or control character: it would inject lines into the sbatch file)"
        )
    if "#SBATCH" in text.upper():
        raise ConfigError(key, _shown(value), "text without '#SBATCH' (sbatch would read it as a directive)")
    return text


def _check_sbatch_value(key: str, value: Any) -> str:
    """An sbatch option's value: one line, and no shell substitution. submitit quotes every
    value, so `...` or $(...) would reach SLURM as literal text, never run: refused as a
    certain mistake (or an attack) rather than passed on."""
    text = _check_line(key, value)
    if "`" in text or "$(" in text:
        raise ConfigError(
            key, _shown(value), "plain text without `...` or $(...) (sbatch options are quoted, never run by a shell)"
        )
    return text


def _check_slurm_names(key: str, value: Any) -> str:
    text = str(value)
    if not _SLURM_NAMES.fullmatch(text):
        raise ConfigError(key, _shown(value), "SLURM names (letters, digits, '_', '.', '+', '-'), comma-separated")
    return text


_HELP_OPTION = re.compile(r"^ {1,8}(?:-[A-Za-z],?\s+)?--([a-z][a-z0-9-]*)")


@functools.cache
def sbatch_options() -> frozenset[str]:
    """The long options sbatch knows: from this machine's `sbatch --help` (its version, and
    options SPANK plugins such as pyxis add), parsed once per process; else SLURM 22.05's
    list. Plus the few its man page documents beyond --help."""
    parsed: set[str] = set()
    if shutil.which("sbatch"):
        try:
            done = subprocess.run(["sbatch", "--help"], capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0:
            parsed = {m.group(1) for line in done.stdout.splitlines() if (m := _HELP_OPTION.match(line))}
    if len(parsed) < 20:  # no sbatch, no slurm.conf for it to read, or output we cannot parse
        parsed = set(SBATCH_OPTIONS_22_05)
    return frozenset(parsed) | SBATCH_OPTIONS_MAN_ONLY


def _additional(cfg: Any, res: Resources) -> tuple[dict[str, Any], dict[str, Any]]:
    """launcher.additional, validated: (submitit parameters, other sbatch options)."""
    known = submitit.SlurmExecutor._valid_parameters()
    params: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in dict(cfg.launcher.get("additional") or {}).items():
        full = f"launcher.additional.{key}"
        if not _SBATCH_KEY.match(str(key)):
            raise ConfigError(full, value, "an sbatch option name: lowercase letters, digits, '-', '_'")
        name = str(key).replace("-", "_")
        option = name.replace("_", "-")
        if name in _OWNED_SBATCH:
            raise ConfigError(full, value, f"options ringctl does not set itself ({_OWNED_SBATCH[name]})")
        if name in _REFUSED_SBATCH:
            raise ConfigError(full, value, f"options that leave the job working ({_REFUSED_SBATCH[name]})")
        if name not in _SUBMITIT_ONLY and option not in sbatch_options():
            close = difflib.get_close_matches(option, sorted(sbatch_options()), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(full, value, f"an option `sbatch --help` lists, e.g. mem, comment, reservation, exclude{hint}")
        if value is False:
            raise ConfigError(full, value, f"true (a flag) or a value; to leave the flag off remove the key: ~{full}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(full, value, "a finite number, a string or true")
        if not isinstance(value, (str, int, float, bool)):
            raise ConfigError(full, value, "a string, number or boolean")
        _check_sbatch_value(full, value)
        if name in _GPU_OPTIONS and (name != "gres" or "gpu" in str(value).lower()):
            if res.gpus_per_node:
                raise ConfigError(
                    full, value,
                    f"no second GPU request: launcher.gpus_per_node already asks --gpus-per-node={res.gpus_per_node}; keep one of the two",
                )
            raise ConfigError(
                full, value, "GPUs asked for with launcher.gpus_per_node (ringctl uses GPUs, one rank each, only when it asked for them)"
            )
        if name in known:
            params[name] = value
        else:
            extra[option] = value
    return params, extra


def _root_key() -> str:
    """The setting that names the runs root: the environment wins over the config."""
    return "RINGCTL_RUNS" if os.environ.get("RINGCTL_RUNS") else "launcher.root"


def job_python(cfg: Any) -> str:
    """How each SLURM task starts python (submitit's `python`): launcher.python; else, in a
    container, the image's `python3` (the submitting machine's virtual environment is not
    there); else this interpreter, quoted, as submitit does."""
    value = cfg.launcher.get("python")
    if value is None:
        return "python3" if cfg.launcher.get("container_image") else shlex.quote(sys.executable)
    words = str(value).split()
    if not words or not all(_WORD.fullmatch(w) for w in words):
        raise ConfigError(
            "launcher.python", _shown(value),
            "a command (path or name, with arguments) of letters, digits and _ . / + = : @ % - (each task runs it)",
        )
    return " ".join(words)


def _container_args(cfg: Any) -> list[str]:
    """srun arguments that run every task in the pyxis/enroot container launcher.container_image
    with launcher.container_mounts, plus the runs root at its own path (each task reads its
    job folder by the absolute path the submitting side wrote)."""
    image = cfg.launcher.get("container_image")
    mounts = [str(m) for m in (cfg.launcher.get("container_mounts") or [])]
    if image is None:
        if mounts:
            raise ConfigError("launcher.container_mounts", mounts, "mounts only with launcher.container_image set")
        return []
    if not isinstance(image, str) or image.startswith("-") or not _IMAGE.fullmatch(image):
        raise ConfigError(
            "launcher.container_image", _shown(image),
            "an image as pyxis takes it: [USER@][REGISTRY#]IMAGE[:TAG], or the path of a squashfs file",
        )
    for mount in mounts:
        if not _MOUNT.fullmatch(mount):
            raise ConfigError("launcher.container_mounts", mount, "SRC:DST[:FLAGS] with absolute paths (no ',' or ':' inside a path)")
    root = str(runs_root(cfg.launcher.get("root")))
    if f"{root}:{root}" not in mounts:
        if not _MOUNT.fullmatch(f"{root}:{root}"):
            raise ConfigError(_root_key(), root, "a path pyxis can mount into the container (letters, digits and _ . / + @ = -)")
        mounts.append(f"{root}:{root}")
    return [f"--container-image={image}", f"--container-mounts={','.join(mounts)}"]


def sbatch_parameters(cfg: Any, res: Resources, name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters, validated: every value that reaches the sbatch
    script is one line of checked text (submitit quotes it); setup lines are shell the user
    writes on purpose, so they are only kept to one line each."""
    launcher = cfg.launcher
    params: dict[str, Any] = {
        "job_name": check_name("name", name, NAME_MAX + 16),  # room for a sweep's "sweep-" prefix
        "nodes": res.nodes,
        "ntasks_per_node": res.ranks_per_node,
        "cpus_per_task": cpus_per_task(launcher, res.gpus_per_node),  # null: 8 per GPU rank, else 1
        "time": check_positive_int("launcher.time_min", launcher.get("time_min", 10)),
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos"):
        value = launcher.get(key)
        if value is not None:
            params[key] = _check_slurm_names(f"launcher.{key}", value)
    if launcher.get("constraint") is not None:
        params["constraint"] = _check_sbatch_value("launcher.constraint", launcher.constraint)
    if launcher.get("exclusive"):
        params["exclusive"] = True
    setup = [_check_line("launcher.setup", line) for line in (launcher.get("setup") or [])]
    if setup:
        params["setup"] = setup
    if launcher.get("array_parallelism") is not None:
        params["array_parallelism"] = check_positive_int("launcher.array_parallelism", launcher.array_parallelism)
    srun_args = _container_args(cfg)
    if srun_args:
        params["srun_args"] = srun_args
    job_python(cfg)  # checked here too: validate() passes through this function
    distribution = cfg.topology.get("distribution")
    extra: dict[str, Any] = {}
    if distribution:
        extra["distribution"] = _check_sbatch_value("topology.distribution", distribution)
    more, more_extra = _additional(cfg, res)
    params.update(more)
    extra.update(more_extra)
    if extra:
        params["additional_parameters"] = extra
    return params


def _check_workload(work: Any) -> None:
    """Bounds the planner does not know (sizes are the planner's `Workload`): the train and
    timing settings that otherwise fail minutes into the job (lr=-1, checkpoint_every=0)."""
    if work.name == "attention":
        check_positive_int("workload.iters", work.get("iters", 1))
        warmup = work.get("warmup", 0)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ConfigError("workload.warmup", warmup, "an integer >= 0")
        tol = work.get("check_tol", 1e-9)
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
            raise ConfigError("workload.check_tol", tol, "a finite number > 0")
    if work.name == "infer":
        _check_infer(work)
    if work.name == "train":
        check_positive_int("workload.steps", work.steps)
        check_positive_int("workload.vocab", work.vocab)
        check_positive_int("workload.layers", work.get("layers", 1))
        check_positive_int("workload.checkpoint_every", work.get("checkpoint_every", 1))
        lr = work.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError("workload.lr", lr, "a finite number > 0")


def _check_infer(work: Any) -> None:
    """The inference session's settings (ringctl.workloads.infer): its turns, the strategy,
    a cache layout, a context that holds the whole session, a checkpoint that exists."""
    from ringctl.infer_plan import check_mode
    from ringctl.placement import CACHE_LAYOUTS

    check_positive_int("workload.prompt", work.prompt)
    check_positive_int("workload.decode", work.decode)
    check_positive_int("workload.vocab", work.vocab)
    check_positive_int("workload.layers", work.layers)
    turns = list(work.turns)
    for i, count in enumerate(turns):
        check_positive_int(f"workload.turns[{i}]", count)
    check_mode(work.mode, "workload.mode")
    if work.layout not in CACHE_LAYOUTS:
        raise ConfigError("workload.layout", work.layout, f"{' | '.join(CACHE_LAYOUTS)} (how the KV cache places each turn)")
    if not work.causal:
        raise ConfigError("workload.causal", work.causal, "true (a language model's cache is causal)")
    total = work.prompt + sum(turns) + work.decode * (1 + len(turns)) - 1
    if total > work.seq_len:
        raise ConfigError(
            "workload.seq_len", work.seq_len,
            f">= {total}: the session puts prompt {work.prompt} + turns {turns} + {work.decode} generated "
            "tokens after each (but the last) in the context",
        )  # fmt: skip
    if work.get("checkpoint"):
        if not Path(str(work.checkpoint)).is_file():
            raise ConfigError("workload.checkpoint", str(work.checkpoint), "a train job's checkpoint file (runs/.../checkpoints/step_*.pt), or null")
        import torch

        from ringctl.workloads.infer import build_model

        try:  # what every rank will load: refuse a checkpoint of another shape before submitting
            build_model(work, torch.device("cpu"))
        except ValueError as err:
            raise ConfigError("workload.checkpoint", str(work.checkpoint), "a checkpoint of this model's shape", str(err)) from err


def secret_values(environ: Any = None) -> dict[str, str]:
    """Environment variables holding secrets (WANDB_API_KEY, *TOKEN*, *SECRET*, *KEY*,
    *PASSWORD*): name -> value. Jobs read them from the environment; none is ever written."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if SECRET_ENV.search(k) and len(v) >= _SECRET_MIN_LEN}


def _check_no_secrets(cfg: Any) -> None:
    """Refuse a config that holds a secret of the environment (`${oc.env:WANDB_API_KEY}`, a
    pasted token): the config goes into submitit's pickles and results.json. The message
    names the key and the variable, never the secret."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    secrets = secret_values()
    if not secrets:
        return
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(str(getattr(exc, "full_key", "") or "config"), "?", str(exc).splitlines()[0]) from None

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}[{i}]")
        elif isinstance(node, str):
            for env, secret in secrets.items():
                if secret in node:
                    raise ConfigError(
                        path, f"<the value of ${env}>",
                        "no secret in the config: it would be written into the job folder; jobs read secrets from the environment",
                    )

    walk(tree, "")


def validate(cfg: Any) -> Resources:
    """Every check that can fail before submission; raises ConfigError naming the key.

    It builds what the job builds (the topology the ranks will discover, the RingPlan and
    its Workload, through the same functions), so a config that validates is one that runs.
    """
    from ringctl.job import planned_topology
    from ringctl.plan import check_seq_len, plan_from_config

    check_name("name", cfg.get("name", "ringctl"))
    res = resources(cfg)
    _check_choice("wandb.mode", cfg.wandb.mode, WANDB_MODES)
    if cfg.wandb.mode == "online" and not os.environ.get("WANDB_API_KEY"):
        raise ConfigError("wandb.mode", "online", "offline | disabled, or set WANDB_API_KEY in the environment")
    work = cfg.workload
    _check_workload(work)
    plan, workload = plan_from_config(planned_topology(cfg, res), cfg.topology, cfg.workload)
    check_memory(cfg, res, plan, workload)
    if work.name == "attention" and work.get("check"):
        check_seq_len(work.check_seq_len, plan.layout, plan.world_size, key="workload.check_seq_len")
    if work.name == "custom":
        _check_entry(str(work.entry))
    check_positive_int("launcher.init_timeout_s", cfg.launcher.get("init_timeout_s", 120))
    max_requeues(cfg)
    _signal_delay_s(cfg)
    if cfg.launcher.get("heartbeat_timeout_s") is not None:
        check_positive_int("launcher.heartbeat_timeout_s", cfg.launcher.heartbeat_timeout_s)
    if cfg.launcher.get("array_parallelism") is not None:
        check_positive_int("launcher.array_parallelism", cfg.launcher.array_parallelism)
    if res.kind == "slurm":
        sbatch_parameters(cfg, res, str(cfg.get("name", "ringctl")))
    else:
        for key in ("container_image", "container_mounts", "python"):
            if cfg.launcher.get(key):
                raise ConfigError(
                    f"launcher.{key}", cfg.launcher.get(key),
                    f"unset for local processes (it applies to SLURM jobs; this one runs as launcher.kind={res.kind})",
                )
    _check_no_secrets(cfg)
    return res


def check_memory(cfg: Any, res: Resources, plan: Any, workload: Any) -> Any:
    """Refuse (ConfigError on workload.seq_len, naming every key that drives the peak) a job
    whose predicted peak per rank, one ring_attention fwd+bwd with its input shards
    (ringctl.memory), exceeds topology.memory_per_rank_GB; the MemoryCheck otherwise.
    GPU ranks are priced with the Triton kernels, CPU ranks with the torch block path and
    the threads the job will give each rank."""
    from ringctl.memory import check_plan_memory, memory_refusal
    from ringctl.topology import Topology

    limit = Topology.from_config(cfg.topology).memory_per_rank_bytes
    if res.gpus_per_node > 0:
        impl, threads = "triton", cpus_per_task(cfg.launcher, res.gpus_per_node)
    elif res.kind == "slurm":
        impl, threads = "torch", cpus_per_task(cfg.launcher, 0)
    else:  # local: every rank on this machine, cores shared (ringctl.job.choose_threads)
        impl, threads = "torch", cfg.launcher.get("cpus_per_task") or max(1, len(os.sched_getaffinity(0)) // res.world_size)
    check = check_plan_memory(plan, workload, limit, block_impl=impl, cpu_threads=int(threads))
    error = memory_refusal(check, workload.seq_len)
    if error is not None:
        raise error
    return check


def _check_entry(entry: str) -> None:
    """`module:function`, importable here the way the job imports it (from the directory
    `ringctl launch` runs in, else installed): ringctl.workloads.custom.check_entry."""
    from ringctl.workloads.custom import check_entry

    check_entry(entry)


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
        self._made_root = not root.exists()  # a failed first submission removes it again

    def executor(self, folder: Path, cfg: Any, res: Resources, name: str) -> submitit.Executor:
        raise NotImplementedError

    def _executor(self, folder: Path, cfg: Any, res: Resources, name: str) -> submitit.Executor:
        """The subclass's executor; under SLURM with the job's python (launcher.python)."""
        executor = self.executor(folder, cfg, res, name)
        if isinstance(executor, submitit.SlurmExecutor):
            executor.python = job_python(cfg)
        return executor

    def new_folder(self, name: str, taken: set[Path] | None = None) -> Path:
        """runs/<time>-<name>; the job folders (one per job id) go inside it."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = self.root / f"{stamp}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}"
        folder, n = base, 1
        while folder.exists() or folder in (taken or ()):
            folder, n = Path(f"{base}-{n}"), n + 1
        return folder

    @staticmethod
    def _groups(points: list[tuple[Any, Resources]]) -> list[list[int]]:
        """Point indices per submission: points with equal resources and sbatch options share one."""
        groups: dict[str, list[int]] = {}
        for i, (cfg, res) in enumerate(points):
            groups.setdefault(_submission_key(cfg, res), []).append(i)
        return list(groups.values())

    def submit(
        self, points: list[tuple[Any, Resources]], name: str, overrides: list[tuple[str, ...]] | None = None
    ) -> list[Submitted]:
        """Submit validated points (each a config and the Resources `validate` returned for
        it) all at once: under SLURM one job array per set of points that share resources
        and sbatch options (one array for a usual sweep). Every job that reached the
        scheduler is recorded in the index, or printed when the index cannot be written."""
        cfgs = [cfg for cfg, _ in points]
        overrides = overrides or [() for _ in cfgs]
        submitted: dict[int, Submitted] = {}
        try:
            for indices in self._groups(points):
                jobs = self._submit_batch([cfgs[i] for i in indices], points[indices[0]][1], name)
                for i, job in zip(indices, jobs):
                    submitted[i] = Submitted(job, Path(str(job.paths.folder)), name, self.kind, tuple(overrides[i]))
        except SubmissionError:
            self._record([submitted[i] for i in sorted(submitted)])  # an earlier array went through
            raise
        out = [submitted[i] for i in range(len(cfgs))]
        self._record(out)
        return out

    def _record(self, submitted: list[Submitted]) -> None:
        """record(), or, when the index cannot be written (a full disk right after sbatch),
        each job's id and folder on stderr with how to follow it: never a job lost silently."""
        if not submitted:
            return
        with contextlib.suppress(OSError):  # the per-user index is a convenience: never fatal
            record(user_index_root(), submitted, self.kind)
        try:
            record(self.root, submitted, self.kind)
        except OSError as exc:
            print(
                f"ringctl launch: warning: could not add {len(submitted)} submitted job(s) to the index "
                f"{self.root / INDEX_NAME} ({exc.strerror or exc}); follow them by folder:",
                file=sys.stderr,
            )
            for item in submitted:
                print(f"  job {item.job_id}: {item.folder}   (ringctl status {item.folder})", file=sys.stderr)

    def _submit_batch(self, cfgs: list[Any], res: Resources, name: str) -> list[submitit.Job]:
        from ringctl.job import run_job

        base = self.new_folder(name)
        executor = self._executor(base / "%j", cfgs[0], res, name)
        payloads = [job_payload(cfg, res) for cfg in cfgs]
        said = io.StringIO()  # submitit prints sbatch's stderr, then raises it: keep one copy
        try:
            with self.quiet(), contextlib.redirect_stderr(said), executor.batch():
                jobs = [executor.submit(run_job, payload) for payload in payloads]
        except submitit.core.utils.FailedJobError as exc:
            self._remove(base)
            cause, user_input = sbatch_failure(str(exc) or said.getvalue())
            what = f"{self.kind} submission failed"
            if self.kind == "slurm":
                what = "sbatch refused the job" if user_input else "sbatch failed"
            raise SubmissionError(f"{what}: {cause}", user_input) from exc
        except OSError as exc:
            self._remove(base)
            raise SubmissionError(f"{self.kind} submission failed: {exc}") from exc
        with contextlib.suppress(OSError):  # submitit makes the template folder itself; the
            (base / "%j").rmdir()  # job folders (one per id) hold everything, so drop it if empty
        return jobs

    def _remove(self, base: Path) -> None:
        """Nothing was submitted: leave no folder (nor the runs root, if this launch made it)."""
        shutil.rmtree(base, ignore_errors=True)
        if self._made_root:
            with contextlib.suppress(OSError):
                self.root.rmdir()  # only when empty

    def quiet(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def dry_run(self, points: list[tuple[Any, Resources]], name: str) -> list[tuple[list[int], Path, str | None]]:
        """What `submit` would send, sending and writing nothing: per submission (one job, or
        one array) its point indices, its job folder pattern and, under SLURM, the sbatch
        script submitit would write, made by the same executor `submit` uses."""
        out: list[tuple[list[int], Path, str | None]] = []
        taken: set[Path] = set()
        for indices in self._groups(points):
            cfg, res = points[indices[0]]
            base = self.new_folder(name, taken)
            taken.add(base)
            text = self._script(base / "%j", cfg, res, name, len(indices)) if self.kind == "slurm" else None
            out.append((indices, base / "%j", text))
        return out

    def _script(self, folder: Path, cfg: Any, res: Resources, name: str, count: int) -> str:
        from submitit.slurm.slurm import _make_sbatch_string

        executor = self._executor(folder, cfg, res, name) if shutil.which("srun") else None
        if isinstance(executor, submitit.SlurmExecutor):
            params, command = dict(executor.parameters), executor._submitit_command_str
        else:  # submitit's SlurmExecutor refuses to exist without srun: the same parts by hand
            params = resilience_parameters(cfg, sbatch_parameters(cfg, res, name))
            command = " ".join([job_python(cfg), "-u -m submitit.core._submit", shlex.quote(str(folder))])
        if count > 1:  # what submitit's batch() adds for an array
            params["map_count"] = count
        return _make_sbatch_string(command=command, folder=folder, **params)


def job_payload(cfg: Any, res: Resources) -> dict[str, Any]:
    """What each task receives (pickled by submitit): the resolved config plus the Resources."""
    from omegaconf import OmegaConf

    payload = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    payload["resources"] = asdict(res)  # what the job needs to know of this submission
    return payload


#: SLURM's words (lowercase) for refusals caused by what was asked -> the settings that ask it
_INPUT_CAUSES = (
    ("invalid partition", "launcher.partition"),
    ("not permitted to use this partition", "launcher.partition"),
    ("invalid account", "launcher.account"),
    ("invalid qos", "launcher.qos"),
    ("invalid feature", "launcher.constraint"),
    ("invalid generic resource", "launcher.gpus_per_node, launcher.additional.gres"),
    ("invalid trackable resource", "launcher.additional"),
    ("time limit", "launcher.time_min"),
    ("node configuration is not available", "topology.nodes, topology.ranks_per_node, launcher.cpus_per_task"),
    ("node count specification invalid", "topology.nodes"),
    ("more processors requested than permitted", "topology.ranks_per_node, launcher.cpus_per_task"),
    ("memory required by task is not available", "launcher.additional.mem"),
    ("invalid wckey", "launcher.additional.wckey"),
    ("reservation", "launcher.additional.reservation"),
    ("invalid job array", "launcher.array_parallelism"),
    ("qos policy", "launcher.account, launcher.qos, launcher.time_min"),
    ("invalid node name", "launcher.additional.nodelist, launcher.additional.exclude"),
    ("dependency", "launcher.additional.dependency"),
    ("access/permission denied", "launcher.partition, launcher.account"),
    ("unrecognized option", "launcher.additional"),
    ("invalid option", "launcher.additional"),
    ("invalid --", "launcher.additional"),
)


def sbatch_failure(text: str) -> tuple[str, bool]:
    """sbatch's error output as one line, and whether the user's input caused it: SLURM's
    "Batch job submission failed: <cause>" when it says one, else its last error line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = next((line.split("submission failed:", 1)[1].strip() for line in lines if "submission failed:" in line), "")
    if not cause:
        errors = [line for line in lines if "error" in line.lower()]
        cause = (errors or lines or ["no output"])[-1]
        cause = re.sub(r"^(sbatch: )?(error: )?", "", cause)
    low = text.lower()
    for fragment, keys in _INPUT_CAUSES:
        if fragment in low:
            return f"{cause} (check {keys})", True
    return cause, False


def preflight(script: str) -> tuple[bool, str, bool]:
    """`sbatch --test-only` on a rendered script: (accepted, SLURM's answer on one line,
    whether a refusal is the user's input). Nothing is queued and nothing written but a
    temporary copy of the script."""
    if not shutil.which("sbatch"):
        return False, "sbatch is not on PATH (no SLURM client here)", False
    with tempfile.NamedTemporaryFile("w", prefix="ringctl-preflight-", suffix=".sbatch") as file:
        file.write(script)
        file.flush()
        try:
            done = subprocess.run(
                ["sbatch", "--test-only", file.name], capture_output=True, text=True, timeout=60, check=False
            )
        except subprocess.TimeoutExpired:
            return False, "sbatch --test-only did not answer within 60 s (is slurmctld up?)", False
    said = done.stderr + done.stdout
    if done.returncode == 0:
        found = re.search(r"to start at (\S+) using (\d+) processors on nodes (\S+) in partition (\S+)", said)
        if found:
            start, cpus, nodes, partition = found.groups()
            return True, f"would start at {start} on nodes {nodes} (partition {partition}, {cpus} CPUs)", False
        return True, " ".join(said.split()) or "accepted", False
    cause, user_input = sbatch_failure(said)
    return False, cause, user_input


def show_dry_run(
    launcher: Launcher, points: list[tuple[Any, Resources]], name: str,
    overrides: list[tuple[str, ...]] | None = None, check: bool = False,
) -> int:
    """`ringctl launch --dry-run` (and `--preflight`: check=True asks sbatch --test-only):
    print each point's composed config as the job gets it, then what would be submitted (the
    sbatch script, or the local processes and their virtual nodes). Submits nothing and
    makes no folder. Returns the exit code: 0, or a refused preflight's 2 (the user's input)
    or 1."""
    from omegaconf import OmegaConf

    from ringctl.job import planned_topology
    from ringctl.plan import plan_from_config

    print(f"# ringctl launch --{'preflight' if check else 'dry-run'}: nothing submitted, no folder made")
    for i, (cfg, res) in enumerate(points):
        shown = " ".join((overrides or [()] * len(points))[i]) or "(defaults)"
        title = f"point {i + 1} of {len(points)}: {shown}" if len(points) > 1 else shown
        print(f"# config: {title}")
        print(OmegaConf.to_yaml(job_payload(cfg, res)), end="")
    code = 0
    for indices, folder, text in launcher.dry_run(points, name):
        which = f"points {', '.join(str(i + 1) for i in indices)}: " if len(points) > 1 else ""
        if text is None:
            cfg, res = points[indices[0]]
            plan, _ = plan_from_config(planned_topology(cfg, res), cfg.topology, cfg.workload)
            nodes = res.world_size // (res.virtual_node_size or res.world_size)
            print(
                f"# {which}local processes: {res.world_size} ranks on this machine "
                f"({'GPUs' if res.gpus_per_node else 'CPU, gloo'}), {nodes} virtual node(s) x "
                f"{res.virtual_node_size or res.world_size} ranks; job folder {folder}"
            )
            print(f"# ring {plan.algorithm}: ring order {list(plan.ring_order)}; node of each rank {list(plan.rank_to_node)}")
            if check:
                print("# preflight: local processes; no scheduler to ask")
            continue
        jobs = f"one job array of {len(indices)}" if len(indices) > 1 else "one job"
        print(f"# {which}sbatch script ({jobs}); submitit writes it as {folder}/<job id>_submission.sh")
        print(text, end="" if text.endswith("\n") else "\n")
        if check:
            accepted, answer, user_input = preflight(text)
            if accepted:
                print(f"# preflight: accepted: {answer}")
            else:
                print(f"ringctl launch: preflight: sbatch --test-only refused the job: {answer}", file=sys.stderr)
                code = max(code, 2 if user_input else 1)
    return code


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


#: seconds the other tasks of a job get once its first task has exited (srun --wait, and
#: the local controller's grace): a stopped or hung rank cannot keep a failed job alive
TASK_EXIT_GRACE_S = 15


def max_requeues(cfg: Any) -> int:
    """launcher.max_requeues: how often a job may requeue itself after the warning signal
    (time limit, preemption); 0 never. Default 3."""
    from ringctl.job import DEFAULT_MAX_REQUEUES

    value = cfg.launcher.get("max_requeues", DEFAULT_MAX_REQUEUES)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError("launcher.max_requeues", value, "an integer >= 0")
    return value


def _signal_delay_s(cfg: Any) -> int | None:
    """launcher.signal_delay_s: seconds before the time limit that the warning signal
    (USR2) comes; None: submitit's default (90)."""
    value = cfg.launcher.get("signal_delay_s")
    if value is None:
        return None
    return check_positive_int("launcher.signal_delay_s", value)


def resilience_parameters(cfg: Any, params: dict[str, Any]) -> dict[str, Any]:
    """What ringctl adds to the sbatch parameters so jobs survive and fail fast: --requeue
    (requeued after a node failure or preemption, not failed), srun --wait (the other
    tasks get TASK_EXIT_GRACE_S once one ended, then SLURM kills them), the warning signal's
    delay. Returns the updated copy of `params`."""
    out = dict(params)
    out["srun_args"] = [*(params.get("srun_args") or []), f"--wait={TASK_EXIT_GRACE_S}"]
    extra = dict(params.get("additional_parameters") or {})
    if "no-requeue" not in extra and "no_requeue" not in extra:
        extra.setdefault("requeue", True)
    out["additional_parameters"] = extra
    delay = _signal_delay_s(cfg)
    if delay is not None:
        out["signal_delay_s"] = delay
    return out


class SlurmLauncher(Launcher):
    """sbatch through submitit; several configs become one job array. The job is submitit's
    Checkpointable ringctl.job.run_job: requeued on the warning signal (up to
    launcher.max_requeues times), on `scontrol requeue` or a node failure, it resumes from
    its job folder."""

    kind = "slurm"

    def executor(self, folder: Path, cfg: Any, res: Resources, name: str) -> submitit.Executor:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues(cfg))
        executor.update_parameters(**resilience_parameters(cfg, sbatch_parameters(cfg, res, name)))
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
        executor = _LocalExecutor(folder=folder, max_num_timeout=max_requeues(cfg))
        params: dict[str, Any] = {
            "tasks_per_node": res.world_size,
            "timeout_min": check_positive_int("launcher.time_min", cfg.launcher.get("time_min", 10)),
            "gpus_per_node": res.gpus_per_node,
        }
        delay = _signal_delay_s(cfg)
        if delay is not None:
            params["signal_delay_s"] = delay
        setup = list(cfg.launcher.get("setup") or [])
        if setup:
            params["setup"] = setup
        executor.update_parameters(**params)
        return executor


class _LocalExecutor(submitit.LocalExecutor):
    """submitit's LocalExecutor with ringctl's controller (ringctl.local_controller) in a
    session of its own: `ringctl cancel` can signal the job's whole process group, which a
    launch started in the background (`&`, where SIGINT is ignored) otherwise never stops."""

    def _submit_command(self, command: str) -> submitit.LocalJob:
        ntasks = self.parameters.get("tasks_per_node", 1)
        gpus = range(self.parameters.get("gpus_per_node", 0))
        env = dict(os.environ)
        env.update(  # what submitit's Controller reads (submitit.local.local.start_controller)
            SUBMITIT_LOCAL_NTASKS=str(ntasks),
            SUBMITIT_LOCAL_COMMAND=command,
            SUBMITIT_LOCAL_TIMEOUT_S=str(int(60 * self.parameters.get("timeout_min", 2.0))),
            SUBMITIT_LOCAL_SIGNAL_DELAY_S=str(int(self.parameters.get("signal_delay_s", 30))),
            SUBMITIT_LOCAL_NODEID="0",
            SUBMITIT_LOCAL_JOB_NUM_NODES="1",
            SUBMITIT_STDERR_TO_STDOUT="",
            SUBMITIT_EXECUTOR="local",
            CUDA_VISIBLE_DEVICES=",".join(str(k) for k in gpus),
            SUBMITIT_LOCAL_WITH_SHELL="1" if self.parameters.get("setup") else "",
        )
        env.setdefault("RINGCTL_TASK_EXIT_GRACE_S", str(TASK_EXIT_GRACE_S))
        cmd: Any = [sys.executable, "-m", "ringctl.local_controller", str(self.folder)]
        setup = list(self.parameters.get("setup") or [])
        if setup:
            cmd = " && ".join([*setup, shlex.join(cmd)])  # the shell stays: submitit's job id is its pid
        process = subprocess.Popen(cmd, shell=bool(setup), env=env, start_new_session=True)
        return submitit.LocalJob(folder=self.folder, job_id=str(process.pid), process=process, tasks=list(range(ntasks)))


def check_runs_root(cfg_root: str | None = None) -> Path:
    """The runs root, checked before anything is submitted: a folder (or one that can be made)
    where a file can be written, with MIN_FREE_BYTES free. An unwritable or full runs root
    fails here with the key that names it, not after sbatch (a job whose folder cannot be
    written runs blind, and one missing from the index cannot be followed by id)."""
    key = _root_key()
    given = os.environ.get("RINGCTL_RUNS") or cfg_root or "runs"
    if _CONTROL.search(str(given)):
        raise ConfigError(key, given, "a path without newlines or control characters")
    root = runs_root(cfg_root)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, str(root), f"a folder that can be made ({existing} is not a folder)")
    try:  # a probe file, deleted at once: the real test of permissions, read-only mounts, quotas
        fd, probe = tempfile.mkstemp(prefix=".ringctl-probe-", dir=existing)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise ConfigError(key, str(root), f"a writable folder (writing in {existing}: {exc.strerror or exc})") from None
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(
            key, str(root), f"a folder with at least {MIN_FREE_BYTES >> 20} MiB free ({existing} has {free >> 10} KiB: the disk is full)"
        )
    return root


def make_launcher(res: Resources, root: str | None = None) -> Launcher:
    """The launcher for validated Resources (`launcher.kind`, auto already resolved), its
    runs root checked first (check_runs_root)."""
    folder = check_runs_root(root)
    return SlurmLauncher(folder) if res.kind == "slurm" else LocalLauncher(folder)


# ---- the job index: job id -> folder, so job control works from any shell ----------------

_INDEX_KEYS = ("job_id", "folder", "kind")
_warned: set[tuple[str, int, str]] = set()


def record(root: Path, submitted: list[Submitted], kind: str) -> None:
    """Append the submitted jobs to <root>/index.jsonl as whole lines: one write under an
    exclusive flock (concurrent launches never interleave), after closing a torn last line
    that a crash left (so it cannot swallow ours), undone if the write fails (a full disk
    leaves the index as it was). Raises OSError when it cannot write."""
    root.mkdir(parents=True, exist_ok=True)
    data = "".join(
        json.dumps({
            "job_id": item.job_id, "folder": str(item.folder), "kind": kind,
            "name": item.name, "overrides": list(item.overrides), "submitted": time.time(),
            **_controller_identity(item, kind),
        }) + "\n"
        for item in submitted
    ).encode()
    with open(root / INDEX_NAME, "a+b") as index:
        fcntl.flock(index, fcntl.LOCK_EX)
        try:
            size = index.seek(0, os.SEEK_END)
            if size:
                index.seek(size - 1)
                if index.read(1) != b"\n":
                    data = b"\n" + data
            try:
                index.write(data)
                index.flush()
                os.fsync(index.fileno())
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(index.fileno(), size)
                raise
        finally:
            fcntl.flock(index, fcntl.LOCK_UN)


def _controller_identity(item: Submitted, kind: str) -> dict[str, Any]:
    """A local job's controller: its pid (the job id, also its process group and session)
    and the kernel's start time of that pid, so `ringctl cancel` signals this job's
    processes and never a later process that reuses the pid."""
    from ringctl.health import process_start_time

    if kind != "local" or not item.job_id.isdigit():
        return {}
    return {"pid": int(item.job_id), "pid_start": process_start_time(int(item.job_id))}


def read_index(root: Path) -> list[dict[str, Any]]:
    """All recorded jobs, oldest first (a job id recorded twice: the later entry wins).

    A line that is not a job record (torn by a crash or a full disk, edited by hand) is
    skipped with one warning naming the file and line; the other jobs stay reachable."""
    path = root / INDEX_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:  # not a file, unreadable: job folders still work as job names
        _warn_once((str(path), 0, ""), f"ringctl: warning: cannot read {path} ({exc.strerror or exc}); give jobs by folder")
        return []
    entries = []
    for number, line in enumerate(raw.decode(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in _INDEX_KEYS):
            _warn_once((str(path), number, line), f"ringctl: warning: {path} line {number} is not a job record, skipped: {_shown(line)!r}")
            continue
        entries.append(entry)
    latest = {e["job_id"]: e for e in entries}
    return sorted(latest.values(), key=lambda e: float(e.get("submitted") or 0))


def _warn_once(key: tuple[str, int, str], message: str) -> None:
    """One warning per bad index line per process (a command reads the index more than once)."""
    if key not in _warned:
        _warned.add(key)
        print(message, file=sys.stderr)
