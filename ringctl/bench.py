"""Benchmark: ring_attention on W gloo processes vs one-process SDPA and vs torch's ring.

Measured side by side in one run, same inputs, printed as ratios (a script, not a test):

1. fwd+bwd of ``ring_attention`` over W processes vs fwd+bwd of SDPA on the whole sequence
   in one process (same total work; the processes split the cores the one process uses).
2. forward of ``ring_attention`` vs PyTorch's internal templated ring
   (``_templated_ring_attention`` with ``_scaled_dot_product_flash_attention_for_cpu``; the
   public ``context_parallel`` raises on CPU). For causal runs both use torch's round-robin
   load balance, which is ringctl's ``zigzag`` layout; torch's ring needs K/V with all Hq
   heads, so GQA inputs are expanded for it only.

    python -m ringctl.bench                          # W=2, B=1, S=8192, 8 heads, D=64, causal
    python -m ringctl.bench --world 2,4 --seq 4096 --no-causal
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str
    causal: bool
    layout: str

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """Full-sequence q, k, v, dout (B, S, H, D); identical in every process (seeded)."""
        gen = torch.Generator().manual_seed(0)
        dtype = DTYPES[self.dtype]
        b, s, d = self.batch, self.seq, self.head_dim
        shapes = [(b, s, self.heads, d), (b, s, self.kv_heads, d), (b, s, self.kv_heads, d)]
        return tuple(torch.randn(x, generator=gen).to(dtype) for x in [*shapes, shapes[0]])


def _best(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_sdpa(shape: Shape, threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    q, k, v, dout = (x.transpose(1, 2) for x in shape.inputs())
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def step() -> None:
        out = F.scaled_dot_product_attention(*leaves, is_causal=shape.causal, enable_gqa=True)
        torch.autograd.grad(out, leaves, dout)

    return _best(step, repeats)


def _rank_main(rank: int, world: int, port: int, shape: Shape, threads: int, repeats: int, results) -> None:  # type: ignore[no-untyped-def]
    from torch.distributed.tensor.experimental._attention import (
        _cp_options,
        _templated_ring_attention,
    )

    from ringctl.ring import ring_attention, shard_sequence

    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=300),
    )  # fmt: skip
    try:
        full = shape.inputs()
        q, k, v, dout = (shard_sequence(x, rank, world, layout=shape.layout) for x in full)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def ring_fwd_bwd() -> None:
            out = ring_attention(*leaves, causal=shape.causal, layout=shape.layout)
            torch.autograd.grad(out, leaves, dout)

        def ring_fwd() -> torch.Tensor:
            with torch.no_grad():
                return ring_attention(q, k, v, causal=shape.causal, layout=shape.layout)

        groups = shape.heads // shape.kv_heads
        tq, tk, tv = (
            x.repeat_interleave(groups, dim=2).transpose(1, 2) if x is not q else x.transpose(1, 2)
            for x in (q, k, v)
        )
        _cp_options.enable_load_balance = shape.causal  # round-robin == zigzag; torch refuses it otherwise
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

        def torch_fwd() -> torch.Tensor:
            with torch.no_grad():
                out, *_ = _templated_ring_attention(
                    dist.group.WORLD, 2, op, tq, tk, tv, is_causal=shape.causal
                )
            return out

        diff = float((ring_fwd().float() - torch_fwd().transpose(1, 2).float()).abs().max())
        barrier = dist.barrier
        times = {
            "ring_fwd_bwd": _best(ring_fwd_bwd, repeats, barrier),
            "ring_fwd": _best(ring_fwd, repeats, barrier),
            "torch_ring_fwd": _best(torch_fwd, repeats, barrier),
        }
        results.put((rank, times, diff))
    finally:
        dist.destroy_process_group()


def time_ring(shape: Shape, world: int, threads: int, repeats: int) -> tuple[dict[str, float], float]:
    """Per-phase wall time (slowest rank) and max |ringctl - torch ring| of the forward."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, shape, threads, repeats, results))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    reports = [results.get(timeout=1800) for _ in range(world)]
    for proc in procs:
        proc.join()
    times = {key: max(r[1][key] for r in reports) for key in reports[0][1]}
    return times, max(r[2] for r in reports)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ringctl.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--world", default="2", help="comma-separated world sizes (default 2)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8192, help="global sequence length")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--layout", default=None, help="default: zigzag if causal else contiguous")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    layout = args.layout or ("zigzag" if args.causal else "contiguous")
    if args.causal and layout != "zigzag":
        parser.error("torch's causal ring balances load round-robin (= zigzag); use --layout zigzag")
    shape = Shape(
        args.batch, args.seq, args.heads, args.kv_heads or args.heads, args.head_dim,
        args.dtype, args.causal, layout,
    )  # fmt: skip
    print(f"{shape}; {args.cores} cores; median of {args.repeats} runs")
    sdpa = time_sdpa(shape, args.cores, args.repeats)
    print(f"one-process SDPA fwd+bwd ({args.cores} threads): {sdpa * 1e3:9.1f} ms")
    for world in (int(w) for w in args.world.split(",")):
        threads = max(1, args.cores // world)
        times, diff = time_ring(shape, world, threads, args.repeats)
        print(
            f"W={world} ({threads} thread(s) each): ring fwd+bwd {times['ring_fwd_bwd'] * 1e3:9.1f} ms"
            f"  -> {times['ring_fwd_bwd'] / sdpa:5.2f}x SDPA (goal <= 1.3x)"
        )
        print(
            f"    ring fwd {times['ring_fwd'] * 1e3:9.1f} ms, torch ring fwd "
            f"{times['torch_ring_fwd'] * 1e3:9.1f} ms -> {times['ring_fwd'] / times['torch_ring_fwd']:5.2f}x"
            f" torch's ring (goal <= 1.0x); max |ringctl - torch| = {diff:.2e}"
        )


if __name__ == "__main__":
    main()
