"""ringctl: topology-aware ring attention (context parallelism) as SLURM jobs.

The planner (`Topology`, `RingPlan`, `plan`) has no torch import, so `ringctl plan`
runs anywhere and fast; the runtime (`ring_attention`, `shard_sequence`,
`unshard_sequence`) is imported lazily on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it (imported on first attribute access)
_LAZY = {
    "ring_attention": "ringctl.ring",
    "shard_sequence": "ringctl.ring",
    "unshard_sequence": "ringctl.ring",
    "comm_stats": "ringctl.ring",
    "reset_comm_stats": "ringctl.ring",
    "Topology": "ringctl.topology",
    "LinkClass": "ringctl.topology",
    "RingPlan": "ringctl.plan",
    "make_plan": "ringctl.plan",
    "RingContext": "ringctl.context",
}

__all__ = list(_LAZY)  # a list, not sorted(): linters read __all__ only as a list or tuple


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ringctl' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
