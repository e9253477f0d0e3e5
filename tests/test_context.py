"""RingContext on 4 real gloo processes placed cyclically (SLURM's --distribution=cyclic:
rank r on node r % 2, told to each rank through SLURMD_NODENAME as SLURM does), so the
node-contiguous plan reorders the ranks (ring 0, 2, 1, 3) and sharding by rank would be
wrong. Through the context the job is exact against SDPA on the whole sequence in float64,
forward and gradients, for every layout, flat and hierarchical, causal or not, with GQA.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from _dist import run_workers
from ringctl import (
    RingContext,
    RingPlan,
    Topology,
    make_plan,
    ring_attention,
    shard_sequence,
)

WORLD = 4
B, S, HQ, HKV, D = 2, 16, 4, 2, 8
LAYOUTS = ("zigzag", "contiguous", "striped")
# S=16 over 4 positions; the cyclic ring is 0, 2, 1, 3: rank 1 holds position 2, rank 2 position 1
ZIGZAG_TOKENS = {0: [0, 1, 14, 15], 1: [4, 5, 10, 11], 2: [2, 3, 12, 13], 3: [6, 7, 8, 9]}


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    """The same full-sequence q, k, v and output gradient on every rank."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, S, HQ, D), (B, S, HKV, D), (B, S, HKV, D), (B, S, HQ, D)]
    return tuple(torch.randn(shape, generator=gen, dtype=torch.float64) for shape in shapes)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, causal: bool) -> tuple[torch.Tensor, ...]:
    """SDPA on the whole sequence: output and dq, dk, dv."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True
    ).transpose(1, 2)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad  # type: ignore[return-value]


def _check_exact(ctx: RingContext, causal: bool, seed: int) -> float:
    """One fwd/bwd through the context against SDPA; returns the largest error seen."""
    q, k, v, dout = _inputs(seed)
    ref_out, ref_dq, ref_dk, ref_dv = _reference(q, k, v, dout, causal)
    lq, lk, lv = (ctx.shard(t).requires_grad_() for t in (q, k, v))
    out = ctx.attention(lq, lk, lv, causal=causal)
    out.backward(ctx.shard(dout))
    full = ctx.gather(out.detach())
    torch.testing.assert_close(full, ref_out, rtol=0, atol=1e-10)
    for got, want in ((lq.grad, ref_dq), (lk.grad, ref_dk), (lv.grad, ref_dv)):
        torch.testing.assert_close(got, ctx.shard(want), rtol=0, atol=1e-9)
    return float((full - ref_out).abs().max())


def _documents_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, cu: list[int]
) -> tuple[torch.Tensor, ...]:
    """Attention by definition with the block-diagonal causal mask of documents `cu` (tokens
    after cu[-1] are padding: zero output, zero gradients): output and dq, dk, dv."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    doc = torch.full((S,), -1)
    for i, (a, b) in enumerate(itertools.pairwise(cu)):
        doc[a:b] = i
    pos = torch.arange(S)
    visible = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0) & (pos[None, :] <= pos[:, None])
    kk, vv = (t.repeat_interleave(HQ // HKV, dim=2) for t in (k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q, kk) / D**0.5
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, vv)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad  # type: ignore[return-value]


def _check_documents(ctx: RingContext, cu: list[int]) -> float:
    """Packed documents through the context (shard, positions, attention, gather all given
    cu_seqlens) against the block-diagonal causal mask; returns the largest error."""
    q, k, v, dout = _inputs(77)
    ref_out, ref_dq, ref_dk, ref_dv = _documents_reference(q, k, v, dout, cu)
    lq, lk, lv = (ctx.shard(t, cu_seqlens=cu).requires_grad_() for t in (q, k, v))
    out = ctx.attention(lq, lk, lv, causal=True, cu_seqlens=cu)
    out.backward(ctx.shard(dout, cu_seqlens=cu))
    full = ctx.gather(out.detach(), cu_seqlens=cu, seq_len=S)
    torch.testing.assert_close(full, ref_out, rtol=0, atol=1e-10)
    for got, want in ((lq.grad, ref_dq), (lk.grad, ref_dk), (lv.grad, ref_dv)):
        torch.testing.assert_close(got, ctx.shard(want, cu_seqlens=cu), rtol=0, atol=1e-9)
    # the rows' global positions are the tokens they hold; per document they restart at 0
    held = ctx.shard(torch.arange(S)[None].double(), cu_seqlens=cu)[0].long()
    real = ctx.positions(S, cu_seqlens=cu) >= 0
    torch.testing.assert_close(ctx.positions(S, cu_seqlens=cu)[real], held[real])
    starts = torch.tensor(cu[:-1])
    want_doc_pos = held - starts[torch.searchsorted(starts, held, right=True) - 1]
    in_doc = real & (held < cu[-1])
    torch.testing.assert_close(ctx.positions(S, cu_seqlens=cu, per_document=True)[in_doc], want_doc_pos[in_doc])
    return float((full - ref_out).abs().max())


def _cyclic_worker(rank: int, world: int) -> dict[str, Any]:
    torch.set_default_dtype(torch.float64)
    os.environ["SLURMD_NODENAME"] = f"node{rank % 2}"  # what SLURM tells a cyclically placed rank
    seen: dict[str, Any] = {}

    ctx = RingContext(algorithm="flat")
    seen["flat_order"] = list(ctx.plan.ring_order)
    seen["position"] = ctx.position
    seen["nodes"] = ctx.plan.nodes
    # the context's shard is the plan position's tokens, not the rank's
    torch.testing.assert_close(ctx.positions(S), torch.tensor(ZIGZAG_TOKENS[rank]))
    torch.testing.assert_close(ctx.shard(torch.arange(S)[None]), ctx.positions(S)[None])

    errors: list[float] = []
    for algorithm in ("flat", "hierarchical"):
        for layout in LAYOUTS:
            run = RingContext(algorithm=algorithm, layout=layout)
            for causal in (True, False):
                errors.append(_check_exact(run, causal, seed=len(errors)))
    # packed documents (one of one token, one longer than a shard, a padded tail) on the
    # per-document layout and on zigzag, both rings
    for algorithm in ("flat", "hierarchical"):
        for layout in ("docs", "zigzag"):
            errors.append(_check_documents(RingContext(algorithm=algorithm, layout=layout), [0, 3, 4, 11, 14]))
    # both directions of every link: K/V split over two lanes, or TokenRing's queries
    for direction in ("bidirectional", "tokenring"):
        run = RingContext(algorithm="hierarchical", direction=direction)
        assert run.plan.direction == direction
        errors.append(_check_exact(run, True, seed=len(errors)))
    seen["max_error"] = max(errors)
    seen["cases"] = len(errors)

    # the mistake the context rules out: shard by rank with the same plan -> wrong answer
    q, k, v, _ = _inputs(99)
    ref = _reference(q, k, v, torch.zeros_like(q), True)[0]
    by_rank = [shard_sequence(t, rank, world) for t in (q, k, v)]
    wrong = ring_attention(*by_rank, causal=True, plan=ctx.plan)
    seen["by_rank_error"] = float((wrong - shard_sequence(ref, rank, world)).abs().max())

    # gather inverts shard along any dim, in sequence order, on every rank
    x = torch.randn(3, S, 5, generator=torch.Generator().manual_seed(7))
    for dim, full in ((1, x), (0, x.transpose(0, 1).contiguous()), (-1, x.transpose(1, 2).contiguous())):
        torch.testing.assert_close(ctx.gather(ctx.shard(full, dim=dim), dim=dim), full, rtol=0, atol=0)

    # gather's gradient: each rank weights the gathered tensor differently; a shard gets the
    # sum over ranks of the weights on its tokens
    local = ctx.shard(x).requires_grad_()
    weights = [torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]
    (ctx.gather(local) * weights[rank]).sum().backward()
    torch.testing.assert_close(local.grad, ctx.shard(sum(weights)), rtol=0, atol=1e-12)

    # the same placement given as a Topology (no discovery), and a plan given as is
    cyclic = Topology.from_config({"nodes": 2, "ranks_per_node": 2, "distribution": "cyclic"})
    assert RingContext(topology=cyclic).plan.ring_order == ctx.plan.ring_order
    given = make_plan(cyclic, layout="striped", algorithm="hierarchical")
    from_plan = RingContext(plan=given)
    assert from_plan.plan is given and from_plan.layout == "striped"
    _check_exact(from_plan, True, seed=50)
    # a topology config: its link classes and ring, the placement discovered
    from_cfg = RingContext(topology={"ring": "hierarchical", "inter": {"bandwidth_GBps": 1.0, "latency_us": 9.0}})
    assert from_cfg.plan.algorithm == "hierarchical" and from_cfg.plan.ring_order == ctx.plan.ring_order
    assert from_cfg.topology is not None and from_cfg.topology.inter.bandwidth_GBps == 1.0

    with pytest.raises(ValueError, match=r"plan\.world_size=2"):
        RingContext(plan=RingPlan.rank_order(2))
    with pytest.raises(ValueError, match="contradicts"):
        RingContext(plan=given, layout="zigzag")
    with pytest.raises(ValueError, match="cannot be"):
        RingContext(plan=given, algorithm="flat")
    with pytest.raises(ValueError, match="algorithm='ring'"):
        RingContext(algorithm="ring")
    with pytest.raises(ValueError, match="layout='zig'"):
        RingContext(layout="zig")
    with pytest.raises(ValueError, match=r"direction='sideways' is invalid; allowed: auto \| one_way"):
        RingContext(direction="sideways")
    with pytest.raises(ValueError, match="direction cannot be"):
        RingContext(plan=given, direction="tokenring")
    with pytest.raises(ValueError, match="plan: the context sets"):
        ctx.attention(*by_rank, plan=given)
    with pytest.raises(ValueError, match="multiple of 8"):
        ctx.positions(12)
    return seen


def _virtual_worker(rank: int, world: int) -> dict[str, Any]:
    """One host cut into virtual nodes of 2 ranks (block placement: the ring keeps rank order)."""
    os.environ.pop("SLURMD_NODENAME", None)
    ctx = RingContext(algorithm="hierarchical", virtual_node_size=2)
    errors = [_check_exact(ctx, causal, seed=10 + causal) for causal in (True, False)]
    return {"nodes": ctx.plan.nodes, "order": list(ctx.plan.ring_order), "max_error": max(errors)}


def test_cyclic_four_ranks_exact_through_the_context() -> None:
    results = run_workers(_cyclic_worker, WORLD)
    assert [r["flat_order"] for r in results] == [[0, 2, 1, 3]] * WORLD
    assert [r["position"] for r in results] == [0, 2, 1, 3]
    assert all(r["nodes"] == 2 and r["cases"] == 18 for r in results)
    assert max(r["max_error"] for r in results) <= 1e-10
    # ranks 1 and 2 swap shards under this plan: sharding by rank is far off
    assert max(r["by_rank_error"] for r in results) > 1e-2


def test_virtual_nodes_on_one_host() -> None:
    results = run_workers(_virtual_worker, WORLD)
    assert all(r["nodes"] == 2 and r["order"] == [0, 1, 2, 3] for r in results)
    assert max(r["max_error"] for r in results) <= 1e-10


def test_needs_an_initialized_process_group() -> None:
    with pytest.raises(RuntimeError, match="init_process_group"):
        RingContext()
