"""The planner's side of TokenRing (``topology.direction=tokenring``): the bytes the runtime
sends per phase, link class and direction (queries "next", partial results going home
"prev"), its cost model against hand-written schedules, and `auto` choosing it where its
traffic is the lighter. No processes: the runtime's measured bytes are tests/test_tokenring.py's."""

from __future__ import annotations

import pytest

from ringctl.documents import visible_pairs
from ringctl.errors import ConfigError
from ringctl.plan import DIRECTIONS, RingPlan, Workload, alternatives, estimate, lane_kv_heads, make_plan
from ringctl.report import direction_table
from ringctl.topology import LinkClass, Topology, place_ranks

# batch 1, seq 16 over 4 ranks (4 tokens each), 2 query heads, head_dim 4, float32
B, S, HQ, HKV, D, E = 1, 16, 2, 1, 4, 4
QB = 1 * 4 * 2 * 4 * 4  # 128: one shard's Q
PB = 1 * 4 * 2 * (4 + 1) * 4  # 160: out + lse of one shard, float32
QPACK = 3 * QB + 1 * 4 * 2 * 4  # 416: q, dout, out and the float32 lse
DQ = 1 * 4 * 2 * 4 * 4  # 128: a dq partial, float32


def _bytes(plan: RingPlan, phase: str, seq: int = S, nbytes: int = E, heads: int = HQ) -> dict:
    return plan.predicted_bytes(B, seq, HKV, D, nbytes, phase, by_direction=True, heads=heads)


def _tokenring(counts: tuple[int, ...], algorithm: str = "flat", distribution: str = "block", order: str = "node") -> RingPlan:
    topo = Topology(counts, rank_to_node=place_ranks(counts, distribution))
    return make_plan(topo, algorithm=algorithm, order=order, direction="tokenring")


# ---- bytes, by hand ------------------------------------------------------------------------
def test_flat_one_node_by_hand() -> None:
    plan = _tokenring((4,))
    zero = {"next": [0] * 4, "prev": [0] * 4}
    # forward: 3 Q hops to the successor; a partial to each of the 3 others
    assert _bytes(plan, "forward") == {"intra": {"next": [3 * QB] * 4, "prev": [3 * PB] * 4}, "inter": zero}
    assert _bytes(plan, "backward") == {"intra": {"next": [3 * QPACK] * 4, "prev": [3 * DQ] * 4}, "inter": zero}
    assert plan.predicted_bytes(B, S, HKV, D, E, "forward", heads=HQ) == {"intra": [3 * QB + 3 * PB] * 4, "inter": [0] * 4}


def test_flat_two_nodes_cyclic_by_hand() -> None:
    """Ranks 0, 2 on node 0 and 1, 3 on node 1; the ring 0 -> 2 -> 1 -> 3 -> 0: ranks 0 and
    1 hop inside their node, 2 and 3 across; every rank has one peer on its node, two off it."""
    plan = _tokenring((2, 2), distribution="cyclic")
    assert plan.ring_order == (0, 2, 1, 3)
    assert _bytes(plan, "forward") == {
        "intra": {"next": [3 * QB, 3 * QB, 0, 0], "prev": [PB] * 4},
        "inter": {"next": [0, 0, 3 * QB, 3 * QB], "prev": [2 * PB] * 4},
    }
    assert _bytes(plan, "backward") == {
        "intra": {"next": [3 * QPACK, 3 * QPACK, 0, 0], "prev": [DQ] * 4},
        "inter": {"next": [0, 0, 3 * QPACK, 3 * QPACK], "prev": [2 * DQ] * 4},
    }
    # the rank-order ring on the same placement: every Q hop crosses nodes, partials do not move
    rank_order = _tokenring((2, 2), distribution="cyclic", order="rank")
    assert _bytes(rank_order, "forward") == {
        "intra": {"next": [0] * 4, "prev": [PB] * 4},
        "inter": {"next": [3 * QB] * 4, "prev": [2 * PB] * 4},
    }


