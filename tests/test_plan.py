"""RingPlan: ring orders, cross-node hop counts, byte formulas (against hand-computed values
and an independent step-by-step simulation of the schedules in docs/internals.md), and the
cost model against hand arithmetic."""

from __future__ import annotations

import json
import random

import pytest

from ringctl.errors import ConfigError
from ringctl.plan import RingPlan, Workload, baseline_plan, estimate, make_plan
from ringctl.topology import LinkClass, Topology


def topo(counts: tuple[int, ...], distribution: str = "block", **kw: object) -> Topology:
    return Topology.from_config({"nodes": len(counts), "ranks_per_node": list(counts), "distribution": distribution, **kw})


# ---- ring order and hops -----------------------------------------------------------------
@pytest.mark.parametrize(
    "counts, distribution, ring_order, hops, baseline",
    [
        ((2, 2), "block", (0, 1, 2, 3), 2, 2),
        ((2, 2), "cyclic", (0, 2, 1, 3), 2, 4),
        ((4, 4), "block", (0, 1, 2, 3, 4, 5, 6, 7), 2, 2),
        ((4, 4), "cyclic", (0, 2, 4, 6, 1, 3, 5, 7), 2, 8),
        # uneven, cyclic placement (0,1,2,0,2,0): rank order crosses on 5 of its 6 edges
        ((3, 1, 2), "cyclic", (0, 3, 5, 1, 2, 4), 3, 5),
        ((4,), "block", (0, 1, 2, 3), 0, 0),
        ((1, 1, 1), "block", (0, 1, 2), 3, 3),
    ],
)
def test_flat_ring_order_and_hops(counts, distribution, ring_order, hops, baseline) -> None:
    plan = make_plan(topo(counts, distribution), layout="zigzag", algorithm="flat")
    assert plan.ring_order == ring_order
    assert plan.cross_node_hops == hops
    assert plan.baseline_cross_node_hops == baseline
    assert [plan.position(r) for r in ring_order] == list(range(len(ring_order)))


@pytest.mark.parametrize("distribution, baseline", [("block", 16), ("cyclic", 128)])
def test_16x8_hops(distribution: str, baseline: int) -> None:
    t = topo((8,) * 16, distribution)
    for algorithm in ("flat", "hierarchical"):
        plan = make_plan(t, layout="zigzag", algorithm=algorithm)
        assert plan.cross_node_hops == 16
        assert plan.baseline_cross_node_hops == baseline
        assert sum(link == "inter" for _, _, link, _ in baseline_plan(plan).edges()) == baseline


def test_flat_crosses_n_times_whatever_the_numbering() -> None:
    rng = random.Random(0)
    for _ in range(20):
        nodes = rng.randint(2, 6)
        names = [f"n{rng.randrange(nodes)}" for _ in range(rng.randint(nodes, 24))]
        t = Topology.discover(names)
        plan = make_plan(t, layout="striped", algorithm="flat")
        assert plan.cross_node_hops == t.nodes
        # every node's ranks are contiguous on the ring
        runs = [t.rank_to_node[r] for r in plan.ring_order]
        assert sum(runs[i] != runs[i - 1] for i in range(len(runs))) == t.nodes
        assert make_plan(t, layout="striped", algorithm="flat") == plan  # deterministic


def test_hierarchical_positions_and_edges() -> None:
    t = topo((3, 3), "cyclic")  # ranks 0,2,4 on node 0; 1,3,5 on node 1
    plan = make_plan(t, layout="zigzag", algorithm="hierarchical")
    assert plan.inner_size == 3 and plan.nodes == 2
    assert plan.ring_order == (0, 2, 4, 1, 3, 5)
    for p, rank in enumerate(plan.ring_order):
        assert t.rank_to_node[rank] == p // 3
    edges = plan.edges()
    inner = [(s, d) for s, d, link, ring in edges if ring == "inner"]
    outer = [(s, d) for s, d, link, ring in edges if ring == "outer"]
    assert inner == [(0, 2), (2, 4), (4, 0), (1, 3), (3, 5), (5, 1)]
    assert outer == [(0, 1), (2, 3), (4, 5), (1, 0), (3, 2), (5, 4)]
    assert all(link == ("intra" if ring == "inner" else "inter") for _, _, link, ring in edges)
    assert plan.link_class(0, 4) == "intra" and plan.link_class(0, 1) == "inter"


def test_hierarchical_rejects_uneven_nodes() -> None:
    with pytest.raises(ConfigError) as info:
        make_plan(topo((3, 2)), algorithm="hierarchical")
    assert info.value.key == "topology.ring" and "flat" in str(info.value)


