"""custom: the user's `pkg.module:fn`, called on every rank as `fn(cfg, ctx)`.

ctx (ringctl.job.RunContext) holds the process group, the RingPlan, this rank's ring
position, the device, the job folder, a W&B logger (`ctx.metrics.log(dict, step)`) and
`ctx.ring_attention(q, k, v)` bound to the group, plan and layout. A dict returned on
rank 0 goes into results.json under "custom".
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Callable


def load_entry(entry: str) -> Callable[[Any, Any], Any]:
    module_name, _, function = entry.partition(":")
    if not module_name or not function:
        raise ValueError(f"workload.entry={entry!r} is invalid; allowed: pkg.module:function")
    module = import_module(module_name)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise ValueError(f"workload.entry={entry!r} is invalid: {module_name} has no callable {function!r}")
    return fn


def run(cfg: Any, ctx: Any) -> dict[str, Any]:
    value = load_entry(str(cfg.workload.entry))(cfg, ctx)
    return {"custom": value if isinstance(value, (dict, list, str, int, float, bool)) or value is None else repr(value)}
