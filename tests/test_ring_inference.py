"""Context-parallel inference against float64 SDPA on the whole (cached + new) sequence.

Real gloo processes (W = 1, 2, 3, 4; flat rank-order, flat on cyclic placement, and the
hierarchical double ring) build a RingKVCache and run turn after turn: a prompt (P = 0),
chat turns (P > 0) and decode steps (T = 1), every turn with pass-KV and pass-Q (and auto),
GQA, two layers with their own K/V. Each turn's outputs on every rank must equal SDPA's
rows at that rank's positions within 1e-10, and every call's bytes sent per link class the
planner's prediction for the strategy it ran (ringctl.infer_plan), exactly. The placement must stay balanced after many
appends, and bad input must fail on every rank with an error naming the argument.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _dist import run_workers
from ringctl.infer_plan import InferWorkload, choose_mode, predicted_infer_bytes
from ringctl.placement import Placement, placement_after, split_turn
from ringctl.plan import RingPlan, make_plan
from ringctl.ring import comm_stats, reset_comm_stats
from ringctl.ring.inference import cached_attention
from ringctl.ring.kv_cache import CacheError, RingKVCache
from ringctl.topology import Topology, place_ranks

B, HQ, HKV, D, LAYERS = 2, 6, 2, 8, 2
TURNS = (37, 8, 1, 1, 1, 5, 16, 1)  # prompt, chat turns, decode steps
TOL = 1e-10
MODES_RUN = ("pass_kv", "pass_q", "auto")


def _context(total: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the whole context for one layer, identical on every rank."""
    gen = torch.Generator().manual_seed(1000 + layer)
    q = torch.randn(B, total, HQ, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, total, HKV, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, total, HKV, D, generator=gen, dtype=torch.float64)
    return q, k, v


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


