"""Workloads: what a ringctl job runs on every rank, `fn(cfg, ctx) -> dict`.

`attention` times ring_attention and checks it; `train` trains a small LM whose attention
is ring_attention; `infer` runs a multi-turn session with a KV cache sharded over the
ring (pass-KV or pass-Q per turn); `custom` calls the user's `pkg.module:fn`; `calibrate` measures compute
and links for the cost model (`ringctl calibrate`). The returned dict (rank 0's) is merged
into results.json.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any

# workload.name -> module defining `run(cfg, ctx) -> dict`
WORKLOADS = {
    "attention": "ringctl.workloads.attention",
    "train": "ringctl.workloads.train",
    "custom": "ringctl.workloads.custom",
    "calibrate": "ringctl.workloads.calibrate",
    "infer": "ringctl.workloads.infer",
}


def get_workload(name: str) -> Callable[[Any, Any], dict[str, Any]]:
    if name not in WORKLOADS:
        raise ValueError(f"workload.name={name!r} is invalid; allowed: {', '.join(WORKLOADS)}")
    return import_module(WORKLOADS[name]).run