@pytest.mark.parametrize("key, kwargs", [("topology.ring", {"algorithm": "double"}), ("workload.layout", {"layout": "spiral"})])
def test_make_plan_rejects(key: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError) as info:
        make_plan(topo((2, 2)), **kwargs)
    assert info.value.key == key


def test_rank_order_plan() -> None:
    plan = RingPlan.rank_order(5, layout="contiguous")
    assert plan.ring_order == (0, 1, 2, 3, 4) and plan.nodes == 1
    assert all(link == "intra" for _, _, link, _ in plan.edges())


# ---- bytes -------------------------------------------------------------------------------
def simulate(plan: RingPlan, batch: int, seq_len: int, kv_heads: int, head_dim: int, nbytes: int, phase: str):
    """Walk the schedules of docs/internals.md step by step, counting bytes each rank sends
    per link class (an independent reference for predicted_bytes)."""
    W = plan.world_size
    kv = 2 * batch * (seq_len // W) * kv_heads * head_dim * nbytes
    dkv = kv // nbytes * (8 if nbytes == 8 else 4)
    sent = {"intra": [0] * W, "inter": [0] * W}

    def send(src: int, dst: int, size: int) -> None:
        node = plan.rank_to_node
        sent["intra" if node[src] == node[dst] else "inter"][src] += size

    order = plan.ring_order
    if plan.algorithm == "flat":
        for _step in range(W - 1):
            for p in range(W):
                send(order[p], order[(p + 1) % W], kv + (dkv if phase == "backward" else 0))
        if phase == "backward" and W > 1:  # the dK/dV accumulators' last hop home
            for p in range(W):
                send(order[p], order[(p + 1) % W], dkv)
        return sent
    N, L = plan.nodes, plan.inner_size
    rank = {(p // L, p % L): order[p] for p in range(W)}
    for o in range(N):
        for n in range(N):
            for l in range(L):
                if o < N - 1:
                    send(rank[n, l], rank[(n + 1) % N, l], kv)
                for _inner in range(L - 1):
                    send(rank[n, l], rank[n, (l + 1) % L], kv)
                if phase == "backward" and L > 1:
                    for _hop in range(L):
                        send(rank[n, l], rank[n, (l + 1) % L], dkv)
                if phase == "backward" and N > 1:  # outer accumulator, after the inner ring
                    send(rank[n, l], rank[(n + 1) % N, l], dkv)
    return sent


def test_bytes_hand_computed_hierarchical_2x2() -> None:
    plan = make_plan(topo((2, 2)), layout="zigzag", algorithm="hierarchical")
    # W=4, 4 tokens a shard: kv = 2*1*4*2*4*4 bytes = 256; dkv (float32 acc) = 256
    fwd = plan.predicted_bytes(1, 16, 2, 4, 4, "forward")
    bwd = plan.predicted_bytes(1, 16, 2, 4, 4, "backward")
    assert fwd == {"inter": [256] * 4, "intra": [512] * 4}  # (N-1) kv, N (L-1) kv
    assert bwd == {"inter": [768] * 4, "intra": [1536] * 4}  # + N dkv, + N L dkv


def test_bytes_hand_computed_flat_cyclic_2x2() -> None:
    plan = make_plan(topo((2, 2), "cyclic"), layout="zigzag", algorithm="flat")
    # ring 0 -> 2 (intra) -> 1 (inter) -> 3 (intra) -> 0 (inter); 3 hops of 256 bytes
    assert plan.predicted_bytes(1, 16, 2, 4, 4, "forward") == {"intra": [768, 768, 0, 0], "inter": [0, 0, 768, 768]}
    # + 4 dkv hops of 256
    assert plan.predicted_bytes(1, 16, 2, 4, 4, "backward") == {"intra": [1792, 1792, 0, 0], "inter": [0, 0, 1792, 1792]}
    # float64: kv 512, dkv 512; bfloat16: kv 128, dkv (float32) 256
    assert plan.predicted_bytes(1, 16, 2, 4, 8, "backward")["inter"] == [0, 0, 3 * 512 + 4 * 512, 3 * 512 + 4 * 512]
    assert plan.predicted_bytes(1, 16, 2, 4, 2, "backward")["inter"] == [0, 0, 3 * 128 + 4 * 256, 3 * 128 + 4 * 256]


def test_bytes_hand_computed_hierarchical_3x2_bf16() -> None:
    plan = make_plan(topo((2, 2, 2)), layout="contiguous", algorithm="hierarchical")
    # W=6, 4 tokens a shard, B=2, Hkv=1, D=8: kv = 2*2*4*1*8*2 = 256, dkv = 512
    assert plan.predicted_bytes(2, 24, 1, 8, 2, "forward") == {"inter": [512] * 6, "intra": [768] * 6}
    assert plan.predicted_bytes(2, 24, 1, 8, 2, "backward") == {"inter": [2048] * 6, "intra": [3840] * 6}


@pytest.mark.parametrize(
    "counts, distribution, algorithm",
    [
        ((2, 2), "block", "hierarchical"), ((3, 3), "cyclic", "hierarchical"), ((2, 2, 2), "cyclic", "hierarchical"),
        ((1, 1, 1), "block", "hierarchical"), ((4,), "block", "hierarchical"), ((1,), "block", "hierarchical"),
        ((2, 2), "cyclic", "flat"), ((3, 1, 2), "cyclic", "flat"), ((3,), "block", "flat"), ((1,), "block", "flat"),
    ],
)
@pytest.mark.parametrize("nbytes", [8, 4, 2])
def test_bytes_match_simulated_schedule(counts, distribution, algorithm, nbytes) -> None:
    plan = make_plan(topo(counts, distribution), layout="zigzag", algorithm=algorithm)
    seq_len = 2 * plan.world_size * 3
    for phase in ("forward", "backward"):
        assert plan.predicted_bytes(2, seq_len, 2, 4, nbytes, phase) == simulate(plan, 2, seq_len, 2, 4, nbytes, phase)


def test_bytes_per_step() -> None:
    plan = make_plan(topo((4, 4), "cyclic"), layout="zigzag", algorithm="flat")
    kv = 2 * 1 * 4 * 2 * 4 * 4  # seq_len 32 over 8 ranks
    assert plan.bytes_per_step(1, 32, 2, 4, 4) == {"intra": 6 * kv, "inter": 2 * kv}
    assert baseline_plan(plan).bytes_per_step(1, 32, 2, 4, 4) == {"intra": 0, "inter": 8 * kv}
    hier = make_plan(topo((4, 4), "cyclic"), layout="zigzag", algorithm="hierarchical")
    assert hier.bytes_per_step(1, 32, 2, 4, 4) == {"intra": 2 * 3 * kv, "inter": 2 * kv}


@pytest.mark.parametrize("layout, seq_len, divisor", [("zigzag", 20, 16), ("contiguous", 20, 8), ("striped", 12, 8)])
def test_seq_len_must_divide(layout: str, seq_len: int, divisor: int) -> None:
    plan = make_plan(topo((4, 4)), layout=layout, algorithm="flat")
    assert plan.seq_len_divisor == divisor
    with pytest.raises(ConfigError) as info:
        plan.predicted_bytes(1, seq_len, 1, 4, 4, "forward")
    assert info.value.key == "workload.seq_len" and str(divisor) in info.value.allowed
    assert plan.check_seq_len(divisor * 3) == divisor * 3 // 8


# ---- cost model --------------------------------------------------------------------------
LINKS = {"intra": {"bandwidth_GBps": 100.0, "latency_us": 1.0}, "inter": {"bandwidth_GBps": 10.0, "latency_us": 10.0}}
WORK = Workload(batch=1, seq_len=4096, heads=4, kv_heads=2, head_dim=64, dtype="bfloat16", causal=True)


def test_cost_hand_computed_2x2() -> None:
    t = topo((2, 2), "cyclic", nics_per_node=1, compute_tflops=100.0, **LINKS)
    # 1024 tokens a shard; zigzag + causal halves each block's 4*B*Hq*s*s*D FLOPs
    c = 4 * 1 * 4 * 1024 * 1024 * 64 * 0.5 / 100e12
    kv = 2 * 1 * 1024 * 2 * 64 * 2
    dkv = kv * 2
    t_inter = 10e-6 + kv / 10e9
    t_intra = 1e-6 + kv / 100e9
    flat = estimate(make_plan(t, layout="zigzag", algorithm="flat"), WORK)
    assert flat.compute_s["forward"] == pytest.approx(c, rel=1e-12)
    assert flat.transfer_s == pytest.approx({"intra": t_intra, "inter": t_inter}, rel=1e-12)
    assert flat.step_time_s == pytest.approx(max(c, t_inter), rel=1e-12)
    assert flat.forward_s == pytest.approx(3 * max(c, t_inter) + c, rel=1e-12)
    t_both = 10e-6 + (kv + dkv) / 10e9
    assert flat.backward_s == pytest.approx(3 * max(2.5 * c, t_both) + 2.5 * c + 10e-6 + dkv / 10e9, rel=1e-12)
    # the rank-order ring under cyclic placement: 2 flows leave each node on its one NIC
    base = estimate(baseline_plan(make_plan(t, algorithm="flat")), WORK)
    assert base.step_time_s == pytest.approx(10e-6 + kv / 5e9, rel=1e-12)
    assert base.inter_flows_per_nic == 2
    # hierarchical: inner ring of 2 (one overlapped hop), outer transfer on shared NIC
    hier = estimate(make_plan(t, layout="zigzag", algorithm="hierarchical"), WORK)
    ring_f = max(c, t_intra) + c
    outer = 10e-6 + kv / 5e9
    assert hier.forward_s == pytest.approx(max(ring_f, outer) + ring_f, rel=1e-12)
    assert hier.step_time_s == pytest.approx(max(ring_f, outer) / 2, rel=1e-12)
    assert hier.total_s == pytest.approx(hier.forward_s + hier.backward_s)


def test_overlap_threshold_is_exact() -> None:
    t = topo((2, 2), "block", nics_per_node=1, compute_tflops=100.0, **LINKS)
    plan = make_plan(t, layout="zigzag", algorithm="flat")
    need = estimate(plan, WORK).min_block_tokens["forward"]["inter"]
    a = 4 * WORK.batch * WORK.heads * WORK.head_dim * 0.5 / 100e12  # seconds per (q, k) pair
    b = 2 * WORK.batch * WORK.kv_heads * WORK.head_dim * 2 / 10e9  # seconds per token moved

    def hidden(s: int) -> bool:
        return a * s * s >= 10e-6 + b * s

    assert hidden(need) and not hidden(need - 1)


def test_hierarchical_overlap_is_L_times_looser() -> None:
    # no latency, one NIC per rank: flat needs s >= b/a, the outer ring s >= b/(L a)
    links = {"intra": {"bandwidth_GBps": 1000.0, "latency_us": 0.0}, "inter": {"bandwidth_GBps": 10.0, "latency_us": 0.0}}
    t = topo((8, 8), "block", nics_per_node=8, compute_tflops=100.0, **links)
    work = Workload(batch=1, seq_len=16 * 2048, heads=8, kv_heads=8, head_dim=128, dtype="bfloat16", causal=False)
    # a = 4*8*128 / 1e14 s per (q, k) pair, b = 2*8*128*2 / 1e10 s per token: b/a = 1e4 tokens
    flat = estimate(make_plan(t, algorithm="flat"), work).min_block_tokens["forward"]["inter"]
    hier = estimate(make_plan(t, algorithm="hierarchical"), work).min_block_tokens["forward"]["inter"]
    assert flat == 10000
    assert hier == 1250
    assert not estimate(make_plan(t, algorithm="flat"), work).overlap_ok  # 2048-token blocks < 10000
    assert estimate(make_plan(t, algorithm="hierarchical"), work).overlap_ok


def test_contiguous_causal_is_not_halved() -> None:
    t = topo((2, 2), compute_tflops=100.0)
    zig = estimate(make_plan(t, layout="zigzag"), WORK).compute_s["forward"]
    contiguous = estimate(make_plan(t, layout="contiguous"), WORK).compute_s["forward"]
    assert contiguous == pytest.approx(2 * zig)


def test_to_dict_is_json_with_required_keys() -> None:
    plan = make_plan(topo((4, 4), "cyclic"), layout="zigzag", algorithm="hierarchical")
    data = json.loads(json.dumps(plan.to_dict(WORK)))
    for key in ("world_size", "nodes", "ring", "ring_order", "cross_node_hops", "baseline_cross_node_hops",
                "bytes_per_step", "predicted_step_time_s", "predicted_total_time_s", "overlap_ok", "overlap", "baseline"):
        assert key in data, key
    assert data["ring_order"] == [0, 2, 4, 6, 1, 3, 5, 7] and data["positions"][1] == 4
    assert set(data["bytes_per_step"]) == {"intra", "inter"}
    assert data["baseline"]["predicted_step_time_s"] > 0
    assert plan.to_dict() == {k: v for k, v in plan.to_dict(WORK).items() if k in plan.to_dict()}


@pytest.mark.parametrize("key, kwargs", [("workload.dtype", {"dtype": "int8"}), ("workload.kv_heads", {"kv_heads": 3}),
                                         ("workload.seq_len", {"seq_len": 0})])
def test_workload_rejects(key: str, kwargs: dict) -> None:
    with pytest.raises(ConfigError) as info:
        Workload(**kwargs)
    assert info.value.key == key


def test_big_plan_builds() -> None:
    t = Topology((8,) * 1024, rank_to_node=tuple(r % 1024 for r in range(8192)), inter=LinkClass("inter", 50.0, 5.0))
    plan = make_plan(t, layout="zigzag", algorithm="hierarchical")
    assert plan.cross_node_hops == 1024 and plan.baseline_cross_node_hops == 8192
    data = plan.to_dict(Workload(seq_len=8192 * 16 * 8))
    assert data["world_size"] == 8192 and len(data["ring_order"]) == 8192
