"""Benchmark: packed documents through the ring, measured side by side in one run.

Documents drawn from a long-tailed length distribution (lognormal, mean 2K tokens by
default) pack S = 32K tokens over W = 4 ranks. Printed:

1. per-rank work imbalance (max / mean of visible query-key pairs) of the per-document
   layout ``docs`` vs global ``zigzag`` (and contiguous, striped), counted by the planner's
   cost model (ringctl.documents), plus the share of the full causal work the documents leave;
2. the ``docs`` layout's internal padding as a fraction of the tokens;
3. fwd+bwd time of the ring with the document masks (layout ``docs``) vs the same ring
   computing the full causal mask (layout ``zigzag``, no documents): the gain from skipping;
4. fwd+bwd of the ring with documents vs one-process SDPA with the block-diagonal causal mask
   (SDPA per document: the same result as one SDPA call with that mask, without its S x S
   mask and scores), and the ring's max error against it.

Each rank runs one thread (OMP_NUM_THREADS=1); rounds alternate the contenders so load
drift hits all alike; the load average is printed beside the times.

    python bench/documents.py                     # S=32768, W=4, lognormal mean 2048
    python bench/documents.py --no-ring           # the cost model's figures only (1, 2)
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ringctl.documents import (
    cu_seqlens_of,
    document_lengths,
    imbalance,
    layout_padding,
    parse_documents,
    rank_pairs,
    visible_pairs,
)

GOALS = {"imbalance": 1.05, "padding": 0.01, "time": 0.5}


@dataclass(frozen=True)
class Setup:
    seq: int
    world: int
    heads: int
    kv_heads: int
    head_dim: int
    cu_seqlens: tuple[int, ...]


def cost_model_figures(setup: Setup) -> None:
    cu, seq, world = setup.cu_seqlens, setup.seq, setup.world
    lengths = document_lengths(cu)
    print(
        f"{len(lengths)} documents, lengths {min(lengths)}..{max(lengths)} "
        f"(mean {seq / len(lengths):.0f}), S={seq}, W={world}",
        flush=True,
    )
    full = sum(rank_pairs(visible_pairs("zigzag", seq, world)))
    for layout in ("docs", "zigzag", "contiguous", "striped"):
        work = rank_pairs(visible_pairs(layout, seq, world, cu_seqlens=cu))
        goal = f" (goal <= {GOALS['imbalance']})" if layout == "docs" else ""
        print(
            f"  {layout:>10}: per-rank visible pairs max/mean = {imbalance(work):.4f}{goal}; "
            f"{sum(work) / full:.3f} of the full causal pairs",
            flush=True,
        )
    pad = layout_padding(seq, world)
    print(
        f"  docs internal padding: {pad} rows over {world} shards = {pad / seq:.4%} of the "
        f"tokens (goal <= {GOALS['padding']:.0%})",
        flush=True,
    )


# ---------------------------------------------------------------- the ring, timed


def _inputs(setup: Setup) -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(0)
    b, s, d = 1, setup.seq, setup.head_dim
    shapes = [(b, s, setup.heads, d), (b, s, setup.kv_heads, d), (b, s, setup.kv_heads, d)]
    return [torch.randn(x, generator=gen) for x in [*shapes, shapes[0]]]


def _per_document_sdpa(q: Any, k: Any, v: Any, cu: tuple[int, ...]) -> Any:
    """Causal SDPA on each document: the block-diagonal causal mask's result. K/V heads are
    repeated to the query heads first: with enable_gqa ATen's CPU SDPA leaves its fused
    flash kernel for the math path, which would make the baseline needlessly slow."""
    import torch
    import torch.nn.functional as F

    group = q.shape[2] // k.shape[2]
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    parts = []
    for a, b in itertools.pairwise(cu):
        qt, kt, vt = (x[:, a:b].transpose(1, 2) for x in (q, k, v))
        parts.append(F.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2))
    return torch.cat(parts, dim=1)


def _contenders(rank: int, world: int, setup: Setup) -> tuple[dict[str, Callable[[], Any]], float]:
    import torch

    from ringctl.ring import ring_attention, shard_sequence

    q, k, v, dout = _inputs(setup)
    cu = setup.cu_seqlens
    docs = [shard_sequence(x, rank, world, layout="docs", cu_seqlens=cu) for x in (q, k, v, dout)]
    zig = [shard_sequence(x, rank, world, layout="zigzag") for x in (q, k, v, dout)]
    docs_leaves = [x.requires_grad_() for x in docs[:3]]
    zig_leaves = [x.requires_grad_() for x in zig[:3]]
    full_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]

    def ring_documents() -> None:
        out = ring_attention(*docs_leaves, causal=True, layout="docs", cu_seqlens=cu)
        torch.autograd.grad(out, docs_leaves, docs[3])

    def ring_full_causal() -> None:
        out = ring_attention(*zig_leaves, causal=True, layout="zigzag")
        torch.autograd.grad(out, zig_leaves, zig[3])

    def sdpa_documents() -> None:
        out = _per_document_sdpa(full_leaves[0], full_leaves[1], full_leaves[2], cu)
        torch.autograd.grad(out, full_leaves, dout)

    with torch.no_grad():
        want = shard_sequence(_per_document_sdpa(q, k, v, cu), rank, world, layout="docs", cu_seqlens=cu)
        got = ring_attention(*docs[:3], causal=True, layout="docs", cu_seqlens=cu)
    error = float((got - want).abs().max())
    runs = {"ring_documents": ring_documents, "ring_full_causal": ring_full_causal}
    runs["sdpa_documents"] = sdpa_documents if rank == 0 else (lambda: None)
    return runs, error


def _rank_main(rank: int, world: int, port: int, setup: Setup, cores: int, repeats: int,
               results: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=1800),
    )  # fmt: skip
    try:
        runs, error = _contenders(rank, world, setup)
        rounds: list[dict[str, float]] = []
        for _ in range(repeats + 1):  # round 0 warms up
            times = {}
            for name, run in runs.items():
                torch.set_num_threads(cores if name.startswith("sdpa") else 1)
                dist.barrier()
                start = time.perf_counter()
                run()
                dist.barrier()
                times[name] = time.perf_counter() - start
            rounds.append(times)
        results.put((rank, rounds[1:], error))
    finally:
        dist.destroy_process_group()


def measure(setup: Setup, cores: int, repeats: int) -> tuple[list[dict[str, float]], float]:
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, setup.world, port, setup, cores, repeats, results))
        for r in range(setup.world)
    ]
    for proc in procs:
        proc.start()
    reports: list[tuple[int, list[dict[str, float]], float]] = []
    while len(reports) < setup.world:
        try:
            reports.append(results.get(timeout=5))
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead or all(p.exitcode is not None for p in procs):
                for proc in procs:
                    proc.kill()
                raise RuntimeError(f"bench ranks exited without results (exit codes {dead})") from None
    for proc in procs:
        proc.join()
    reports.sort(key=lambda r: r[0])
    return reports[0][1], max(r[2] for r in reports)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="bench/documents.py", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--seq", type=int, default=32768, help="global sequence length")
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--documents", default="lognormal:mean=2048",
                        help="length distribution (ringctl.documents.parse_documents)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                        help="threads of the one-process SDPA (each rank runs one)")
    parser.add_argument("--ring", action=argparse.BooleanOptionalAction, default=True,
                        help="time the ring (--no-ring: the cost model's figures only)")
    args = parser.parse_args(argv)
    spec = parse_documents(args.documents, key="--documents")
    if spec is None:
        parser.error("--documents must name a distribution or lengths")
    cu = cu_seqlens_of(spec.sample(args.seq, args.seed))
    setup = Setup(args.seq, args.world, args.heads, args.kv_heads, args.head_dim, cu)
    print(f"{spec.describe()} seed {args.seed}; load average {os.getloadavg()[0]:.2f}", flush=True)
    cost_model_figures(setup)
    if not args.ring:
        return
    os.environ["OMP_NUM_THREADS"] = "1"  # every rank one thread (spawned children inherit it)
    print(
        f"timing: B=1, Hq={args.heads}, Hkv={args.kv_heads}, D={args.head_dim}, float32, "
        f"{args.world} ranks x 1 thread, SDPA {args.cores} threads; medians of {args.repeats} "
        "interleaved rounds",
        flush=True,
    )
    rounds, error = measure(setup, args.cores, args.repeats)
    ms = {key: 1e3 * statistics.median(r[key] for r in rounds) for key in rounds[0]}
    vs_causal = statistics.median(r["ring_documents"] / r["ring_full_causal"] for r in rounds)
    vs_sdpa = statistics.median(r["ring_documents"] / r["sdpa_documents"] for r in rounds)
    print(
        f"  ring fwd+bwd, document masks (docs) {ms['ring_documents']:9.1f} ms; full causal "
        f"(zigzag) {ms['ring_full_causal']:9.1f} ms -> {vs_causal:.3f}x (goal <= {GOALS['time']})",
        flush=True,
    )
    print(
        f"  one-process SDPA per document fwd+bwd {ms['sdpa_documents']:9.1f} ms -> ring / SDPA "
        f"{vs_sdpa:.2f}x; max |ring - SDPA| (forward) = {error:.2e}",
        flush=True,
    )
    print(f"  load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
