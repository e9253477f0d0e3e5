"""Bidirectional pass-KV (``plan.direction == "bidirectional"``) on real gloo process groups.

The K/V heads split in two lanes that walk the ring in opposite directions in lock-step.
Outputs and gradients must match float64 SDPA on the whole sequence (written-out bool mask,
math backend) as tightly as the one-way ring's, for W = 2..5, every layout, causal and not,
GQA (an odd Hkv gives lanes of unequal width), packed documents and windows, flat and
hierarchical plans. The bytes counted per phase, link class and direction must equal
``plan.predicted_bytes(..., by_direction=True)`` exactly. Each world size is spawned once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _dist import run_workers
from ringctl.errors import ConfigError
from ringctl.plan import LAYOUTS, RingPlan, Workload, lane_kv_heads, make_plan
from ringctl.ring import comm_stats, reset_comm_stats, ring_attention, shard_sequence
from ringctl.ring.schedule import make_schedule
from ringctl.topology import Topology, place_ranks

B, D, S_LOCAL = 1, 8, 8
FWD_ATOL, GRAD_ATOL = 1e-10, 1e-9


@dataclass(frozen=True)
class Spec:
    ranks_per_node: tuple[int, ...]
    algorithm: str
    distribution: str = "cyclic"
    every_case: bool = True  # False: SHORT_CASES only (keeps the module under a minute)

    @property
    def world(self) -> int:
        return sum(self.ranks_per_node)

    @property
    def name(self) -> str:
        return f"{self.algorithm}-{'x'.join(map(str, self.ranks_per_node))}-{self.distribution}"

    def plan(self, layout: str, direction: str = "bidirectional") -> RingPlan:
        placement = place_ranks(self.ranks_per_node, self.distribution)
        topology = Topology(self.ranks_per_node, rank_to_node=placement)
        return make_plan(topology, layout=layout, algorithm=self.algorithm, direction=direction)


SPECS = [
    Spec((1, 1), "flat"),  # two nodes: both lanes share the one peer
    Spec((2,), "flat", every_case=False),
    Spec((1, 1, 1), "flat"),
    Spec((1, 1, 1), "hierarchical", every_case=False),  # outer ring only (L = 1)
    Spec((2, 2), "flat", every_case=False),
    Spec((2, 2), "hierarchical"),  # both levels reversed for lane 1
    Spec((3, 2), "flat"),  # uneven nodes, cyclic: ring position != rank
    Spec((1, 1, 1, 1, 1), "flat", every_case=False),
]
WORLDS = sorted({s.world for s in SPECS})


@dataclass(frozen=True)
class Case:
    layout: str
    causal: bool
    heads: int = 6
    kv_heads: int = 3  # lanes of 2 and 1 heads
    docs: bool = False  # packed documents (cu_seqlens) and a window
    window: tuple[int, int] = (-1, -1)

    @property
    def name(self) -> str:
        docs = "-docs" if self.docs else ""
        window = "" if self.window == (-1, -1) else f"-w{self.window[0]}_{self.window[1]}"
        return f"{self.layout}-{'causal' if self.causal else 'full'}-h{self.heads}kv{self.kv_heads}{docs}{window}"

    def sequence(self, world: int) -> tuple[int, list[int] | None]:
        seq = S_LOCAL * world
        if not self.docs:
            return seq, None
        cu, lengths, i = [0], (5, 1, 9, 3, 14), 0
        while cu[-1] < seq - 3:  # the last tokens are padding
            cu.append(min(seq - 3, cu[-1] + lengths[i % len(lengths)]))
            i += 1
        return seq, cu


CASES = [
    Case(layout, causal, *(heads, 2 if heads == 8 else heads // 2))
    for layout, heads in zip(LAYOUTS, (6, 8, 4, 6), strict=True)
    for causal in (False, True)
]
CASES += [
    Case("docs", True, docs=True),
    Case("zigzag", True, heads=4, kv_heads=4, docs=True, window=(5, -1)),
    Case("striped", False, heads=2, kv_heads=2, window=(3, 2)),
]
PASSES_CASE = Case("docs", True, heads=10, kv_heads=5, docs=True)  # lanes of 3 and 2 heads
# what the other specs run: Hkv 3 one-way vs bidirectional, balanced causal, documents
SHORT_CASES = [CASES[0], CASES[3], CASES[-3]]


def cases_of(spec: Spec) -> list[Case]:
    return CASES if spec.every_case else SHORT_CASES


def written_out(seq: int, cu: list[int] | None, causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """(S, S) bool: query i sees key j, element by element."""
    bounds = cu or [0, seq]
    doc = torch.full((seq,), -1)
    for d, (a, b) in enumerate(itertools.pairwise(bounds)):
        doc[a:b] = d
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    sees = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    if causal:
        sees &= j <= i
    if window[0] >= 0:
        sees &= i - j <= window[0]
    if window[1] >= 0:
        sees &= j - i <= window[1]
    return sees


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, sees: torch.Tensor) -> list[torch.Tensor]:
    """float64 SDPA with the bool mask; rows that see nothing (padding) give 0 and no grad."""
    empty = ~sees.any(1)
    safe = sees | (empty[:, None] & (torch.arange(sees.shape[1]) == 0)[None, :])
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    qt, kt, vt = (x.transpose(1, 2) for x in leaves)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=safe, enable_gqa=True)
    out = out.transpose(1, 2).masked_fill(empty[None, :, None, None], 0.0)
    grads = torch.autograd.grad(out, leaves, dout.masked_fill(empty[None, :, None, None], 0.0))
    return [out.detach(), *grads]


def _check(rank: int, plan: RingPlan, case: Case) -> dict[str, Any]:
    """First numerics failure (None: all within tolerance) and measured vs predicted bytes
    (also tests/test_tokenring.py's: the plan's direction decides what travels)."""
    world = plan.world_size
    seq, cu = case.sequence(world)
    gen = torch.Generator().manual_seed(seq * 7 + case.heads + case.kv_heads)
    shapes = [(B, seq, case.heads, D), (B, seq, case.kv_heads, D), (B, seq, case.kv_heads, D), (B, seq, case.heads, D)]
    q, k, v, dout = (torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)
    want = _reference(q, k, v, dout, written_out(seq, cu, case.causal, case.window))
    position = plan.position(rank)

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, position, world, layout=case.layout, cu_seqlens=cu)

    local = [shard(x).requires_grad_() for x in (q, k, v)]
    reset_comm_stats()
    out = ring_attention(
        *local, causal=case.causal, layout=case.layout, plan=plan, cu_seqlens=cu,
        window_size=case.window,
    )  # fmt: skip
    grads = torch.autograd.grad(out, local, shard(dout))
    measured = comm_stats(by_direction=True)
    predicted = {
        phase: {
            link: {d: per_rank[rank] for d, per_rank in by_dir.items()}
            for link, by_dir in plan.predicted_bytes(
                B, seq, case.kv_heads, D, 8, phase, by_direction=True, heads=case.heads
            ).items()
        }
        for phase in ("forward", "backward")
    }
    failure = None
    for name, got, ref, atol in zip(("out", "dq", "dk", "dv"), (out, *grads), want, (FWD_ATOL, *(GRAD_ATOL,) * 3), strict=True):
        try:
            torch.testing.assert_close(got.detach(), shard(ref), rtol=0, atol=atol)
        except AssertionError as err:
            failure = f"rank {rank} (position {position}), {name}: {err}"
            break
    return {"failure": failure, "measured": measured, "predicted": predicted, "summed": comm_stats()}


def _one_kv_head_error(rank: int, plan: RingPlan) -> str:
    x = torch.zeros(1, S_LOCAL, 2, D, dtype=torch.float64)
    kv = torch.zeros(1, S_LOCAL, 1, D, dtype=torch.float64)
    try:
        ring_attention(x, kv, kv, layout=plan.layout, plan=plan)
    except ValueError as err:
        return str(err)
    return "no error"


def _worker(rank: int, world: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for spec in SPECS:
        if spec.world != world:
            continue
        for case in cases_of(spec):
            report[f"{spec.name}-{case.name}"] = _check(rank, spec.plan(case.layout), case)
        one_way = _check(rank, spec.plan(CASES[0].layout, "one_way"), CASES[0])
        report[f"{spec.name}-one-way"] = one_way
    if world == 3:  # several head passes, each with both lanes (as many as the heads allow)
        from ringctl import memory
        from ringctl.ring.attention import _passes

        saved, memory.MIN_PASS_WORK = memory.MIN_PASS_WORK, {"torch": 1, "triton": 1}
        try:
            case = PASSES_CASE
            report["passes"] = _check(rank, SPECS[2].plan(case.layout), case)
            shape = torch.zeros(1, S_LOCAL, case.heads, D), torch.zeros(1, S_LOCAL, case.kv_heads, D)
            report["passes"]["count"] = len(_passes(*shape, 2))
        finally:
            memory.MIN_PASS_WORK = saved
    report["one-kv-head"] = _one_kv_head_error(rank, SPECS[0].plan("zigzag") if world == 2 else _any(world))
    return report


def _any(world: int) -> RingPlan:
    return next(s for s in SPECS if s.world == world).plan("zigzag")


def exact_with_predicted_bytes(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's ``_check`` report of one case: no numerics failure, and bytes sent per
    phase, class and direction equal to the plan's, on every rank (also test_tokenring's)."""
    failures = [r["failure"] for r in reports if r["failure"]]
    assert not failures, failures[0]
    for rank, report in enumerate(reports):
        assert report["measured"] == report["predicted"], f"rank {rank}"
    return reports


