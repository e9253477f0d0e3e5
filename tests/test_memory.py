"""ringctl.memory: the peak-memory predictor (torch-free), and the runtime facts it rests on.

Predictor tests are arithmetic on its own outputs: a breakdown that sums to the total,
peaks that grow with what they should, max_seq_len the inverse of predict_peak. The runtime
tests run ring_attention on gloo processes with several head passes forced (the pass
threshold lowered in the workers, tiles cut into pieces of 3 rows by 3 keys) and check what the
prediction assumes: as many passes as
``head_passes`` says, as many K/V and dK/dV buffers as the estimate counts, outputs and
gradients still equal to float64 SDPA, and bytes per link class still the plan's. Nothing
here times anything or reads RSS (bench/memory.py compares predicted and measured peaks).
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from functools import cache
from typing import Any

import pytest

from ringctl import memory
from ringctl.memory import MAX_PASSES, head_passes, max_seq_len, predict_peak

BASE: dict[str, Any] = dict(
    batch=1, heads=32, kv_heads=8, head_dim=128, dtype="bfloat16", world_size=8,
    layout="zigzag", block_impl="triton",
)  # fmt: skip
LONG = 1 << 20  # tokens: every pass count is at its largest well before this


def _peak(**overrides: Any) -> memory.MemoryEstimate:
    args = {**BASE, "seq_len": LONG, **overrides}
    return predict_peak(**args)


# ---------------------------------------------------------------- the predictor


@pytest.mark.parametrize("block_impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("algorithm,nodes", [("flat", 1), ("hierarchical", 2)])
def test_breakdown_sums_to_the_total(block_impl: str, dtype: str, algorithm: str, nodes: int) -> None:
    est = _peak(block_impl=block_impl, dtype=dtype, algorithm=algorithm, nodes=nodes, seq_len=65536)
    assert est.total == sum(est.breakdown.values()) > 0
    assert est.breakdown is (est.backward if est.peak_phase == "backward" else est.forward)
    assert est.total == max(sum(est.forward.values()), sum(est.backward.values()))
    assert est.with_inputs == est.total + est.inputs
    assert all(v >= 0 for v in (*est.forward.values(), *est.backward.values()))
    d = est.to_dict()
    assert d["peak_bytes"] == est.total and sum(d["breakdown"].values()) == est.total


def test_results_dominate_and_low_precision_needs_less() -> None:
    """The backward holds out and the gradients whatever the ring does; float32 accumulators
    make bf16 cost more than half of float32, but less than float32."""
    f32, bf16, f64 = (_peak(dtype=d).total for d in ("float32", "bfloat16", "float64"))
    assert bf16 < f32 < f64
    est = _peak(dtype="bfloat16")
    results = est.backward["out, lse (saved)"] + est.backward["dq, dk, dv"]
    assert est.peak_phase == "backward" and est.total > results


@pytest.mark.parametrize("key", ["batch", "heads", "head_dim"])
def test_peak_grows_with_shapes(key: str) -> None:
    totals = [_peak(**{key: BASE[key] * f}).total for f in (1, 2, 4)]
    assert totals[0] < totals[1] < totals[2]


def test_peak_grows_with_sequence_once_passes_are_at_their_most() -> None:
    lengths = [LONG // 8 * i for i in range(1, 9)]
    ests = [_peak(seq_len=n) for n in lengths]
    assert {e.passes for e in ests} == {8}
    totals = [e.total for e in ests]
    assert all(a < b for a, b in itertools.pairwise(totals))


def test_more_ranks_hold_less_each() -> None:
    totals = [_peak(world_size=w).total for w in (2, 4, 8, 16)]
    assert all(a > b for a, b in itertools.pairwise(totals))


def test_hierarchical_rings_keep_more_blocks_in_flight() -> None:
    flat = _peak(world_size=8)
    double = _peak(world_size=8, algorithm="hierarchical", nodes=2)
    assert double.kv_buffers > flat.kv_buffers and double.acc_buffers > flat.acc_buffers
    assert double.total > flat.total


def test_head_passes() -> None:
    kw: dict[str, Any] = dict(batch=1, heads=32, head_dim=128, block_impl="torch")
    for kv_heads in (1, 2, 6, 8, 12):
        for tokens in (16, 1024, 8192, 1 << 17):
            p = head_passes(shard_tokens=tokens, kv_heads=kv_heads, **kw)
            assert 1 <= p <= MAX_PASSES and kv_heads % p == 0
    assert head_passes(shard_tokens=16, kv_heads=8, **kw) == 1  # tiny blocks: one pass
    assert head_passes(shard_tokens=1 << 17, kv_heads=8, **kw) == 8
    assert head_passes(shard_tokens=1 << 17, kv_heads=6, **kw) == 6
    grows = [head_passes(shard_tokens=t, kv_heads=8, **kw) for t in (256, 512, 1024, 2048)]
    assert grows == sorted(grows) and grows[0] < grows[-1]
    # a GPU step is faster, so it needs more work per pass to hide a hop's fixed cost
    cpu = head_passes(shard_tokens=2048, kv_heads=8, **kw)
    assert head_passes(shard_tokens=2048, kv_heads=8, **{**kw, "block_impl": "triton"}) < cpu


@pytest.mark.parametrize("include_inputs", [True, False])
@pytest.mark.parametrize(
    "overrides", [{}, {"dtype": "float32", "block_impl": "torch"}, {"layout": "contiguous"},
                  {"algorithm": "hierarchical", "nodes": 2}],
)  # fmt: skip
def test_max_seq_len_is_the_inverse(overrides: dict[str, Any], include_inputs: bool) -> None:
    args = {**BASE, **overrides}
    divisor = memory.seq_len_divisor(args["layout"], args["world_size"])

    def need(seq_len: int) -> int:
        est = predict_peak(seq_len=seq_len, **args)
        return est.with_inputs if include_inputs else est.total

    for seq_len in (LONG, LONG + 7 * divisor, 3 * LONG):
        budget = need(seq_len)
        assert max_seq_len(budget, include_inputs=include_inputs, **args) == seq_len
        below = max_seq_len(budget - 1, include_inputs=include_inputs, **args)
        assert below % divisor == 0 and below < seq_len and need(below) <= budget - 1


def test_max_seq_len_of_a_tiny_budget() -> None:
    assert max_seq_len(0, **BASE) == 0
    shortest = memory.seq_len_divisor("zigzag", 8)
    assert max_seq_len(_peak(seq_len=shortest).with_inputs, **BASE) >= shortest


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"batch": 0}, "batch"),
        ({"heads": 12, "kv_heads": 8}, "kv_heads=8"),
        ({"dtype": "int8"}, "dtype='int8'"),
        ({"layout": "spiral"}, "layout='spiral'"),
        ({"algorithm": "tree"}, "algorithm='tree'"),
        ({"block_impl": "cuda"}, "block_impl='cuda'"),
        ({"seq_len": LONG + 1}, "seq_len"),
        ({"algorithm": "hierarchical", "nodes": 3}, "nodes=3"),
    ],
)
def test_bad_arguments_name_themselves(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        _peak(**overrides)


def test_the_predictor_imports_no_torch() -> None:
    code = "import sys, ringctl.memory; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- the runtime agrees

B, S_LOCAL, HQ, HKV, D = 2, 8, 8, 4, 16
# (name, world, algorithm, nodes): plans the runtime tests run
PLANS = [
    ("flat-1", 1, "flat", 1), ("flat-2", 2, "flat", 1), ("flat-3", 3, "flat", 1),
    ("hier-2x2", 4, "hierarchical", 2), ("flat-4", 4, "flat", 1),
]  # fmt: skip


def _plan(world: int, algorithm: str, nodes: int) -> Any:
    from ringctl.plan import make_plan
    from ringctl.topology import Topology, place_ranks

    per_node = (world // nodes,) * nodes
    topology = Topology(per_node, rank_to_node=place_ranks(per_node, "block"))
    return make_plan(topology, layout="zigzag", algorithm=algorithm)


def _worker(rank: int, world: int) -> dict[str, Any]:
    """Every plan of this world size, with several passes forced: what the ring did."""
    import torch
    import torch.nn.functional as F

    from ringctl.ring import (
        attention,
        block,
        comm_stats,
        reset_comm_stats,
        ring_attention,
        shard_sequence,
    )  # fmt: skip

    memory.MIN_PASS_WORK = {"torch": 1, "triton": 1}  # as many passes as the heads allow
    block._max_rows = lambda q, acc: 3  # and tiles cut in row pieces (diagonal ones from m > 1)
    block._max_keys = lambda q, acc: 3  # and in key pieces: square tiles, as bf16 gets them
    runs: list[Any] = []
    real_run = attention._Ring.run

    def counting_run(self: Any, kv: Any) -> Any:
        home = real_run(self, kv)
        runs.append(self)
        return home

    attention._Ring.run = counting_run  # type: ignore[method-assign,assignment]
    report = {}
    for name, w, algorithm, nodes in PLANS:
        if w != world:
            continue
        plan = _plan(world, algorithm, nodes)
        seq = S_LOCAL * world
        gen = torch.Generator().manual_seed(seq)
        shapes = [(B, seq, HQ, D), (B, seq, HKV, D), (B, seq, HKV, D), (B, seq, HQ, D)]
        q, k, v, dout = (torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)
        position = plan.position(rank)
        local = [shard_sequence(x, position, world).requires_grad_() for x in (q, k, v)]
        reset_comm_stats()
        runs.clear()
        out = ring_attention(*local, causal=True, plan=plan)
        forward_runs = len(runs)
        grads = torch.autograd.grad(out, local, shard_sequence(dout, position, world))
        backward = runs[forward_runs:]
        buffers = [
            (sum(b is not None for t, pair in r._buffers.items() if r.channel(t) == 0 for b in pair),
             sum(b is not None for t, pair in r._buffers.items() if r.channel(t) == 1 for b in pair))
            for r in backward
        ]  # fmt: skip
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        tq, tk, tv = (x.transpose(1, 2) for x in leaves)
        ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
        ref = ref.transpose(1, 2)
        want = [ref, *torch.autograd.grad(ref, leaves, dout)]
        errors = [
            float((g.detach() - shard_sequence(w_.detach(), position, world)).abs().max())
            for g, w_ in zip((out, *grads), want, strict=True)
        ]
        nbytes = 8
        predicted = {
            phase: {link: per[rank] for link, per in
                    plan.predicted_bytes(B, seq, HKV, D, nbytes, phase).items()}
            for phase in ("forward", "backward")
        }  # fmt: skip
        est = predict_peak(
            batch=B, seq_len=seq, heads=HQ, kv_heads=HKV, head_dim=D, dtype="float64",
            world_size=world, algorithm=algorithm, nodes=nodes,
        )  # fmt: skip
        report[name] = {
            "forward_runs": forward_runs, "backward_runs": len(backward), "buffers": buffers,
            "errors": errors, "bytes": comm_stats() == predicted,
            "passes": est.passes, "kv_buffers": est.kv_buffers, "acc_buffers": est.acc_buffers,
        }  # fmt: skip
    attention._Ring.run = real_run  # type: ignore[method-assign]
    return report


@cache
def _results(world: int) -> list[dict[str, Any]]:
    from _dist import run_workers

    return run_workers(_worker, world)


@pytest.mark.parametrize("name,world", [(p[0], p[1]) for p in PLANS])
def test_runtime_runs_the_predicted_passes_and_buffers(name: str, world: int) -> None:
    for rank, report in enumerate(_results(world)):
        r = report[name]
        assert r["passes"] == HKV  # forced: one pass per K/V head
        assert r["forward_runs"] == r["backward_runs"] == r["passes"], (name, rank, r)
        assert r["buffers"] == [(r["kv_buffers"], r["acc_buffers"])] * r["passes"], (name, rank, r)


@pytest.mark.parametrize("name,world", [(p[0], p[1]) for p in PLANS])
def test_passes_keep_the_ring_exact_and_its_bytes(name: str, world: int) -> None:
    for rank, report in enumerate(_results(world)):
        r = report[name]
        out_err, *grad_errs = r["errors"]
        assert out_err <= 1e-10 and max(grad_errs) <= 1e-9, (name, rank, r["errors"])
        assert r["bytes"], f"{name} rank {rank}: bytes per link class differ from the plan's"