@pytest.mark.parametrize(
    ("counts", "intra_q", "inter_q", "intra_p", "inter_p"),
    [
        ((2, 2), 2 * 1, 1, 1, 2),  # N (L-1) inner hops, N-1 outer hops; 1 peer on the node, 2 off
        ((3, 3), 2 * 2, 1, 2, 3),
        ((2, 2, 2), 3 * 1, 2, 1, 4),
    ],
    ids=["2x2", "2x3", "3x2"],
)
def test_hierarchical_by_hand(counts: tuple[int, ...], intra_q: int, inter_q: int, intra_p: int, inter_p: int) -> None:
    plan = _tokenring(counts, algorithm="hierarchical")
    W = plan.world_size
    seq = 4 * W  # 4 tokens a shard, as QB etc. assume
    assert _bytes(plan, "forward", seq) == {
        "intra": {"next": [intra_q * QB] * W, "prev": [intra_p * PB] * W},
        "inter": {"next": [inter_q * QB] * W, "prev": [inter_p * PB] * W},
    }
    assert _bytes(plan, "backward", seq) == {
        "intra": {"next": [intra_q * QPACK] * W, "prev": [intra_p * DQ] * W},
        "inter": {"next": [inter_q * QPACK] * W, "prev": [inter_p * DQ] * W},
    }


def test_dtypes_and_accumulation() -> None:
    """bfloat16 moves Q in 2 bytes and the partials in float32; float64 keeps 8 bytes."""
    plan = _tokenring((4,))
    rows = B * 4 * HQ
    bf16 = _bytes(plan, "forward", nbytes=2)["intra"]
    assert bf16 == {"next": [3 * rows * D * 2] * 4, "prev": [3 * rows * (D + 1) * 4] * 4}
    bf16 = _bytes(plan, "backward", nbytes=2)["intra"]
    assert bf16 == {"next": [3 * (3 * rows * D * 2 + rows * 4)] * 4, "prev": [3 * rows * D * 4] * 4}
    f64 = _bytes(plan, "backward", nbytes=8)["intra"]
    assert f64 == {"next": [3 * (3 * rows * D * 8 + rows * 8)] * 4, "prev": [3 * rows * D * 8] * 4}