def _plan(kind: str, world: int, layout: str) -> RingPlan | None:
    if kind == "rank":
        return None
    if kind == "flat-cyclic":
        nodes = (world - world // 2, world // 2) if world > 1 else (1,)
        topo = Topology(nodes, rank_to_node=place_ranks(nodes, "cyclic"))
        return make_plan(topo, layout=layout, algorithm="flat")
    topo = Topology((world // 2, world // 2), rank_to_node=place_ranks((world // 2, world // 2), "cyclic"))
    # a training plan that uses both directions: inference runs its first lane only
    direction = "bidirectional" if kind == "hierarchical-bidirectional" else "one_way"
    return make_plan(topo, layout=layout, algorithm="hierarchical", direction=direction)


def _session(rank: int, world: int, kind: str, layout: str) -> list[tuple[int, str, float]]:
    """Every turn, both strategies and auto: (turn, mode, max error) on this rank."""
    torch.manual_seed(0)
    total = sum(TURNS)
    full = [_context(total, layer) for layer in range(LAYERS)]
    refs = [_reference(*ctx) for ctx in full]
    cache = RingKVCache(
        layers=LAYERS, batch=B, kv_heads=HKV, head_dim=D, capacity=total + 3,
        dtype=torch.float64, layout=layout, plan=_plan(kind, world, layout),
    )  # fmt: skip
    errors = []
    for t, count in enumerate(TURNS):
        turn = cache.begin_turn(count)
        pos = turn.positions
        for layer in range(LAYERS):
            q, k, v = (x[:, pos] for x in full[layer])
            cache.append(layer, k, v)
            want = refs[layer][:, pos]
            shape = InferWorkload(batch=B, new_tokens=count, cached_tokens=turn.cached, heads=HQ,
                                  kv_heads=HKV, head_dim=D, dtype="float64", layout=layout)  # fmt: skip
            for mode in MODES_RUN:
                reset_comm_stats()
                out = cached_attention(q, cache, layer, mode=mode)
                assert out.dtype == torch.float64 and out.shape == q.shape
                err = float((out - want).abs().max()) if pos.numel() else 0.0
                errors.append((t, mode, err))
                # bytes sent per link class: the planner's prediction for the mode run, exactly
                ran = choose_mode(cache.plan, shape, turn.turn, mode) if world > 1 else "pass_kv"
                predicted = predicted_infer_bytes(cache.plan, shape, ran, turn.turn)
                sent = comm_stats()["forward"]
                assert {link: sent[link] for link in predicted} == {l: v[rank] for l, v in predicted.items()}, (t, mode)
    return errors


def _placement_counts(rank: int, world: int) -> list[int]:
    cache = RingKVCache(layers=1, batch=1, kv_heads=1, head_dim=4, capacity=4096, dtype=torch.float32)
    for count in (500, 13, *([1] * 40), 7, 64, *([1] * 9)):
        turn = cache.begin_turn(count)
        n = turn.positions.numel()
        cache.append(0, torch.zeros(1, n, 1, 4), torch.zeros(1, n, 1, 4))
    return list(cache.placement.counts())


def _sessions(rank: int, world: int) -> dict[str, list[tuple[int, str, float]]]:
    """Every plan kind and cache layout of this world size, in one process group."""
    kinds = ["rank"] + (["flat-cyclic"] if world > 2 else [])
    kinds += ["hierarchical", "hierarchical-bidirectional"] if world == 4 else []
    return {
        f"{kind}-{layout}": _session(rank, world, kind, layout)
        for kind in kinds
        for layout in (("zigzag", "contiguous") if kind == "rank" else ("zigzag",))
    }


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_prefill_and_decode_match_sdpa_float64(world: int) -> None:
    results = run_workers(_sessions, world)
    for name in results[0]:
        per_rank = [r[name] for r in results]
        worst = max(err for errors in per_rank for _, _, err in errors)
        assert worst < TOL, (name, [e for r in per_rank for e in r if e[2] >= TOL][:5])
        # every turn ran every strategy on every rank
        assert {(t, m) for r in per_rank for t, m, _ in r} == {
            (t, m) for t in range(len(TURNS)) for m in ("pass_kv", "pass_q", "auto")
        }, name
    assert len(results[0]) == {1: 2, 2: 2, 3: 3, 4: 5}[world]


def test_placement_stays_balanced_after_many_appends() -> None:
    [counts, *others] = run_workers(_placement_counts, 3)
    assert all(c == counts for c in others)  # every rank tracks the same placement
    assert max(counts) - min(counts) <= 1, counts
    for world in (2, 3, 4, 8):
        placement = placement_after(world, [1000, 17, *([1] * 101), 33, 250])
        counts = placement.counts()
        assert max(counts) - min(counts) <= 1 and placement.imbalance() <= 1 + 1 / (sum(counts) / world)
        for runs in placement.runs:  # ascending global positions on every position
            flat = [s + i for s, n in runs for i in range(n)]
            assert flat == sorted(flat) and len(set(flat)) == len(flat)


def test_zigzag_turn_balances_causal_work() -> None:
    """A turn of 2W x c tokens: equal tokens and equal visible (query, key) pairs within the
    turn on every position (head and tail chunks), as the zigzag training layout."""
    world, count = 4, 64
    runs, cursor = split_turn(100, count, world, cursor=2)
    assert cursor == 2
    positions = [[s + i for s, n in r for i in range(n)] for r in runs]
    assert [len(p) for p in positions] == [count // world] * world
    work = [sum(i - 100 + 1 for i in p) for p in positions]  # causal pairs within the turn
    assert len(set(work)) == 1, work


def test_placement_rejects_unknown_layout() -> None:
    with pytest.raises(ValueError, match=r"cache layout=.striped. is invalid; allowed: zigzag \| contiguous"):
        Placement(4, "striped")


def _bad_input(rank: int, world: int, case: str) -> str:
    cache = RingKVCache(layers=1, batch=1, kv_heads=2, head_dim=4, capacity=64, dtype=torch.float64)
    try:
        if case == "count differs":
            cache.begin_turn(8 + rank)
        elif case == "too long":
            cache.begin_turn(65)
        elif case == "mode":
            turn = cache.begin_turn(8)
            n = turn.positions.numel()
            cache.append(0, torch.zeros(1, n, 2, 4, dtype=torch.float64), torch.zeros(1, n, 2, 4, dtype=torch.float64))
            cached_attention(torch.zeros(1, n, 4, 4, dtype=torch.float64), cache, 0, mode="pass_x")
        elif case == "not appended":
            turn = cache.begin_turn(8)
            cached_attention(torch.zeros(1, turn.positions.numel(), 4, 4, dtype=torch.float64), cache, 0)
        elif case == "heads differ":
            turn = cache.begin_turn(8)
            n = turn.positions.numel()
            cache.append(0, torch.zeros(1, n, 2, 4, dtype=torch.float64), torch.zeros(1, n, 2, 4, dtype=torch.float64))
            cached_attention(torch.zeros(1, n, 2 * (rank + 1), 4, dtype=torch.float64), cache, 0, mode="pass_q")
        elif case == "k shape":
            turn = cache.begin_turn(8)
            cache.append(0, torch.zeros(1, 3, 2, 4, dtype=torch.float64), torch.zeros(1, 3, 2, 4, dtype=torch.float64))
    except CacheError as err:
        return str(err)
    return "no error"


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("count differs", "count differs between ranks: [8, 9] (by rank)"),
        ("too long", "count=65 new tokens do not fit: the cache holds 0 of capacity=64 tokens; allowed: count <= 64"),
        ("mode", "mode='pass_x' is invalid; allowed: auto | pass_kv | pass_q"),
        ("not appended", "layer 0's K/V of turn 0 were not appended (0 of 4 rows)"),
        ("heads differ", "q.shape[2] (Hq) differs between ranks: [2, 4] (by rank)"),
        ("k shape", "k.shape=(1, 3, 2, 4) is invalid; allowed: (1, 4, 2, 4)"),
    ],
)
def test_bad_input_names_the_argument_on_every_rank(case: str, expected: str) -> None:
    messages = run_workers(_bad_input, 2, case)
    assert all(expected in m for m in messages), messages


def test_cache_refuses_a_plan_of_another_layout() -> None:
    plan = RingPlan.rank_order(1, "striped")
    with pytest.raises(CacheError, match=r"layout='zigzag' but plan\.layout='striped'"):
        RingKVCache(layers=1, batch=1, kv_heads=1, head_dim=4, capacity=8, plan=plan)


def test_memory_is_reported() -> None:
    cache = RingKVCache(layers=2, batch=1, kv_heads=2, head_dim=4, capacity=100, dtype=torch.float32)
    cache.begin_turn(10)
    for layer in range(2):
        cache.append(layer, torch.zeros(1, 10, 2, 4), torch.zeros(1, 10, 2, 4))
    row = 2 * 1 * 2 * 4 * 4
    assert cache.memory_bytes() == {"allocated": 2 * 100 * row, "used": 2 * 10 * row}
