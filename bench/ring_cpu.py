"""Benchmark: ring_attention on W gloo processes vs one-process SDPA and vs torch's ring.

Measured side by side in one run, same inputs, printed as ratios (a script, not a test):

1. fwd+bwd of ``ring_attention`` over W processes vs fwd+bwd of SDPA on the whole sequence
   in one process (same total work; the processes split the cores the one process uses).
2. forward of ``ring_attention`` vs PyTorch's internal templated ring
   (``_templated_ring_attention`` with ``_scaled_dot_product_flash_attention_for_cpu``; the
   public ``context_parallel`` raises on CPU). For causal runs both use torch's round-robin
   load balance, which is ringctl's ``zigzag`` layout; torch's ring needs K/V with all Hq
   heads, so GQA inputs are expanded for it only.

    python bench/ring_cpu.py                          # W=2, B=1, S=8192, 8 heads, D=64, causal
    python bench/ring_cpu.py --world 2,4 --seq 4096 --no-causal
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ringctl.plan import seq_len_divisor

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


def _sdpa_step(shape: Shape) -> Callable[[], None]:
    """fwd+bwd of SDPA on the whole sequence (run by one process)."""
    q, k, v, dout = (x.transpose(1, 2) for x in shape.inputs())
    lq, lk, lv = leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def step() -> None:
        out = F.scaled_dot_product_attention(lq, lk, lv, is_causal=shape.causal, enable_gqa=True)
        torch.autograd.grad(out, leaves, dout)

    return step


def _contenders(rank: int, world: int, shape: Shape) -> dict[str, Callable[[], Any]]:
    """What each rank runs per contender; SDPA runs on rank 0 only, the others wait."""
    from torch.distributed.tensor.experimental._attention import (
        _cp_options,
        _templated_ring_attention,
    )

    from ringctl.ring import ring_attention, shard_sequence

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
    tq = q.transpose(1, 2)
    tk, tv = (x.repeat_interleave(groups, dim=2).transpose(1, 2) for x in (k, v))
    # torch's load balance is round-robin (= zigzag) and it refuses it when not causal
    _cp_options.enable_load_balance = shape.causal
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    world_group = dist.group.WORLD
    if world_group is None:
        raise RuntimeError("torch.distributed is not initialised (_rank_main initialises it)")

    def torch_ring_fwd() -> torch.Tensor:
        with torch.no_grad():
            out, *_ = _templated_ring_attention(
                world_group, 2, op, tq, tk, tv, is_causal=shape.causal
            )
        return out.transpose(1, 2)

    sdpa = _sdpa_step(shape) if rank == 0 else (lambda: None)
    return {
        "sdpa_fwd_bwd": sdpa,
        "ring_fwd_bwd": ring_fwd_bwd,
        "ring_fwd": ring_fwd,
        "torch_ring_fwd": torch_ring_fwd,
    }


def _rank_main(
    rank: int, world: int, port: int, shape: Shape, cores: int, repeats: int, results: Any
) -> None:
    """One rank: rounds of every contender back to back, so load drift hits all alike."""
    threads = max(1, cores // world)
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=timedelta(seconds=600),
    )  # fmt: skip
    try:
        runs = _contenders(rank, world, shape)
        diff = float((runs["ring_fwd"]().float() - runs["torch_ring_fwd"]().float()).abs().max())
        rounds: list[dict[str, float]] = []
        for _ in range(repeats + 1):  # round 0 warms up
            times = {}
            for name, run in runs.items():
                torch.set_num_threads(cores if name.startswith("sdpa") else threads)
                dist.barrier()
                start = time.perf_counter()
                run()
                dist.barrier()
                times[name] = time.perf_counter() - start
            rounds.append(times)
        results.put((rank, rounds[1:], diff))
    finally:
        dist.destroy_process_group()


def measure(
    shape: Shape, world: int, cores: int, repeats: int
) -> tuple[list[dict[str, float]], float]:
    """Rank 0's per-round wall times (barriers on both sides) and max |ringctl - torch|."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, shape, cores, repeats, results))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    reports: list[tuple[int, list[dict[str, float]], float]] = []
    while len(reports) < world:
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
        prog="bench/ring_cpu.py", description=(__doc__ or "").split("\n")[0]
    )
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
        parser.error("torch's causal ring balances load round-robin (zigzag): use --layout zigzag")
    shape = Shape(
        args.batch, args.seq, args.heads, args.kv_heads or args.heads, args.head_dim,
        args.dtype, args.causal, layout,
    )  # fmt: skip
    print(f"{shape}; {args.cores} cores; medians of {args.repeats} interleaved rounds", flush=True)
    worlds = [int(w) for w in args.world.split(",")]
    for world in worlds:
        divisor = seq_len_divisor(layout, world)
        if args.seq % divisor:
            parser.error(f"--seq {args.seq} must be a multiple of {divisor} for {layout} on W={world}")
    for world in worlds:
        rounds, diff = measure(shape, world, args.cores, args.repeats)
        ms = {key: 1e3 * statistics.median(r[key] for r in rounds) for key in rounds[0]}
        vs_sdpa = statistics.median(r["ring_fwd_bwd"] / r["sdpa_fwd_bwd"] for r in rounds)
        vs_torch = statistics.median(r["ring_fwd"] / r["torch_ring_fwd"] for r in rounds)
        threads = max(1, args.cores // world)
        print(
            f"W={world} ({threads} thread(s) per rank): ring fwd+bwd {ms['ring_fwd_bwd']:8.1f} ms,"
            f" one-process SDPA fwd+bwd ({args.cores} threads) {ms['sdpa_fwd_bwd']:8.1f} ms"
            f" -> {vs_sdpa:.2f}x (goal <= 1.3x)",
            flush=True,
        )
        print(
            f"    ring fwd {ms['ring_fwd']:8.1f} ms,"
            f" torch's ring fwd {ms['torch_ring_fwd']:8.1f} ms"
            f" -> {vs_torch:.2f}x (goal <= 1.0x); max |ringctl - torch| = {diff:.2e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
