"""The runtime executes RingPlans: flat in plan order, hierarchical double ring.

Virtual nodes on gloo processes: a Topology with N nodes x L ranks (SLURM block or cyclic
placement, so ring position != rank), a plan from ``make_plan``; each rank passes the shard
of ``plan.position(rank)``. Outputs and gradients must match float64 SDPA on the whole
sequence as tightly as the flat runtime's, and the bytes the comm layer counted per link
class must equal ``plan.predicted_bytes`` exactly, per rank and phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _dist import run_workers
from ringctl.plan import RingPlan, make_plan
from ringctl.ring import LAYOUTS, comm_stats, reset_comm_stats, ring_attention, shard_sequence
from ringctl.topology import Topology, place_ranks

B, HQ, HKV, D, S_LOCAL = 2, 8, 2, 16, 8
FWD_ATOL, GRAD_ATOL = 1e-10, 1e-9


@dataclass(frozen=True)
class PlanSpec:
    ranks_per_node: tuple[int, ...]
    distribution: str
    algorithm: str
    order: str = "node"  # "rank": the topology-blind rank-order ring (baseline)

    @property
    def world(self) -> int:
        return sum(self.ranks_per_node)

    @property
    def name(self) -> str:
        nodes = "x".join(map(str, self.ranks_per_node))
        order = "-rank-order" if self.order == "rank" else ""
        return f"{self.algorithm}-{nodes}-{self.distribution}{order}"

    def plan(self, layout: str) -> RingPlan:
        placement = place_ranks(self.ranks_per_node, self.distribution)
        topology = Topology(self.ranks_per_node, rank_to_node=placement)
        return make_plan(topology, layout=layout, algorithm=self.algorithm, order=self.order)


SPECS = [
    PlanSpec((2, 2), "cyclic", "hierarchical"),
    PlanSpec((2, 2), "block", "hierarchical"),
    PlanSpec((2, 2), "cyclic", "flat"),
    PlanSpec((2, 2), "cyclic", "flat", order="rank"),
    PlanSpec((3, 1), "cyclic", "flat"),  # uneven nodes run flat
    PlanSpec((2, 3), "cyclic", "flat"),
    PlanSpec((3, 3), "cyclic", "hierarchical"),  # 2 nodes x 3 ranks
    PlanSpec((2, 2, 2), "cyclic", "hierarchical"),  # 3 nodes x 2 ranks
    PlanSpec((4, 2), "cyclic", "flat"),
]
WORLDS = sorted({s.world for s in SPECS})


def _inputs(seq: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seq)
    shapes = [(B, seq, HQ, D), (B, seq, HKV, D), (B, seq, HKV, D), (B, seq, HQ, D)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _check(rank: int, plan: RingPlan, causal: bool, dtype: torch.dtype) -> dict[str, Any]:
    """Numerics failure (float64) and measured vs predicted bytes for one run."""
    seq = S_LOCAL * plan.world_size
    q, k, v, dout = _inputs(seq, dtype)
    position = plan.position(rank)

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, position, plan.world_size, layout=plan.layout)

    local = [shard(x).requires_grad_() for x in (q, k, v)]
    reset_comm_stats()
    out = ring_attention(*local, causal=causal, layout=plan.layout, plan=plan)
    grads = torch.autograd.grad(out, local, shard(dout))
    measured = comm_stats()
    nbytes = torch.empty((), dtype=dtype).element_size()
    predicted = {
        phase: {
            link: per_rank[rank]
            for link, per_rank in plan.predicted_bytes(B, seq, HKV, D, nbytes, phase).items()
        }
        for phase in ("forward", "backward")
    }
    failure = None
    if dtype == torch.float64:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        qt, kt, vt = (x.transpose(1, 2) for x in leaves)
        with sdpa_kernel(SDPBackend.MATH):
            ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True).transpose(1, 2)
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        for name, got, want, atol in zip(
            ("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads),
            (FWD_ATOL, GRAD_ATOL, GRAD_ATOL, GRAD_ATOL),
        ):  # fmt: skip
            try:
                torch.testing.assert_close(got.detach(), shard(want.detach()), rtol=0, atol=atol)
            except AssertionError as err:
                failure = f"rank {rank} (position {position}), {name}: {err}"
                break
    return {"failure": failure, "measured": measured, "predicted": predicted}


def _worker(rank: int, world: int) -> dict[str, Any]:
    report = {}
    for spec in SPECS:
        if spec.world != world:
            continue
        for layout in LAYOUTS:
            for causal in (False, True):
                key = f"{spec.name}-{layout}-{'causal' if causal else 'full'}"
                report[key] = _check(rank, spec.plan(layout), causal, torch.float64)
        report[f"{spec.name}-bf16"] = _check(rank, spec.plan("zigzag"), True, torch.bfloat16)
    return report


@cache
def _results(world: int) -> list[dict[str, Any]]:
    return run_workers(_worker, world)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_plan_matches_sdpa_and_predicted_bytes(spec: PlanSpec, layout: str, causal: bool) -> None:
    key = f"{spec.name}-{layout}-{'causal' if causal else 'full'}"
    reports = [r[key] for r in _results(spec.world)]
    failures = [r["failure"] for r in reports if r["failure"]]
    assert not failures, f"{key}: {failures[0]}"
    for rank, report in enumerate(reports):
        assert report["measured"] == report["predicted"], f"{key} rank {rank}"


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_bf16_bytes_count_kv_in_bf16_and_grads_in_float32(spec: PlanSpec) -> None:
    for rank, report in enumerate(_results(spec.world)):
        bf16 = report[f"{spec.name}-bf16"]
        assert bf16["measured"] == bf16["predicted"], f"rank {rank}"


def test_inter_node_bytes_fall_with_topology_awareness() -> None:
    """On 2 nodes x 2 ranks placed cyclically, measured forward inter-node bytes: the
    rank-order ring crosses on all 4 hops, the node-ordered flat ring on 2, the
    hierarchical ring only on its outer hops (N-1 per rank)."""
    results = _results(4)
    kv = 2 * B * S_LOCAL * HKV * D * 8  # one shard's K and V in float64

    def inter(name: str) -> int:
        return sum(r[f"{name}-zigzag-full"]["measured"]["forward"]["inter"] for r in results)

    assert inter("flat-2x2-cyclic-rank-order") == 4 * 3 * kv
    assert inter("flat-2x2-cyclic") == 2 * 3 * kv
    assert inter("hierarchical-2x2-cyclic") == 4 * 1 * kv


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_schedule_visits_every_block_once_and_peers_pair_up(spec: PlanSpec) -> None:
    """Pure schedule check, no processes: the nested levels enumerate every source position
    exactly once per rank, and every send has the matching receive on its peer."""
    import itertools

    from ringctl.ring.schedule import make_schedule

    plan = spec.plan("zigzag")
    schedules = [make_schedule(plan, rank) for rank in range(plan.world_size)]
    for rank, sched in enumerate(schedules):
        assert sched.position == plan.position(rank)
        steps = itertools.product(*(range(level.size) for level in sched.levels))
        assert sorted(sched.source(s) for s in steps) == list(range(plan.world_size))
        for depth, level in enumerate(sched.levels):
            assert schedules[level.send_to].levels[depth].recv_from == rank
            if spec.algorithm == "hierarchical" and depth == 1:  # the inner ring stays on a node
                assert plan.link_class(rank, level.send_to) == "intra" or level.size == 1
