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

from functools import cache, partial
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


def _posts_worker(rank: int, world: int, spec: int) -> list[tuple[str, list[tuple[int | None, int | None, int]]]]:
    """Every RingComm.hops call of one TokenRing forward + backward (SPECS[spec]): phase
    and (send_to, recv_from, tag) per hop, in posting order."""
    import torch

    from ringctl.ring import comm, ring_attention

    posts: list[tuple[str, list[tuple[int | None, int | None, int]]]] = []
    hops = comm.RingComm.hops

    def recording(self: Any, specs: Any) -> Any:
        posts.append((self.phase, [(s[1], s[2], s[3]) for s in specs]))
        return hops(self, specs)

    comm.RingComm.hops = recording  # type: ignore[method-assign]
    try:  # the pool's next call runs in this process: put the method back
        plan = SPECS[spec].plan("contiguous", "tokenring")
        gen = torch.Generator().manual_seed(rank)
        q, k, v, dout = (torch.randn(1, 4, 2, 8, generator=gen, dtype=torch.float64) for _ in range(4))
        leaves = [x.requires_grad_() for x in (q, k, v)]
        torch.autograd.grad(ring_attention(*leaves, layout="contiguous", plan=plan), leaves, dout)
    finally:
        comm.RingComm.hops = hops  # type: ignore[method-assign]
    return posts


@pytest.mark.parametrize("spec", [2, 3], ids=["flat-1x1x1", "hierarchical-1x1x1"])
def test_partial_receives_are_posted_with_the_steps_query_hop(spec: int) -> None:
    """A partial's receive goes out with its step's query hop, before any of that post's
    sends (RingComm.hops posts receives first), so the owner's "receive ready" notice does
    not wait behind its own query block on the stream to the holder: the holder sends the
    partial as soon as it is computed, back while the queries go on. On three ranks, per
    phase: step 0 (own queries) the query hop alone; step 1 the hop and a receive from the
    next rank, then the partial sent to the previous one; step 2 (last: no hop) a receive
    from the previous rank, then the partial sent to the next one. The hierarchical plan
    of three one-rank nodes posts the same: each leaf step starts an outer step, so its
    receive goes with the outer hop (its inner rings of one post nothing)."""
    plan = SPECS[spec].plan("contiguous", "tokenring")
    for rank, posts in enumerate(run_workers(partial(_posts_worker, spec=spec), 3)):
        nxt, prev = (plan.ring_order[(plan.position(rank) + d) % 3] for d in (1, -1))
        for phase in ("forward", "backward"):
            got = [specs for p, specs in posts if p == phase]
            hop, owner = (nxt, prev), 16  # the query block's peers; owner partials' tag
            tags = {tag for specs in got for _s, _r, tag in specs if tag != owner}
            assert len(tags) == 1, (rank, phase, got)
            [q_tag] = tags
            assert got == [
                [(*hop, q_tag)],
                [(*hop, q_tag), (None, nxt, owner)],
                [(prev, None, owner)],
                [(None, prev, owner)],
                [(nxt, None, owner)],
            ], (rank, phase, got)