def _simulate(plan: RingPlan, phase: str, seq: int, nbytes: int) -> dict:
    """Walk TokenRing's schedule block by block (blocks hop as pass-KV's do; each computed
    block not the holder's own sends a partial to its owner), counting what each rank sends."""
    W, order = plan.world_size, plan.ring_order
    acc = 8 if nbytes == 8 else 4
    rows = B * (seq // W) * HQ
    moving, part = (3 * rows * D * nbytes + rows * acc, rows * D * acc) if phase == "backward" else (rows * D * nbytes, rows * (D + 1) * acc)
    sent = {link: {d: [0] * W for d in ("next", "prev")} for link in ("intra", "inter")}

    def send(src_pos: int, dst_pos: int, size: int, way: str) -> None:
        src, dst = order[src_pos], order[dst_pos]
        sent["intra" if plan.rank_to_node[src] == plan.rank_to_node[dst] else "inter"][way][src] += size

    def compute(held: list[int]) -> None:
        for p, owner in enumerate(held):
            if owner != p:
                send(p, owner, part, "prev")

    if plan.algorithm == "flat":
        held = list(range(W))
        for step in range(W):
            compute(held)
            if step < W - 1:
                for p in range(W):
                    send(p, (p + 1) % W, moving, "next")
                held = [held[(p - 1) % W] for p in range(W)]
        return sent
    N, L = plan.nodes, plan.inner_size
    start = list(range(W))  # the block each position starts an outer step with
    for o in range(N):
        if o < N - 1:
            for p in range(W):
                n, l = divmod(p, L)
                send(p, ((n + 1) % N) * L + l, moving, "next")
        held = list(start)
        for i in range(L):
            compute(held)
            if i < L - 1:
                for p in range(W):
                    n, l = divmod(p, L)
                    send(p, n * L + (l + 1) % L, moving, "next")
                held = [held[(p // L) * L + (p % L - 1) % L] for p in range(W)]
        start = [start[((p // L - 1) % N) * L + p % L] for p in range(W)]
    return sent


@pytest.mark.parametrize(
    ("counts", "algorithm", "distribution"),
    [((4,), "flat", "block"), ((2, 2), "flat", "cyclic"), ((3, 2), "flat", "cyclic"), ((1, 2, 2), "flat", "block"),
     ((2, 2), "hierarchical", "cyclic"), ((3, 3), "hierarchical", "block"), ((1, 1, 1), "hierarchical", "block"),
     ((2, 2, 2), "hierarchical", "cyclic")],
)  # fmt: skip
@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_predicted_bytes_equal_a_simulated_schedule(counts: tuple[int, ...], algorithm: str, distribution: str, phase: str) -> None:
    plan = _tokenring(counts, algorithm, distribution)
    seq = 4 * plan.world_size
    for nbytes in (2, 4, 8):
        assert _bytes(plan, phase, seq, nbytes) == _simulate(plan, phase, seq, nbytes), nbytes


def test_one_rank_sends_nothing_and_heads_are_required() -> None:
    plan = _tokenring((1,))
    assert _bytes(plan, "backward", seq=4) == {link: {"next": [0], "prev": [0]} for link in ("intra", "inter")}
    with pytest.raises(ValueError, match="heads"):
        _tokenring((2,)).predicted_bytes(B, 8, HKV, D, E, "forward")
    with pytest.raises(ValueError, match="heads"):
        _tokenring((2,)).bytes_per_step(B, 8, HKV, D, E)


def test_bytes_per_step() -> None:
    """All ranks' Q hops of one step (4 on the node) plus one partial per rank per step."""
    plan = _tokenring((4,))
    assert plan.bytes_per_step(B, S, HKV, D, E, heads=HQ) == {"intra": 4 * QB + 4 * PB, "inter": 0}
    cyclic = _tokenring((2, 2), distribution="cyclic")  # partials: 4 intra, 8 inter over 3 steps
    assert cyclic.bytes_per_step(B, S, HKV, D, E, heads=HQ) == {"intra": 2 * QB + round(4 * PB / 3), "inter": 2 * QB + round(8 * PB / 3)}


def test_one_lane_any_kv_heads() -> None:
    assert lane_kv_heads(1, "tokenring") == (1,) and lane_kv_heads(5, "tokenring") == (5,)
    plan = make_plan(Topology((1, 1, 1)), direction="tokenring", workload=Workload(heads=4, kv_heads=1, seq_len=96))
    assert plan.direction == "tokenring" and plan.lane_fractions(1) == (1.0,)


def test_unknown_direction_names_the_key_and_the_four_choices() -> None:
    with pytest.raises(ConfigError, match=r"topology\.direction='sideways'.*auto \| one_way \| bidirectional \| tokenring"):
        make_plan(Topology((2,)), direction="sideways")


# ---- cost model ----------------------------------------------------------------------------
RATE = 0.2e12
LAT = 700e-6
BW = 0.0125e9


def _fabric(nodes: int, links: str, per_node: int = 1) -> Topology:
    return Topology(
        (per_node,) * nodes, intra=LinkClass("intra", 0.5, 1000.0), inter=LinkClass("inter", BW / 1e9, LAT * 1e6, links),
        nics_per_node=1, compute_tflops=RATE / 1e12,
    )  # fmt: skip


LINK_BOUND = Workload(batch=1, seq_len=7680, heads=8, kv_heads=8, head_dim=64, dtype="float32", causal=False)


def _t(nbytes: float) -> float:
    return LAT + nbytes / BW


def _sizes(w: Workload, world: int) -> tuple[float, int, int, int, int]:
    s = w.seq_len // world
    rows = w.batch * s * w.heads
    c = 4 * w.batch * w.heads * w.head_dim * s * s / RATE  # full (non-causal) block
    return c, rows * w.head_dim * 4, rows * (w.head_dim + 1) * 4, 3 * rows * w.head_dim * 4 + rows * 4, rows * w.head_dim * 4


@pytest.mark.parametrize("links", ["switch", "mesh"])
def test_forward_and_backward_follow_the_schedule(links: str) -> None:
    """4 nodes, one rank each. Step 0: a Q hop only (step 0's partial is the rank's own);
    steps 1 and 2: a Q hop from the step's start and the step's partial once computed (one
    port on a switch: both; on a mesh they take two pair links); step 3: no Q hop, its
    partial after its compute."""
    w = LINK_BOUND
    c, qb, pb, qpack, dq = _sizes(w, 4)
    cost = estimate(make_plan(_fabric(4, links), direction="tokenring"), w)

    def total(c: float, q: int, p: int) -> float:
        both = _t(q + p) if links == "switch" else max(_t(q), _t(p))
        return max(c, _t(q)) + 2 * max(c, both, c + _t(p)) + c + _t(p)

    assert cost.forward_s == pytest.approx(total(c, qb, pb), rel=1e-12)
    assert cost.backward_s == pytest.approx(total(2.5 * c, qpack, dq), rel=1e-12)
    assert cost.transfer_s["inter"] == pytest.approx(_t(qb + pb) if links == "switch" else _t(pb), rel=1e-12)
    # two ranks: the partial of step 1 is the only one that travels, after the last compute
    c2, qb2, pb2, qpack2, dq2 = _sizes(w, 2)
    two = estimate(make_plan(_fabric(2, links), direction="tokenring"), w)
    assert two.forward_s == pytest.approx(max(c2, _t(qb2)) + c2 + _t(pb2), rel=1e-12)
    assert two.backward_s == pytest.approx(max(2.5 * c2, _t(qpack2)) + 2.5 * c2 + _t(dq2), rel=1e-12)


def test_shared_port_efficiency_slows_only_ports_that_meet_two_peers() -> None:
    """test_forward_and_backward_follow_the_schedule on a switch whose ports give flows to or
    from two peers at once half their rate (inter.shared_port_efficiency = 0.5): only steps
    1 and 2 (a Q hop to the next rank and the step's partial to an earlier one) meet two
    peers; a partial alone does not."""
    eff = 0.5
    topo = Topology(
        (1,) * 4, inter=LinkClass("inter", BW / 1e9, LAT * 1e6, "switch", shared_port_efficiency=eff),
        compute_tflops=RATE / 1e12,
    )  # fmt: skip
    c, qb, pb, qpack, dq = _sizes(LINK_BOUND, 4)
    cost = estimate(make_plan(topo, direction="tokenring"), LINK_BOUND)

    def total(c: float, q: int, p: int) -> float:
        return max(c, _t(q)) + 2 * max(c, _t((q + p) / eff), c + _t(p)) + c + _t(p)

    assert cost.forward_s == pytest.approx(total(c, qb, pb), rel=1e-12)
    assert cost.backward_s == pytest.approx(total(2.5 * c, qpack, dq), rel=1e-12)
    # pass-KV: one-way sends to one peer and hears from one (no change); bidirectional's two
    # lanes meet the next and the previous rank at every port (its half blocks at half rate)
    base = _fabric(4, "switch")
    for direction, slower in (("one_way", 1.0), ("bidirectional", 1 / eff)):
        fast, slow = (estimate(make_plan(t, direction=direction), LINK_BOUND) for t in (base, topo))
        assert slow.transfer_s["inter"] - LAT == pytest.approx(slower * (fast.transfer_s["inter"] - LAT), rel=1e-12)
    # on a mesh every pair has its own link: nothing is shared
    mesh = [Topology((1,) * 4, inter=LinkClass("inter", BW / 1e9, LAT * 1e6, "mesh", shared_port_efficiency=e),
                     compute_tflops=RATE / 1e12) for e in (1.0, eff)]  # fmt: skip
    costs = [estimate(make_plan(t, direction="tokenring"), LINK_BOUND).total_s for t in mesh]
    assert costs[0] == costs[1]


def test_step_overhead_is_paid_per_lane() -> None:
    """A bidirectional step computes a block on each lane, so it pays topology.step_overhead_us
    twice; one-way and TokenRing once (their block's FLOPs are the same whole block)."""
    base, fixed = _fabric(4, "mesh"), 5e-3
    slow = Topology(base.ranks_per_node, intra=base.intra, inter=base.inter, compute_tflops=base.compute_tflops,
                    step_overhead_us=fixed * 1e6)  # fmt: skip
    for direction, lanes in (("one_way", 1), ("bidirectional", 2), ("tokenring", 1)):
        plain, paid = (estimate(make_plan(t, direction=direction), LINK_BOUND) for t in (base, slow))
        for phase in ("forward", "backward"):
            assert paid.compute_s[phase] - plain.compute_s[phase] == pytest.approx(lanes * fixed, rel=1e-9)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.2, float("inf")])
def test_shared_port_efficiency_bad_values_name_the_key(value: float) -> None:
    with pytest.raises(ConfigError, match=r"topology\.inter\.shared_port_efficiency"):
        LinkClass("inter", 1.0, 1.0, "switch", shared_port_efficiency=value)


@pytest.mark.parametrize("counts", [(4,), (1, 1, 1), (1, 1, 1, 1)])
def test_hierarchical_with_one_level_costs_the_flat_ring(counts: tuple[int, ...]) -> None:
    topo = Topology(counts, inter=LinkClass("inter", 0.0125, 700.0, "mesh"), compute_tflops=0.2)
    w = Workload(batch=1, seq_len=4800, heads=4, kv_heads=2, head_dim=32, dtype="float32", causal=True)
    flat, hier = (estimate(make_plan(topo, algorithm=a, direction="tokenring"), w) for a in ("flat", "hierarchical"))
    assert hier.forward_s == pytest.approx(flat.forward_s, rel=1e-12)
    assert hier.backward_s == pytest.approx(flat.backward_s, rel=1e-12)


def test_hierarchical_outer_traffic_hides_behind_the_inner_ring() -> None:
    """2 nodes x 2 ranks, intra transfers ~free, inter a mesh. Outer step 0: the two outer Q
    hops of a node share its pair link; outer step 1: no Q hop, but the partials of steps 2
    and 3 (one per rank each, to the other node) share it, from step 2's compute on."""
    topo = Topology((2, 2), intra=LinkClass("intra", 1e6, 0.0), inter=LinkClass("inter", BW / 1e9, LAT * 1e6, "mesh"), compute_tflops=0.2)
    c, qb, pb, qpack, dq = _sizes(LINK_BOUND, 4)
    cost = estimate(make_plan(topo, algorithm="hierarchical", direction="tokenring"), LINK_BOUND)
    assert cost.forward_s == pytest.approx(max(2 * c, _t(2 * qb)) + max(2 * c, c + _t(4 * pb)), rel=1e-6)
    cb = 2.5 * c
    assert cost.backward_s == pytest.approx(max(2 * cb, _t(2 * qpack)) + max(2 * cb, cb + _t(4 * dq)), rel=1e-6)
    assert _t(2 * qb) > 2 * c  # the case is link-bound: the transfers decide


@pytest.mark.parametrize("links", ["switch", "mesh"])
def test_documents_price_each_steps_busiest_rank(links: str) -> None:
    """A link too fast to matter: forward = the sum over steps of the busiest rank's visible
    pairs of the visiting queries against its own keys."""
    topo = Topology((1, 1, 1, 1), inter=LinkClass("inter", 1e9, 0.0, links), compute_tflops=0.2)
    lengths = [700, 300, 1200, 500, 400, 100]
    w = Workload(batch=1, seq_len=3200, heads=4, kv_heads=2, head_dim=16, dtype="float32", documents=lengths)
    plan = make_plan(topo, layout="contiguous", direction="tokenring")
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    m = visible_pairs("contiguous", 3200, 4, cu_seqlens=cu, causal=True)
    per_pair = 4 * 1 * 4 * 16 / 0.2e12
    busiest = [max(m[(p - g) % 4][p] for p in range(4)) for g in range(4)]
    cost = estimate(plan, w)
    assert cost.forward_s == pytest.approx(per_pair * sum(busiest), rel=1e-6)
    assert cost.backward_s == pytest.approx(2.5 * per_pair * sum(busiest), rel=1e-6)


# ---- auto ------------------------------------------------------------------------------------
def test_auto_picks_tokenring_where_its_traffic_is_lighter() -> None:
    """A mesh, link-bound, Hq == Hkv = 1 (nothing to split for bidirectional), float32: Q and
    a partial go over two different pair links, K and V both over one."""
    w = Workload(batch=1, seq_len=7680, heads=1, kv_heads=1, head_dim=128, dtype="float32", causal=False)
    topo = _fabric(4, "mesh")
    costs = {d: estimate(make_plan(topo, direction=d), w).total_s for d in ("one_way", "tokenring")}
    assert costs["tokenring"] < 0.85 * costs["one_way"]
    assert make_plan(topo, direction="auto", workload=w).direction == "tokenring"
    # two nodes on a mesh: bidirectional gains nothing (both lanes share the pair), TokenRing does
    assert make_plan(_fabric(2, "mesh"), direction="auto", workload=LINK_BOUND).direction == "tokenring"


def test_auto_keeps_one_way_where_the_queries_are_large() -> None:
    """GQA, Hq = 8 Hkv: Q alone is 4x K+V."""
    w = Workload(batch=1, seq_len=7680, heads=8, kv_heads=1, head_dim=64, dtype="float32", causal=False)
    for topo in (_fabric(4, "mesh"), _fabric(4, "switch"), _fabric(2, "switch", per_node=2)):
        plan = make_plan(topo, direction="auto", workload=w)
        assert plan.direction == "one_way"
        assert estimate(plan, w).total_s < estimate(make_plan(topo, direction="tokenring"), w).total_s


@pytest.mark.parametrize("heads", [(8, 8), (8, 2), (4, 1)])
@pytest.mark.parametrize("links", ["switch", "mesh"])
def test_auto_is_the_cheapest_direction(heads: tuple[int, int], links: str) -> None:
    w = Workload(batch=1, seq_len=7680, heads=heads[0], kv_heads=heads[1], head_dim=64, dtype="float32", causal=True)
    topo = _fabric(3, links, per_node=2)
    for algorithm in ("flat", "hierarchical"):
        chosen = make_plan(topo, algorithm=algorithm, direction="auto", workload=w, direction_min_gain=0.0)
        totals = {d: estimate(make_plan(topo, algorithm=algorithm, direction=d), w).total_s for d in DIRECTIONS if d != "bidirectional" or w.kv_heads > 1}
        assert estimate(chosen, w).total_s == min(totals.values())
        assert chosen.direction == min(totals, key=totals.__getitem__)  # ties: DIRECTIONS order
        assert chosen.direction_requested == "auto"


def test_auto_leaves_one_way_only_for_the_min_gain() -> None:
    """4 nodes on a switch, Hq = Hkv: TokenRing is predicted 9.4% faster than one-way, under
    the default margin (topology.direction_min_gain = 0.1): auto stays one-way; with no
    margin it takes TokenRing; on a mesh (TokenRing far ahead) the margin changes nothing."""
    w = Workload(batch=1, seq_len=1536, heads=8, kv_heads=8, head_dim=64, dtype="float32", causal=False)
    topo = _fabric(4, "switch")
    costs = {d: estimate(make_plan(topo, direction=d), w).total_s for d in ("one_way", "tokenring")}
    assert 0.9 * costs["one_way"] < costs["tokenring"] < costs["one_way"]
    stay = make_plan(topo, direction="auto", workload=w)
    assert (stay.direction, stay.direction_min_gain, stay.direction_requested) == ("one_way", 0.1, "auto")
    assert make_plan(topo, direction="auto", workload=w, direction_min_gain=0.0).direction == "tokenring"
    assert make_plan(topo, direction="auto", workload=w, direction_min_gain=0.09).direction == "tokenring"
    assert make_plan(_fabric(4, "mesh"), direction="auto", workload=w, direction_min_gain=0.1).direction != "one_way"
    # forced: the margin does not apply
    assert make_plan(topo, direction="tokenring", workload=w).direction == "tokenring"
    assert stay.to_dict()["direction_min_gain"] == 0.1
    assert "predicted >= 10% faster" in str(direction_table(stay, w).title)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2, True, "0.1", None])
def test_bad_min_gain_names_the_key(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"topology\.direction_min_gain=.*allowed: a number in \[0, 1\)"):
        make_plan(_fabric(3, "switch"), direction="auto", workload=LINK_BOUND, direction_min_gain=bad)  # type: ignore[arg-type]


# ---- what `ringctl plan` shows -----------------------------------------------------------------
def test_plan_json_shows_the_three_side_by_side() -> None:
    w = LINK_BOUND
    plan = make_plan(_fabric(3, "mesh"), direction="auto", workload=w)
    data = plan.to_dict(w)
    alts = data["alternatives"]
    assert {"flat", "flat bidirectional", "flat tokenring"} <= set(alts)
    tokenring = make_plan(_fabric(3, "mesh"), direction="tokenring")
    figures = alts["flat tokenring"]
    assert figures["direction"] == "tokenring"
    cost = estimate(tokenring, w)
    assert figures["predicted_forward_time_s"] == cost.forward_s and figures["predicted_backward_time_s"] == cost.backward_s
    for phase in ("forward", "backward"):
        want = tokenring.predicted_bytes(w.batch, w.seq_len, w.kv_heads, w.head_dim, 4, phase, by_direction=True, heads=w.heads)
        assert figures["bytes_by_direction"][phase] == {link: {d: sum(v) for d, v in by.items()} for link, by in want.items()}
    one_kv = Workload(heads=4, kv_heads=1, seq_len=96)  # nothing to split: no bidirectional column
    assert set(alternatives(plan, one_kv)) == {"flat", "hierarchical", "flat tokenring", "hierarchical tokenring", "rank-order"}


def test_direction_table_has_a_column_per_direction() -> None:
    from rich.console import Console

    plan = make_plan(_fabric(3, "mesh"), direction="tokenring")
    assert len(direction_table(plan, LINK_BOUND).columns) == 4
    one_kv = Workload(batch=1, seq_len=7680, heads=2, kv_heads=1, head_dim=64, dtype="float32")
    table = direction_table(plan, one_kv)
    assert [c.header for c in table.columns][1:] == ["one_way", "[bold]tokenring <- plan[/]"]
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert "bytes bwd, inter -> prev" in text and "backward" in text
    assert direction_table(_tokenring((1,)), one_kv) is None