@cache
def _results(world: int) -> list[dict[str, Any]]:
    return run_workers(_worker, world)


@pytest.mark.parametrize(
    ("spec", "case"),
    [(spec, case) for spec in SPECS for case in cases_of(spec)],
    ids=lambda x: x.name,
)
def test_bidirectional_matches_sdpa_and_predicted_bytes(spec: Spec, case: Case) -> None:
    for report in exact_with_predicted_bytes([r[f"{spec.name}-{case.name}"] for r in _results(spec.world)]):
        # each lane really went its way: both directions carried K/V
        assert report["measured"]["forward"]["inter"]["prev"] + report["measured"]["forward"]["intra"]["prev"] > 0


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_bidirectional_sends_the_one_way_bytes_split_by_lane(spec: Spec) -> None:
    """Same K/V bytes in all as one-way, split Hkv 2 : 1 between next and prev (kv=3)."""
    case = CASES[0]
    assert case.kv_heads == 3
    for rank, report in enumerate(_results(spec.world)):
        one_way = report[f"{spec.name}-one-way"]
        assert one_way["failure"] is None
        both = report[f"{spec.name}-{case.name}"]
        for phase in ("forward", "backward"):  # link classes differ: prev may cross nodes
            assert sum(both["summed"][phase].values()) == sum(one_way["summed"][phase].values())
        for phase in ("forward", "backward"):
            nxt = sum(both["measured"][phase][link]["next"] for link in ("intra", "inter"))
            prev = sum(both["measured"][phase][link]["prev"] for link in ("intra", "inter"))
            assert nxt == 2 * prev > 0, f"rank {rank} {phase}"
            assert sum(one_way["measured"][phase][link]["prev"] for link in ("intra", "inter")) == 0


