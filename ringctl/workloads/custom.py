"""custom: the user's `module:function`, called on every rank as `fn(cfg, ctx)`.

ctx is a ringctl.job.RunContext (the README lists every field): the process group, the
RingPlan and this rank's ring position, the device, the job folder, a W&B logger and
`ctx.ring_attention(q, k, v)` bound to the group, plan and layout. Arguments come from
`+workload.args.NAME=VALUE` (cfg.workload.args).

Where the module comes from: the directory `ringctl launch` ran in first (as `python -m`
would; the job runs in other processes, maybe on other nodes sharing the filesystem: under
SLURM that directory is SLURM_SUBMIT_DIR, locally the job's own working directory), then
the installed packages and PYTHONPATH.

What goes into results.json (rank 0's): `custom`, the function's return value (as is when
JSON can hold it, else its repr); `attention_calls`, the shapes `ctx.ring_attention` was
called with and how often; and `plan` with the cost model's predictions for the most
called of those shapes, or, when the code made no call through ctx.ring_attention,
the plan without predictions and `predictions: unknown` (the config's workload sizes are
not the model's, so they are not priced).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ringctl.errors import ConfigError

ENTRY_FORM = "module:function (e.g. mymodel:main for mymodel.py in the directory you launch from)"


def launch_dir(environ: Any = os.environ) -> Path:
    """The directory `ringctl launch` ran in: SLURM_SUBMIT_DIR in a SLURM job (sbatch runs
    in the submitting process's directory), else the current directory (local jobs inherit it)."""
    return Path(environ.get("SLURM_SUBMIT_DIR") or os.getcwd()).resolve()


def _split(entry: str) -> tuple[str, str]:
    module, _, function = entry.partition(":")
    if not module or not function.isidentifier() or not all(p.isidentifier() for p in module.split(".")):
        raise ConfigError("workload.entry", entry, ENTRY_FORM)
    return module, function


def _in_dir(directory: Path, module: str) -> bool:
    """Whether `module`'s top-level package or module lies in `directory`."""
    top = module.split(".")[0]
    return (directory / f"{top}.py").is_file() or (directory / top).is_dir()


def use_launch_dir(module: str, directory: Path | None = None) -> Path | None:
    """Put the launch directory first on sys.path when `module` lies in it; returns it then."""
    directory = directory or launch_dir()
    if not _in_dir(directory, module):
        return None
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    return directory


def check_entry(entry: str) -> None:
    """ConfigError unless `entry` names a module importable the way the job will import it
    (from the launch directory, else installed); the function itself is looked up in the job."""
    module, _ = _split(entry)
    use_launch_dir(module)
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigError(
            "workload.entry", entry,
            f"{ENTRY_FORM}; module {module!r} is neither in {launch_dir()} nor installed",
        )


def load_entry(entry: str) -> Callable[[Any, Any], Any]:
    module_name, function = _split(entry)
    use_launch_dir(module_name)
    module = importlib.import_module(module_name)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ConfigError("workload.entry", entry, f"{ENTRY_FORM}; {module_name} has no function {function!r}")
    return fn


class RecordingAttention:
    """ctx.ring_attention, counting the shapes it is called with (for the plan's predictions)."""

    def __init__(self, fn: Callable[..., Any], world_size: int, causal: bool) -> None:
        self.fn = fn
        self.world_size = world_size
        self.causal = causal
        self.calls: Counter[tuple[Any, ...]] = Counter()

    def __call__(self, q: Any, k: Any, v: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(q, "dim", lambda: 0)() == 4 and getattr(k, "dim", lambda: 0)() == 4:
            batch, local, heads, head_dim = (int(n) for n in q.shape)
            dtype = str(q.dtype).removeprefix("torch.")
            causal = bool(kwargs.get("causal", self.causal))
            self.calls[(batch, local * self.world_size, heads, int(k.shape[2]), head_dim, dtype, causal)] += 1
        return self.fn(q, k, v, *args, **kwargs)

    def shapes(self) -> list[dict[str, Any]]:
        """Each distinct call shape (global seq_len), most called first."""
        keys = ("batch", "seq_len", "heads", "kv_heads", "head_dim", "dtype", "causal")
        return [dict(zip(keys, shape), calls=n) for shape, n in self.calls.most_common()]


def plan_record(plan: Any, shapes: list[dict[str, Any]]) -> dict[str, Any]:
    """The plan as results.json keeps it: with predictions for the most called shape the
    cost model can price, else its structure only and `predictions: unknown`."""
    from ringctl.plan import Workload

    for shape in shapes:
        try:
            workload = Workload(**{k: v for k, v in shape.items() if k != "calls"})
            plan.check_seq_len(workload.seq_len)
        except ValueError:  # a dtype or split the model does not price
            continue
        return {**plan.to_dict(workload), "predicted_for": {k: v for k, v in shape.items()}}
    why = (
        "unknown: no ring_attention call went through ctx.ring_attention"
        if not shapes else "unknown: the recorded shapes are not ones the cost model prices"
    )
    return {**plan.to_dict(), "predictions": why}


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def run(cfg: Any, ctx: Any) -> dict[str, Any]:
    fn = load_entry(str(cfg.workload.entry))
    recorder = RecordingAttention(ctx.ring_attention, ctx.world_size, bool(cfg.workload.get("causal", True)))
    ctx.ring_attention = recorder
    value = fn(cfg, ctx)
    shapes = recorder.shapes()
    return {
        "custom": _jsonable(value),
        "entry": {"entry": str(cfg.workload.entry), "file": getattr(sys.modules.get(fn.__module__), "__file__", None)},
        "attention_calls": shapes,
        "plan": plan_record(ctx.plan, shapes),
    }
