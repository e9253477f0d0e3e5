"""The inference cost model (ringctl.infer_plan): bytes per rank and link class against
hand-computed values for both modes, visible pairs against brute force, the time model
against hand arithmetic, the choice and crossover on a link-bound topology, bad input, and
`ringctl plan workload=infer` (table, JSON, PNG). No torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ringctl.errors import ConfigError
from ringctl.infer_plan import (
    INFER_MODE_CHOICES,
    INFER_MODES,
    InferWorkload,
    check_mode,
    choose_mode,
    crossover,
    estimate_infer,
    pairs_matrix,
    predicted_infer_bytes,
)
from ringctl.placement import placement_after
from ringctl.plan import make_plan
from ringctl.topology import LinkClass, Topology

# B=2, Hq=4, Hkv=2, D=8, float32: K+V 2*2*2*8*4 = 256 B per held row; Q 2*4*8*4 = 256 B
# per new row; out+lse 2*4*9*4 = 288 B per new row
SMALL = InferWorkload(batch=2, new_tokens=8, cached_tokens=16, heads=4, kv_heads=2, head_dim=8, dtype="float32")


def plan_of(counts: tuple[int, ...], algorithm: str, rank_to_node: tuple[int, ...] = (), **kw: object):
    return make_plan(Topology(counts, rank_to_node=rank_to_node, **kw), layout="zigzag", algorithm=algorithm)  # type: ignore[arg-type]


# ---- bytes ---------------------------------------------------------------------------
def test_flat_w4_bytes_by_hand() -> None:
    # zigzag: P=16 -> 4 per position, T=8 -> 2 per position: max_held 6, max_new 2
    # kv = 6*256 = 1536, q = 2*256 = 512, acc = 2*288 = 576
    # ring 0->1 intra, 1->2 inter, 2->3 intra, 3->0 inter
    plan = plan_of((2, 2), "flat")
    assert predicted_infer_bytes(plan, SMALL, "pass_kv") == {"intra": [4608, 0, 4608, 0], "inter": [0, 4608, 0, 4608]}
    # 3 hops of q + 4 of acc (home included) = 1536 + 2304
    assert predicted_infer_bytes(plan, SMALL, "pass_q") == {"intra": [3840, 0, 3840, 0], "inter": [0, 3840, 0, 3840]}


def test_flat_bytes_follow_the_ring_order_not_rank_numbers() -> None:
    # cyclic placement: ring 0 -> 2 (intra) -> 1 (inter) -> 3 (intra) -> 0 (inter)
    plan = plan_of((2, 2), "flat", rank_to_node=(0, 1, 0, 1))
    assert plan.ring_order == (0, 2, 1, 3)
    assert predicted_infer_bytes(plan, SMALL, "pass_kv") == {"intra": [4608, 4608, 0, 0], "inter": [0, 0, 4608, 4608]}


def test_hierarchical_2x2_bytes_by_hand() -> None:
    plan = plan_of((2, 2), "hierarchical")
    # inter (N-1)*kv, intra N*(L-1)*kv
    assert predicted_infer_bytes(plan, SMALL, "pass_kv") == {"intra": [3072] * 4, "inter": [1536] * 4}
    # inter q + 2 acc = 512 + 1152; intra 2*512 + 4*576
    assert predicted_infer_bytes(plan, SMALL, "pass_q") == {"intra": [3328] * 4, "inter": [1664] * 4}


def test_hierarchical_2x3_bytes_by_hand() -> None:
    # zigzag over 6: P=16 -> chunks of 1 (2 each) + 4 singles to positions 0..3 (cursor 4);
    # T=8 -> 8 singles from position 4: new [1,1,1,1,2,2], held after 4 everywhere
    turn = placement_after(6, [16]).peek(8)
    assert turn.new_counts == (1, 1, 1, 1, 2, 2) and turn.held_after == (4,) * 6
    plan = plan_of((3, 3), "hierarchical")
    # kv = 4*256 = 1024: inter 1024, intra 2*2*1024
    assert predicted_infer_bytes(plan, SMALL, "pass_kv") == {"intra": [4096] * 6, "inter": [1024] * 6}
    # q = 512, acc = 576: inter 512 + 2*576, intra 2*2*512 + 2*3*576
    assert predicted_infer_bytes(plan, SMALL, "pass_q") == {"intra": [5504] * 6, "inter": [1664] * 6}


def test_float64_accumulator_and_one_rank() -> None:
    w = InferWorkload(batch=1, new_tokens=4, cached_tokens=4, heads=2, kv_heads=1, head_dim=3, dtype="float64")
    plan = plan_of((2,), "flat")
    # max_new 2: q = 1*2*2*3*8 = 96, acc = 1*2*2*4*8 = 128: 1 hop of q + 2 of acc
    assert predicted_infer_bytes(plan, w, "pass_q") == {"intra": [352, 352], "inter": [0, 0]}
    one = plan_of((1,), "flat")
    for mode in INFER_MODES:
        assert predicted_infer_bytes(one, w, mode) == {"intra": [0], "inter": [0]}


def test_pass_kv_bytes_are_the_training_forward_with_the_padded_block() -> None:
    plan = make_plan(Topology((3, 2, 3), rank_to_node=(0, 1, 2, 0, 2, 1, 0, 2)), layout="contiguous", algorithm="flat")
    w = InferWorkload(batch=1, new_tokens=37, cached_tokens=100, heads=8, kv_heads=2, head_dim=16, dtype="bfloat16")
    held = estimate_infer(plan, w)["pass_kv"].block_rows
    training = plan.predicted_bytes(1, held * plan.world_size, 2, 16, 2, "forward")
    assert predicted_infer_bytes(plan, w, "pass_kv") == training


def test_a_given_turn_after_decode_steps() -> None:
    placement = placement_after(4, [100, 10, 1, 1, 1])
    turn = placement.peek(1)
    plan = plan_of((4,), "flat")
    w = InferWorkload(batch=1, heads=4, kv_heads=1, head_dim=8, dtype="float32")
    costs = estimate_infer(plan, w, turn)
    assert costs["pass_kv"].block_rows == turn.max_held and costs["pass_q"].block_rows == 1
    assert costs["pass_q"].cached_tokens == 113 and costs["pass_q"].new_tokens == 1
    # one query sees the whole context: 114 pairs
    assert costs["pass_q"].visible_pairs == 114
    with pytest.raises(ValueError, match="world size"):
        estimate_infer(plan_of((2,), "flat"), w, turn)


# ---- pairs and time ------------------------------------------------------------------
def _tokens(runs) -> list[int]:
    return [i for start, length in runs for i in range(start, start + length)]


@pytest.mark.parametrize("world, turns, layout", [(4, [16, 8], "zigzag"), (3, [50, 7], "zigzag"), (4, [30, 13], "contiguous"), (2, [5], "zigzag")])
def test_pairs_matrix_against_brute_force(world: int, turns: list[int], layout: str) -> None:
    placement = placement_after(world, turns[:-1], layout)
    turn = placement.peek(turns[-1])
    keys = [_tokens(placement.runs[p]) + _tokens(turn.new[p]) for p in range(world)]
    queries = [_tokens(turn.new[p]) for p in range(world)]
    expect = [[sum(1 for i in queries[q] for j in keys[k] if j <= i) for k in range(world)] for q in range(world)]
    matrix = pairs_matrix(turn)
    assert matrix == expect
    T, P = turns[-1], sum(turns[:-1])
    assert sum(map(sum, matrix)) == T * P + T * (T + 1) // 2


def test_time_by_hand_w2() -> None:
    # zigzag, T=4, P=0 over 2: position 0 holds tokens {0, 3}, position 1 {1, 2}; pairs
    # m = [[3, 2], [2, 3]]; step 0 busiest 3, step 1 busiest 2 (both modes)
    topo = Topology((2,), intra=LinkClass("intra", 1.0, 0.0), compute_tflops=1.0)
    plan = make_plan(topo, algorithm="flat")
    w = InferWorkload(batch=1, new_tokens=4, cached_tokens=0, heads=1, kv_heads=1, head_dim=8, dtype="float32")
    pair = 4 * 8 / 1e12
    costs = estimate_infer(plan, w)
    assert costs["pass_kv"].busiest_pairs_per_step == [3, 2] == costs["pass_q"].busiest_pairs_per_step
    # pass_kv: kv = 2*2*8*4 = 128 B at 1 GB/s hidden behind step 0, then step 1's compute
    assert costs["pass_kv"].predicted_s == pytest.approx(max(3 * pair, 128e-9) + 2 * pair, rel=1e-12)
    # pass_q: q 64 B + acc 72 B move, then the acc's hop home
    assert costs["pass_q"].predicted_s == pytest.approx(max(3 * pair, 136e-9) + 2 * pair + 72e-9, rel=1e-12)
    assert costs["pass_q"].compute_s == pytest.approx(5 * pair, rel=1e-12)


def test_step_overhead_is_added_to_every_step_that_computes() -> None:
    # test_time_by_hand_w2 with a 1 us fixed cost per ring step (topology.step_overhead_us):
    # both steps compute, so each step's compute grows by it and hides the hop it did before
    topo = Topology((2,), intra=LinkClass("intra", 1.0, 0.0), compute_tflops=1.0, step_overhead_us=1.0)
    plan = make_plan(topo, algorithm="flat")
    w = InferWorkload(batch=1, new_tokens=4, cached_tokens=0, heads=1, kv_heads=1, head_dim=8, dtype="float32")
    pair, fixed = 4 * 8 / 1e12, 1e-6
    costs = estimate_infer(plan, w)
    assert costs["pass_kv"].step_compute_s == pytest.approx([3 * pair + fixed, 2 * pair + fixed], rel=1e-12)
    assert costs["pass_kv"].predicted_s == pytest.approx(max(3 * pair + fixed, 128e-9) + 2 * pair + fixed, rel=1e-12)
    assert costs["pass_q"].predicted_s == pytest.approx(max(3 * pair + fixed, 136e-9) + 2 * pair + fixed + 72e-9, rel=1e-12)


def test_few_queries_over_many_keys_are_bound_by_streaming_the_keys() -> None:
    # one rank, B=1, Hq=4, Hkv=2, D=8, float32: a decode step (T=1) over P=999 reads 1000
    # keys' K and V, 2*1000*2*8*4 = 128000 B, at 10 GB/s 12.8 us, while its 4*4*8*1000 FLOPs
    # take 0.128 us at 1 TFLOP/s; a full prefill of 1000 (64 us of FLOPs) is FLOP-bound
    topo = Topology((1,), compute_tflops=1.0, memory_bandwidth_GBps=10.0, step_overhead_us=2.0)
    plan = make_plan(topo, algorithm="flat")
    decode = InferWorkload(batch=1, new_tokens=1, cached_tokens=999, heads=4, kv_heads=2, head_dim=8, dtype="float32")
    for cost in estimate_infer(plan, decode).values():
        assert cost.predicted_s == pytest.approx(128000 / 10e9 + 2e-6, rel=1e-12)
    prefill = InferWorkload(batch=1, new_tokens=1000, cached_tokens=0, heads=4, kv_heads=2, head_dim=8, dtype="float32")
    flops = 4 * 4 * 8 * (1000 * 1001 // 2) / 1e12
    assert flops > 128000 / 10e9
    for cost in estimate_infer(plan, prefill).values():
        assert cost.predicted_s == pytest.approx(flops + 2e-6, rel=1e-12)
    # without the figure, FLOPs alone price the decode step
    plain = make_plan(Topology((1,), compute_tflops=1.0, step_overhead_us=2.0), algorithm="flat")
    assert estimate_infer(plain, decode)["pass_q"].predicted_s == pytest.approx(4 * 4 * 8 * 1000 / 1e12 + 2e-6, rel=1e-12)
    with pytest.raises(ConfigError, match=r"topology\.memory_bandwidth_GBps"):
        Topology((1,), memory_bandwidth_GBps=0.0)


def test_step_compute_adds_the_fixed_cost_only_where_a_step_computes() -> None:
    # a step whose busiest rank sees no pair (a packed document's skipped block) is skipped
    # by the runtime, so it pays no fixed cost either
    from ringctl.plan import step_compute

    topo = Topology((2,), compute_tflops=1.0, step_overhead_us=5.0)
    assert step_compute(topo, 0.0) == 0.0
    assert step_compute(topo, 1e-9) == pytest.approx(5e-6 + 1e-9, rel=1e-12)
    assert step_compute(Topology((2,)), 1e-9) == 1e-9


@pytest.mark.parametrize(
    ("kw", "key"),
    [({"step_overhead_us": -1.0}, "topology.step_overhead_us"), ({"step_overhead_us": float("nan")}, "topology.step_overhead_us")],
)
def test_step_overhead_bad_values_name_the_key(kw: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Topology((2,), **kw)  # type: ignore[arg-type]


def test_one_rank_is_compute_only() -> None:
    plan = plan_of((1,), "flat", compute_tflops=2.0)
    w = InferWorkload(batch=3, new_tokens=10, cached_tokens=90, heads=4, kv_heads=2, head_dim=16, dtype="bfloat16")
    want = 4 * 3 * 4 * 16 * (10 * 90 + 55) / 2e12
    for cost in estimate_infer(plan, w).values():
        assert cost.predicted_s == pytest.approx(want, rel=1e-12)
    assert crossover(plan, w) is None


# ---- the choice ----------------------------------------------------------------------
# link-bound: a slow inter link between 4 nodes of 4 ranks, fast compute
SLOW = Topology((4, 4, 4, 4), inter=LinkClass("inter", 1.0, 5.0), compute_tflops=1000.0)
GQA = InferWorkload(batch=1, new_tokens=4096, cached_tokens=0, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")


@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
def test_choice_and_crossover_link_bound(algorithm: str) -> None:
    plan = make_plan(SLOW, algorithm=algorithm)
    full = GQA
    few = InferWorkload(**{**GQA.__dict__, "new_tokens": 41, "cached_tokens": 4096 - 41})  # T/(T+P) = 0.01
    assert choose_mode(plan, full) == "pass_kv"
    assert choose_mode(plan, few) == "pass_q"
    for w in (full, few):
        costs = estimate_infer(plan, w)
        assert choose_mode(plan, w) == min(INFER_MODES, key=lambda m: costs[m].predicted_s)
        for mode in INFER_MODES:
            assert choose_mode(plan, w, mode=mode) == mode
    cross = crossover(plan, full)
    assert cross is not None and 0.01 < cross < 1
    # bandwidth-bound on the inter link: h slow hops (flat W-1, hierarchical N-1) of
    # max_held K/V rows (2 Hkv x 2 B per row, Hkv = 8 units: 4 per row of T+P) against h hops
    # of max_new query rows (Hq x 2 B: 8) plus their float32 out and lse (Hq x 4 x 129/128 B:
    # 16.125) and the out/lse's hop home: h*4*S = h*24.125*T + 16.125*T
    h = 15 if algorithm == "flat" else 3
    assert cross == pytest.approx(4 * h / (24.125 * h + 16.125), abs=0.01)
    assert crossover(plan, few) == pytest.approx(cross)  # a property of T + P, not of T
    total = full.context
    below = InferWorkload(**{**GQA.__dict__, "new_tokens": int(0.8 * cross * total), "cached_tokens": total - int(0.8 * cross * total)})
    above = InferWorkload(**{**GQA.__dict__, "new_tokens": int(1.25 * cross * total), "cached_tokens": total - int(1.25 * cross * total)})
    assert choose_mode(plan, below) == "pass_q" and choose_mode(plan, above) == "pass_kv"


def test_pass_q_saves_at_0_01() -> None:
    plan = make_plan(SLOW, algorithm="flat")
    few = InferWorkload(**{**GQA.__dict__, "new_tokens": 41, "cached_tokens": 4096 - 41})
    costs = estimate_infer(plan, few)
    assert costs["pass_q"].predicted_s <= 0.25 * costs["pass_kv"].predicted_s
    assert sum(costs["pass_q"].bytes_total.values()) < sum(costs["pass_kv"].bytes_total.values()) / 4


# ---- bad input -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"new_tokens": 0}, "new_tokens"),
        ({"cached_tokens": -1}, "cached_tokens"),
        ({"heads": 8, "kv_heads": 3}, "workload.kv_heads"),
        ({"dtype": "float8"}, "workload.dtype"),
        ({"layout": "striped"}, "workload.layout"),
        ({"batch": 0}, "workload.batch"),
    ],
)
def test_bad_workload_names_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        InferWorkload(**kwargs)
    assert err.value.key == key and str(err.value).startswith(f"{key}=")


def test_bad_mode() -> None:
    for mode in INFER_MODE_CHOICES:
        assert check_mode(mode) == mode
    with pytest.raises(ConfigError, match=r"workload\.mode='pass_x' is invalid; allowed: auto \| pass_kv \| pass_q"):
        check_mode("pass_x")
    plan = plan_of((2,), "flat")
    with pytest.raises(ConfigError, match=r"workload\.mode"):
        choose_mode(plan, SMALL, mode="ring")
    with pytest.raises(ConfigError, match=r"mode='auto' is invalid; allowed: pass_kv \| pass_q"):
        predicted_infer_bytes(plan, SMALL, "auto")


def test_from_config() -> None:
    base = {"batch": 2, "heads": 8, "kv_heads": 2, "head_dim": 16, "dtype": "float64", "layout": "zigzag", "prompt": 1024}
    w = InferWorkload.from_config({**base, "turns": [64, 16]})
    assert (w.new_tokens, w.cached_tokens, w.heads, w.kv_heads, w.dtype) == (64, 1024, 8, 2, "float64")
    w = InferWorkload.from_config({**base, "turns": []})
    assert (w.new_tokens, w.cached_tokens) == (1024, 0)
    with pytest.raises(ConfigError, match=r"workload\.prompt"):
        InferWorkload.from_config({**base, "prompt": 0, "turns": []})
    with pytest.raises(ConfigError, match=r"workload\.turns\[0\]"):
        InferWorkload.from_config({**base, "turns": [0]})


# ---- ringctl plan workload=infer -----------------------------------------------------
def ringctl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ringctl", "plan", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_table_and_png(tmp_path: Path) -> None:
    png = tmp_path / "infer.png"
    out = ringctl("workload=infer", "+topology=2node", "workload.prompt=8192", "workload.turns=[64]", "--png", str(png), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for text in ("Inference: T=64 new tokens over P=8,192 cached", "pass_kv", "pass_q", "<- auto", "predicted time",
                 "inference crossover: T/(T+P) =", "cross-node hops"):
        assert text in out.stdout, text
    from matplotlib.image import imread

    image = imread(str(png))
    assert image.shape[0] > 1100  # the ring and the panel below it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["infer.png"]


def test_cli_json(tmp_path: Path) -> None:
    out = ringctl("workload=infer", "+topology=2node", "workload.prompt=8192", "workload.turns=[64]", "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert "predicted_total_time_s" in data and "ring_order" in data  # the training plan is still there
    info = data["inference"]
    assert set(info["modes"]) == set(INFER_MODES) and info["choice"] in INFER_MODES
    assert (info["new_tokens"], info["cached_tokens"]) == (64, 8192)
    assert info["choice"] == min(INFER_MODES, key=lambda m: info["modes"][m]["predicted_s"])
    assert "crossover" in info
    from ringctl.commands.plan import build_all

    _, plan, _, _, inference = build_all(["workload=infer", "+topology=2node", "workload.prompt=8192", "workload.turns=[64]"])
    assert inference is not None
    for mode in INFER_MODES:
        assert info["modes"][mode]["bytes_per_rank"] == predicted_infer_bytes(plan, inference, mode)
    plain = json.loads(ringctl("+topology=2node", "--json", cwd=tmp_path).stdout)
    assert "inference" not in plain
    assert list(tmp_path.iterdir()) == []


def test_cli_bad_mode(tmp_path: Path) -> None:
    out = ringctl("workload=infer", "workload.mode=nope", "--json", cwd=tmp_path)
    assert out.returncode == 2
    assert "workload.mode='nope' is invalid; allowed: auto | pass_kv | pass_q" in out.stderr