def test_several_head_passes_each_run_both_lanes() -> None:
    """Memory-bounded passes (ringctl.memory.head_passes) split each lane's heads: still
    exact, the same bytes per direction as the plan."""
    for rank, report in enumerate(_results(3)):
        passes = report["passes"]
        assert passes["failure"] is None, passes["failure"]
        assert passes["measured"] == passes["predicted"], f"rank {rank}"
        assert passes["count"] == 2  # min(head passes, heads of lane 1)


@pytest.mark.parametrize("world", WORLDS)
def test_one_kv_head_is_refused_naming_hkv(world: int) -> None:
    for message in (r["one-kv-head"] for r in _results(world)):
        assert "Hkv" in message and "bidirectional" in message, message


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_reversed_lane_visits_every_block_once_and_peers_pair_up(spec: Spec) -> None:
    """No processes: lane 1's reversed levels enumerate every source once per rank, and
    every send of lane 1 has the matching receive on its peer."""
    plan = spec.plan("zigzag")
    schedules = [make_schedule(plan, rank).reversed() for rank in range(plan.world_size)]
    for rank, sched in enumerate(schedules):
        assert sched.lanes == 2
        steps = list(itertools.product(*(range(level.size) for level in sched.levels)))
        assert sorted(sched.source(s) for s in steps) == list(range(plan.world_size))
        if len(steps) > 1:  # after one hop on the last level: the next position's block
            last = sched.levels[-1]
            one = [0] * (len(sched.levels) - 1) + [1]
            digit = (sched.position // last.stride) % last.size
            base = sched.position - digit * last.stride
            assert sched.source(one) == base + (digit + 1) % last.size * last.stride
        for depth, level in enumerate(sched.levels):
            assert schedules[level.send_to].levels[depth].recv_from == rank


def test_planner_refuses_bidirectional_with_one_kv_head() -> None:
    with pytest.raises(ConfigError, match=r"topology\.direction"):
        make_plan(Topology((2,)), direction="sideways")
    with pytest.raises(ValueError, match="kv_heads=1"):
        make_plan(Topology((1, 1, 1)), direction="bidirectional", workload=Workload(kv_heads=1, heads=4))
    auto = make_plan(Topology((1, 1, 1)), direction="auto", workload=Workload(seq_len=96, kv_heads=1, heads=4))
    assert auto.direction != "bidirectional"
    assert lane_kv_heads(5, "bidirectional") == (3, 2)
    assert replace(auto, direction="bidirectional").direction == "bidirectional"


# ---------------------------------------------------------------- the planner's direction model


def _emulated(nodes: int, links: str, per_node: int = 1, nics: int = 1) -> Topology:
    from ringctl.topology import LinkClass

    return Topology(
        (per_node,) * nodes, intra=LinkClass("intra", 0.5, 1000.0),
        inter=LinkClass("inter", 0.0125, 700.0, links), nics_per_node=nics, compute_tflops=0.2,
    )  # fmt: skip


LINK_BOUND = Workload(batch=1, seq_len=7680, heads=8, kv_heads=8, head_dim=64, dtype="float32", causal=False)


@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
@pytest.mark.parametrize("shape", [(3, 1, 1), (4, 1, 1), (2, 2, 1), (3, 2, 1), (2, 8, 8)])
def test_on_a_switch_bidirectional_costs_what_one_way_does_and_auto_picks_the_cheapest(shape: tuple[int, int, int], algorithm: str) -> None:
    """A port's egress carries both lanes: the same inter transfer per hop, the same total
    (intra hops may shorten: a rank at a node's edge sends only one lane inside it)."""
    nodes, per_node, nics = shape
    topo = _emulated(nodes, "switch", per_node, nics)
    if algorithm == "hierarchical" and per_node == 1 and nodes < 3:
        pytest.skip("the same ring")
    from ringctl.plan import estimate

    one = estimate(make_plan(topo, algorithm=algorithm), LINK_BOUND)
    two = estimate(make_plan(topo, algorithm=algorithm, direction="bidirectional"), LINK_BOUND)
    if not (algorithm == "flat" and nics > 1):  # several NICs: the second lane takes another
        assert two.transfer_s["inter"] == one.transfer_s["inter"] and two.total_s == one.total_s
    auto = make_plan(topo, algorithm=algorithm, direction="auto", workload=LINK_BOUND, direction_min_gain=0.0)
    # auto: the cheapest of the three (TokenRing too: queries, not K/V, travel), first on a tie
    token = estimate(make_plan(topo, algorithm=algorithm, direction="tokenring"), LINK_BOUND)
    costs = {"one_way": one.total_s, "bidirectional": two.total_s, "tokenring": token.total_s}
    assert auto.direction == min(costs, key=costs.__getitem__)
    if nics == 1:  # one port per node: the second lane never shortens the transfer
        assert auto.direction != "bidirectional"
    assert auto.direction_requested == "auto"


@pytest.mark.parametrize("nodes", [3, 4, 5])
def test_on_a_mesh_each_link_direction_carries_half_and_auto_goes_both_ways(nodes: int) -> None:
    from ringctl.plan import estimate

    topo = _emulated(nodes, "mesh")
    one = estimate(make_plan(topo), LINK_BOUND)
    two = estimate(make_plan(topo, direction="bidirectional"), LINK_BOUND)
    latency = topo.inter.latency_us * 1e-6
    # bytes / bandwidth halves, the per-message latency does not
    assert two.transfer_s["inter"] - latency == pytest.approx((one.transfer_s["inter"] - latency) / 2, rel=1e-12)
    assert two.total_s < 0.6 * one.total_s  # link-bound: the time is the transfers'
    assert make_plan(topo, direction="auto", workload=LINK_BOUND).direction == "bidirectional"
    # compute-bound (a fast link): only the last accumulator hop home, not hidden, halves
    fast = Topology((1,) * nodes, inter=topo.inter.__class__("inter", 1000.0, 0.0, "mesh"), compute_tflops=0.2)
    fast_one, fast_two = (estimate(make_plan(fast, direction=d), LINK_BOUND).total_s for d in ("one_way", "bidirectional"))
    assert 0.99 * fast_one < fast_two <= fast_one


def test_two_nodes_on_a_mesh_gain_nothing_both_lanes_share_the_pair() -> None:
    from ringctl.plan import estimate

    topo = _emulated(2, "mesh")
    one = estimate(make_plan(topo), LINK_BOUND)
    two = estimate(make_plan(topo, direction="bidirectional"), LINK_BOUND)
    assert two.total_s == one.total_s


def test_predicted_bytes_by_direction_split_the_heads_and_sum_to_one_way() -> None:
    """Independent count: lane i of Hkv = 3 carries 2 or 1 heads; every rank sends (W-1)
    blocks forward, and in backward also W accumulators, per lane."""
    plan = make_plan(_emulated(3, "mesh"), direction="bidirectional")
    kv_head = 2 * 1 * 4 * 1 * 8 * 8  # K and V of one head: batch 1, 4 tokens, head_dim 8, float64
    acc_head = kv_head  # float64 accumulators
    fwd = plan.predicted_bytes(1, 12, 3, 8, 8, "forward", by_direction=True)
    bwd = plan.predicted_bytes(1, 12, 3, 8, 8, "backward", by_direction=True)
    assert fwd["inter"] == {"next": [2 * 2 * kv_head] * 3, "prev": [2 * 1 * kv_head] * 3}
    assert bwd["inter"] == {"next": [2 * 2 * kv_head + 3 * 2 * acc_head] * 3, "prev": [2 * kv_head + 3 * acc_head] * 3}
    one_way = make_plan(_emulated(3, "mesh")).predicted_bytes(1, 12, 3, 8, 8, "backward")
    assert plan.predicted_bytes(1, 12, 3, 8, 8, "backward") == one_way


def test_link_kind_is_checked_and_read_from_config() -> None:
    from ringctl.topology import LinkClass

    with pytest.raises(ConfigError, match=r"topology\.inter\.links='ring'"):
        LinkClass("inter", 1.0, 1.0, "ring")
    topo = Topology.from_config({"nodes": 3, "ranks_per_node": 1, "inter": {"links": "mesh"}})
    assert (topo.inter.links, topo.intra.links) == ("mesh", "switch")
    data = make_plan(topo, direction="auto", workload=LINK_BOUND).to_dict(LINK_BOUND)
    assert {"flat", "flat bidirectional"} <= set(data["alternatives"])
    assert data["bytes_by_direction"]["forward"]["inter"]["prev"] > 0
