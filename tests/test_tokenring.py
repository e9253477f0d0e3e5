"""TokenRing (``plan.direction == "tokenring"``) on real gloo process groups.

Queries travel the ring one way; every partial result (forward: out and lse; backward: dq)
goes straight back to the rank that owns the queries, and dK/dV never move. Outputs and
gradients must match float64 SDPA on the whole sequence (written-out bool mask, math
backend) within 1e-10 / 1e-9, for W = 2..5, every layout, causal and not, GQA, packed
documents and windows, flat and hierarchical plans; the bytes counted per phase, link class
and direction ("next": queries, "prev": partials) must equal
``plan.predicted_bytes(..., by_direction=True)`` exactly. Each world size is spawned once.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
from test_bidirectional import CASES, PASSES_CASE, Case, Spec, _check, exact_with_predicted_bytes

from _dist import run_workers

SPECS = [
    Spec((1, 1), "flat"),
    Spec((2,), "flat", every_case=False),
    Spec((1, 1, 1), "flat"),
    Spec((1, 1, 1), "hierarchical", every_case=False),
    Spec((2, 2), "hierarchical"),
    Spec((3, 2), "flat", every_case=False),  # uneven nodes, cyclic: ring position != rank
    Spec((1, 1, 1, 1, 1), "flat", every_case=False),
]
SHORT_CASES = [CASES[1], CASES[2], CASES[-3]]


def cases_of(spec: Spec) -> list[Case]:
    return CASES if spec.every_case else SHORT_CASES


def _worker(rank: int, world: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for spec in SPECS:
        if spec.world != world:
            continue
        for case in cases_of(spec):
            report[f"{spec.name}-{case.name}"] = _check(rank, spec.plan(case.layout, "tokenring"), case)
    if world == 3:  # several head passes (GQA groups), each its own TokenRing
        from ringctl import memory

        saved, memory.MIN_PASS_WORK = memory.MIN_PASS_WORK, {"torch": 1, "triton": 1}
        try:
            report["passes"] = _check(rank, SPECS[2].plan(PASSES_CASE.layout, "tokenring"), PASSES_CASE)
        finally:
            memory.MIN_PASS_WORK = saved
    return report


@cache
def _results(world: int) -> list[dict[str, Any]]:
    return run_workers(_worker, world)


@pytest.mark.parametrize(
    ("spec", "case"), [(spec, case) for spec in SPECS for case in cases_of(spec)], ids=lambda x: x.name
)
def test_tokenring_matches_sdpa_and_predicted_bytes(spec: Spec, case: Case) -> None:
    for report in exact_with_predicted_bytes([r[f"{spec.name}-{case.name}"] for r in _results(spec.world)]):
        for phase in ("forward", "backward"):  # queries went one way, partials the other
            sent = report["measured"][phase]
            assert sum(sent[link]["next"] for link in sent) > 0 and sum(sent[link]["prev"] for link in sent) > 0


def test_tokenring_with_several_head_passes() -> None:
    exact_with_predicted_bytes([r["passes"] for r in _results(3)])
