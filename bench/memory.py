"""Benchmark: per-rank peak memory of ring_attention fwd+bwd vs one-process SDPA fwd+bwd.

Side by side in one run, same inputs, printed as ratios (a script, not a test): for each
sequence length and dtype, W gloo processes (one torch thread each) run ring fwd+bwd on
their shards while rank 0 also runs SDPA fwd+bwd on the whole sequence, in alternating
rounds after one warm-up round (SDPA with the first world size only: it does not depend on W). It prints each rank's peak, ``max per-rank peak x W / SDPA
peak`` (1.0 would mean the ring's memory divides perfectly), the planner's prediction
(``ringctl.memory.predict_peak``) against the measured peak, and fwd+bwd times (wall, and
the slowest rank's process CPU time, which load from other processes disturbs far less).

How the peak is measured (``ringctl.workloads.attention.PeakMemory``, which the attention
and train workloads use too), and why it is exact here:

- CPU: the kernel's own high-water mark of the resident set. Before a phase the process
  writes "5" to /proc/self/clear_refs, which resets VmHWM to the current VmRSS; after it,
  ``VmHWM - VmRSS(before)`` is what the phase added at its peak. The kernel raises the mark
  before any page leaves the resident set (munmap, madvise), so no transient is missed,
  however short; a sampling thread would miss peaks shorter than its period and compete
  for the cores it measures. glibc would keep freed blocks below its dynamic mmap threshold
  (up to 32 MiB) in the heap, where a later call reuses them without raising RSS, so a
  warm call would under-report: the ranks run with ``MALLOC_MMAP_THRESHOLD_=65536``, every
  allocation over 64 KiB is its own mapping, handed back when freed, and RSS follows the
  live tensors. Untouched ``torch.empty`` pages are not resident and do not count.
- CUDA (``--device cuda``, NCCL, one GPU per rank): ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats``, minus ``memory_allocated`` before.

The peak of a call is the larger of the forward's and the backward's (each measured from
the level just before the forward, so what the forward saves counts in the backward); the
inputs, ``dout`` and whatever existed before the call do not count, the outputs and
gradients do, for the ring and for SDPA alike.

    OMP_NUM_THREADS=1 python bench/memory.py                       # S=8K,16K; fp32, bf16; W=2,4
    OMP_NUM_THREADS=1 python bench/memory.py --seq 32768 --world 2,4,8 --dtype float32
    OMP_NUM_THREADS=1 python bench/memory.py --kv-heads 2 --direction tokenring  # queries travel
"""

from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ring_cpu.py, when imported

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from ring_cpu import DTYPES, Shape

from ringctl.plan import DIRECTIONS, seq_len_divisor
from ringctl.workloads.attention import PeakMemory

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
MB = 1e6


def measured_fwd_bwd(
    peak: PeakMemory, forward: Callable[[], Any], backward: Callable[[Any], Any]
) -> tuple[int, int, float, float]:
    """(forward peak, backward peak, wall seconds, CPU seconds of this process) of one
    fwd+bwd, both peaks from the level before it. CPU time is what the call cost this
    process, whatever else the machine runs meanwhile (2 shared cores: wall time is noisy).

    The forward's result and the backward's gradients stay alive until both peaks are read,
    so the backward's figure includes what forward saved and what backward returns."""
    peak.start()
    start, cpu = time.perf_counter(), time.process_time()
    out = forward()
    fwd = peak.peak()
    peak.restart()  # the mark restarts at the current level, which still holds out and saved
    grads = backward(out)
    if peak.device.type == "cuda":
        torch.cuda.synchronize(peak.device)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    bwd = peak.peak()
    del out, grads
    if fwd is None or bwd is None:
        raise RuntimeError("no peak memory source: needs CUDA, or Linux's /proc/self/clear_refs")
    return fwd, bwd, seconds, cpu


@dataclass(frozen=True)
class Point:
    shape: Shape
    world: int
    device: str
    repeats: int
    sdpa: bool  # rank 0 also measures SDPA (once per shape: its figure does not depend on W)
    direction: str = "one_way"  # the ring's (ringctl.plan.DIRECTIONS), on the rank-order ring


def _rank_main(rank: int, port: int, point: Point, results: Any) -> None:
    torch.set_num_threads(1)
    world, shape = point.world, point.shape
    cuda = point.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
        world_size=world, timeout=timedelta(seconds=1800),
    )  # fmt: skip
    try:
        from ringctl.plan import make_plan
        from ringctl.ring import ring_attention, shard_sequence
        from ringctl.topology import Topology

        plan = make_plan(Topology((world,)), layout=shape.layout, order="rank", direction=point.direction)
        full = [x.to(device) for x in shape.inputs()]
        q, k, v, dout = (shard_sequence(x, rank, world, layout=shape.layout) for x in full)
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        peak = PeakMemory(device)

        def ring_fwd() -> torch.Tensor:
            return ring_attention(*leaves, causal=shape.causal, layout=shape.layout, plan=plan)

        def ring_bwd(out: torch.Tensor) -> Any:
            return torch.autograd.grad(out, leaves, dout)

        if rank == 0 and point.sdpa:
            sq, sk, sv, sdout = (x.transpose(1, 2) for x in full)
            sleaves = [x.detach().requires_grad_() for x in (sq, sk, sv)]

            def sdpa_fwd() -> torch.Tensor:
                return F.scaled_dot_product_attention(
                    sleaves[0], sleaves[1], sleaves[2], is_causal=shape.causal,
                    enable_gqa=shape.heads != shape.kv_heads,
                )  # fmt: skip

            def sdpa_bwd(out: torch.Tensor) -> Any:
                return torch.autograd.grad(out, sleaves, sdout)

        del full
        rounds = []
        for _ in range(point.repeats + 1):  # round 0 warms up (code pages, gloo pairs)
            row: dict[str, Any] = {}
            dist.barrier()
            if rank == 0 and point.sdpa:
                row["sdpa"] = measured_fwd_bwd(peak, sdpa_fwd, sdpa_bwd)
            dist.barrier()
            row["ring"] = measured_fwd_bwd(peak, ring_fwd, ring_bwd)
            dist.barrier()
            rounds.append(row)
        results.put((rank, rounds[1:]))
    finally:
        dist.destroy_process_group()


def measure(point: Point) -> list[list[dict[str, Any]]]:
    """Every rank's measured rounds, by rank."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_rank_main, args=(r, port, point, results))
        for r in range(point.world)
    ]
    os.environ.update(MALLOC_ENV)  # read by glibc when each spawned interpreter starts
    for proc in procs:
        proc.start()
    reports: dict[int, Any] = {}
    while len(reports) < point.world:
        try:
            rank, rounds = results.get(timeout=5)
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs):
                for proc in procs:
                    proc.kill()
                codes = [p.exitcode for p in procs]
                raise RuntimeError(
                    f"bench ranks exited without results (exit codes {codes})"
                ) from None
            continue
        reports[rank] = rounds
    for proc in procs:
        proc.join()
    return [reports[r] for r in range(point.world)]


def predicted(shape: Shape, world: int, device: str, direction: str = "one_way") -> Any:
    """The planner's prediction for this point (ringctl.memory.predict_peak)."""
    from ringctl.memory import predict_peak

    return predict_peak(
        batch=shape.batch, seq_len=shape.seq, heads=shape.heads, kv_heads=shape.kv_heads,
        head_dim=shape.head_dim, dtype=shape.dtype, world_size=world, layout=shape.layout,
        causal=shape.causal, block_impl="triton" if device == "cuda" else "torch", direction=direction,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="bench/memory.py", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--world", default="2,4", help="comma-separated world sizes (default 2,4)")
    parser.add_argument("--seq", default="8192,16384", help="comma-separated global lengths")
    parser.add_argument("--dtype", default="float32,bfloat16", help="comma-separated dtypes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: --heads (no GQA)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--layout", default="zigzag")
    parser.add_argument("--repeats", type=int, default=1, help="measured rounds after warm-up")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--direction", choices=DIRECTIONS, default="one_way", help="what travels the ring (default one_way)")
    args = parser.parse_args(argv)
    worlds = [int(w) for w in args.world.split(",")]
    seqs = [int(s) for s in args.seq.split(",")]
    dtypes = args.dtype.split(",")
    for dtype in dtypes:
        if dtype not in DTYPES:
            parser.error(f"--dtype {dtype}: allowed {', '.join(sorted(DTYPES))}")
    for world in worlds:
        for seq in seqs:
            if seq % seq_len_divisor(args.layout, world):
                parser.error(f"--seq {seq} is not a multiple of the {args.layout} divisor on W={world}")
        if args.device == "cuda" and torch.cuda.device_count() < world:
            parser.error(f"--device cuda --world {world}: only {torch.cuda.device_count()} GPU(s)")
    load = os.getloadavg()
    print(
        f"B={args.batch} H={args.heads} Hkv={args.kv_heads or args.heads} D={args.head_dim} "
        f"causal={args.causal} {args.layout} {args.direction}; {args.device}, 1 torch thread per process; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; MB = 1e6 bytes",
        flush=True,
    )
    header = (
        f"{'S':>6} {'dtype':>8} {'W':>2} | {'SDPA MB':>8} {'ring/rank MB (fwd, bwd)':>24} "
        f"{'xW/SDPA':>7} | {'pred MB':>8} {'pred/meas':>9} | {'SDPA s':>7} {'ring s':>7} "
        f"{'ring cpu s':>10}"
    )
    print(header, flush=True)
    for seq in seqs:
        for dtype in dtypes:
            sdpa = sdpa_s = 0.0
            for world in worlds:
                shape = Shape(
                    args.batch, seq, args.heads, args.kv_heads or args.heads, args.head_dim,
                    dtype, args.causal, args.layout,
                )  # fmt: skip
                first = world == worlds[0]
                by_rank = measure(Point(shape, world, args.device, args.repeats, sdpa=first, direction=args.direction))
                if first:
                    sdpa = max(max(r["sdpa"][:2]) for r in by_rank[0])
                    sdpa_s = statistics.median(r["sdpa"][2] for r in by_rank[0])
                fwd = max(r["ring"][0] for rounds in by_rank for r in rounds)
                bwd = max(r["ring"][1] for rounds in by_rank for r in rounds)
                ring_s, ring_cpu = (
                    statistics.median(
                        max(rounds[i]["ring"][j] for rounds in by_rank)
                        for i in range(args.repeats)
                    )
                    for j in (2, 3)
                )
                per_rank = max(fwd, bwd)
                pred = predicted(shape, world, args.device, args.direction)
                pred_mb = f"{pred.total / MB:8.1f}" if pred is not None else f"{'-':>8}"
                ratio = f"{pred.total / per_rank:9.2f}" if pred is not None else f"{'-':>9}"
                ranks = f"{per_rank / MB:7.1f} ({fwd / MB:6.1f},{bwd / MB:7.1f})"
                print(
                    f"{seq:>6} {dtype:>8} {world:>2} | {sdpa / MB:8.1f} {ranks:>24} "
                    f"{per_rank * world / sdpa:7.2f} | {pred_mb} {ratio} | "
                    f"{sdpa_s:7.2f} {ring_s:7.2f} {ring_cpu:10.2f}",
                    flush=True,
                )
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)


if __name__ == "__main__":
    main()
