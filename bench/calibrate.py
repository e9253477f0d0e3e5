"""Calibrate the cost model on this machine: per-rank attention FLOP rate and link figures.

The cost model (ringctl/plan.py `estimate`) prices a ring step as max(compute, transfer),
compute = model FLOPs / `topology.compute_tflops`. On CPU that rate depends on how many
ranks share the cores, so it is measured with the benchmark's own ranks running at once:

    # inside the dev cluster (what bench/fabric.py does): same nodes, tasks, env as the jobs
    srun -N2 --ntasks-per-node=2 python bench/calibrate.py --dir /tmp/cal --seq-len 8192
    # on this machine without SLURM (4 processes, 2 virtual nodes of 2), for a dry run
    python bench/calibrate.py --local 2x2 --seq-len 8192 [--write conf/topology/emulated2node.yaml]

Every rank, all at once (one barrier before each measurement):
- ring (what `--write` uses): ringctl's own ring forward at a size where its transfers hide
  behind compute (hierarchical plan; pick --seq-len large enough). rate = the model's FLOPs
  of one forward (W x 4 B Hq D x 0.5 x s^2, s = tokens per rank) / time of the slowest
  rank. On 2 shared cores this is what a ring step's compute really costs: the blocks plus
  merges, gloo's copies and progress threads competing for the same cores.
- compute: the block computes alone (no communication), at the zigzag causal positions the
  ring uses: the same FLOPs / time; the backward's ratio to the forward is reported beside
  the model's 2.5. The gap between this and `ring` is the CPU the ring spends on the rest.
- intra: each node's ranks run one inner-ring hop (send to l+1, receive from l-1) of a
  K/V block, all nodes at once: bandwidth = block bytes / time; latency from a 4-byte hop.
- inter: every rank sends a K/V block to its peer with the same local index on the next
  node (the outer ring's hop; all NICs busy): bandwidth per flow = block bytes / time.

Rank 0 prints one JSON object; `--write CONFIG` puts compute_tflops, intra's bandwidth and
latency and inter's latency into that topology YAML (inter's bandwidth stays the fabric's
tbf rate, so the plan prices the link the fabric emulates).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

REPEATS = 5


@dataclass(frozen=True)
class Shape:
    """The benchmark's attention sizes (global sequence), float32, causal zigzag."""

    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int

    def block_tokens(self, world: int) -> int:
        from ringctl.plan import check_seq_len

        return check_seq_len(self.seq_len, "zigzag", world, key="--seq-len")

    def kv_bytes(self, world: int) -> int:
        """K and V of one shard, float32 (what one ring hop carries)."""
        return 2 * self.batch * self.block_tokens(world) * self.kv_heads * self.head_dim * 4

    def forward_flops(self, world: int) -> float:
        """The cost model's FLOPs of one ring forward on one rank (W balanced causal blocks)."""
        s = self.block_tokens(world)
        return world * 4 * self.batch * self.heads * self.head_dim * 0.5 * s * s


@dataclass(frozen=True)
class Where:
    """This process in the job: global rank, world, node index, local index, ranks per node."""

    rank: int
    world: int
    node: int
    local: int
    per_node: int

    @property
    def nodes(self) -> int:
        return self.world // self.per_node

    def global_rank(self, node: int, local: int) -> int:
        """Rank of (node, local) under block placement (srun's default)."""
        return (node % self.nodes) * self.per_node + local % self.per_node


def _timed(fn: Any, repeats: int = REPEATS) -> float:
    """Seconds of fn() on the slowest rank, the least over `repeats` runs after one warm-up;
    a barrier before each run so ranks run at once. The slowest rank per run (the ring waits
    for it), then the least run: the cores are shared with other people's work, and the
    least is the run they disturbed least (bench/fabric.py reads the jobs' times the same way)."""
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest.min())


def measure_compute(shape: Shape, where: Where) -> dict[str, float]:
    """Forward and backward block computes of one ring pass, as the ring runs them."""
    from ringctl.ring.block import block_backward, block_forward
    from ringctl.ring.layouts import token_positions

    world, s = where.world, shape.block_tokens(where.world)
    gen = torch.Generator().manual_seed(where.rank)
    q = torch.randn(shape.batch, s, shape.heads, shape.head_dim, generator=gen)
    k = torch.randn(shape.batch, s, shape.kv_heads, shape.head_dim, generator=gen)
    v = torch.randn_like(k)
    dout = torch.randn_like(q)
    scale = 1.0 / math.sqrt(shape.head_dim)
    q_pos = token_positions(shape.seq_len, where.rank, world, "zigzag")
    k_pos = [token_positions(shape.seq_len, src, world, "zigzag") for src in range(world)]
    saved = {src: block_forward(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos[src]) for src in range(world)}

    def forward() -> None:
        for src in range(world):
            block_forward(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos[src])

    def backward() -> None:
        for src in range(world):
            out, lse = saved[src]
            block_backward(dout, q, k, v, out, lse, scale=scale, q_pos=q_pos, k_pos=k_pos[src])

    t_fwd = _timed(forward)
    t_bwd = _timed(backward)
    return {
        "forward_s": t_fwd,
        "backward_s": t_bwd,
        "compute_tflops": shape.forward_flops(world) / t_fwd / 1e12,
        "backward_over_forward": t_bwd / t_fwd,
    }


def measure_ring(shape: Shape, where: Where) -> dict[str, float]:
    """The ring's own forward (ringctl.ring_attention, hierarchical plan on the discovered
    placement) at a size where its transfers hide behind compute: rate = the model's
    forward FLOPs / time of the slowest rank. Unlike the block-only figure this includes
    what the ring spends besides FLOPs on these cores: merges, gloo's copies and threads."""
    from ringctl.plan import make_plan
    from ringctl.ring import ring_attention
    from ringctl.topology import Topology

    names: list[Any] = [None] * where.world
    dist.all_gather_object(names, os.environ.get("SLURMD_NODENAME") or f"virtual{where.node}")
    topology = Topology.discover(names)
    algorithm = "hierarchical" if topology.is_even and topology.nodes > 1 else "flat"
    plan = make_plan(topology, layout="zigzag", algorithm=algorithm)
    s = shape.block_tokens(where.world)
    gen = torch.Generator().manual_seed(where.rank)
    q = torch.randn(shape.batch, s, shape.heads, shape.head_dim, generator=gen)
    k = torch.randn(shape.batch, s, shape.kv_heads, shape.head_dim, generator=gen)
    v = torch.randn_like(k)

    def forward() -> None:
        with torch.no_grad():
            ring_attention(q, k, v, causal=True, layout="zigzag", plan=plan)

    t_fwd = _timed(forward, repeats=3)
    return {"plan": algorithm, "forward_s": t_fwd, "compute_tflops": shape.forward_flops(where.world) / t_fwd / 1e12}


def _hop_time(nbytes: int, send_to: int, recv_from: int) -> float:
    """Median seconds of one send/recv pair of nbytes, all ranks at once (slowest rank)."""
    n = max(1, nbytes // 4)
    send, recv = torch.ones(n), torch.empty(n)

    def hop() -> None:
        # irecv first, as ringctl/ring/comm.py posts a hop (why: see there)
        ops = [dist.P2POp(dist.irecv, recv, recv_from), dist.P2POp(dist.isend, send, send_to)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return _timed(hop)


def measure_link(shape: Shape, where: Where, link: str) -> dict[str, float] | None:
    """Bandwidth (GB/s) and latency (us) of the inner-ring (intra) or outer-ring (inter) hop."""
    if link == "intra":
        if where.per_node < 2:
            return None
        to = where.global_rank(where.node, where.local + 1)
        frm = where.global_rank(where.node, where.local - 1)
    else:
        if where.nodes < 2:
            return None
        to = where.global_rank(where.node + 1, where.local)
        frm = where.global_rank(where.node - 1, where.local)
    nbytes = shape.kv_bytes(where.world)
    latency = _hop_time(4, to, frm)
    seconds = _hop_time(nbytes, to, frm)
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "latency_us": latency * 1e6,
        "bandwidth_GBps": nbytes / max(seconds - latency, 1e-9) / 1e9,
    }


def worker(where: Where, shape: Shape, store_dir: str) -> dict[str, Any] | None:
    """One rank's part; rank 0 returns the figures."""
    store = dist.FileStore(os.path.join(store_dir, "store"), where.world)
    dist.init_process_group("gloo", store=store, rank=where.rank, world_size=where.world)
    try:
        result = {
            "world_size": where.world,
            "nodes": where.nodes,
            "ranks_per_node": where.per_node,
            "torch_threads": torch.get_num_threads(),
            "shape": shape.__dict__,
            "block_tokens": shape.block_tokens(where.world),
            "compute": measure_compute(shape, where),
            "ring": measure_ring(shape, where),
            "intra": measure_link(shape, where, "intra"),
            "inter": measure_link(shape, where, "inter"),
        }
        dist.barrier()
        return result if where.rank == 0 else None
    finally:
        dist.destroy_process_group()


def _local_worker(rank: int, nodes: int, per_node: int, shape: Shape, store_dir: str, out: str) -> None:
    where = Where(rank, nodes * per_node, rank // per_node, rank % per_node, per_node)
    result = worker(where, shape, store_dir)
    if result is not None:
        Path(out).write_text(json.dumps(result))


def run_local(nodes: int, per_node: int, shape: Shape) -> dict[str, Any]:
    """All ranks as processes on this machine (virtual nodes: every link is loopback)."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="ringctl-calibrate-") as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_local_worker, args=(nodes, per_node, shape, tmp, out), nprocs=nodes * per_node, join=True)
        return json.loads(Path(out).read_text())


def run_slurm(shape: Shape, store_dir: str) -> dict[str, Any] | None:
    """This process is one srun task (block distribution)."""
    env = os.environ
    world = int(env["SLURM_NTASKS"])
    nodes = int(env["SLURM_NNODES"])
    where = Where(int(env["SLURM_PROCID"]), world, int(env["SLURM_NODEID"]), int(env["SLURM_LOCALID"]), world // nodes)
    return worker(where, shape, store_dir)


# ---- writing the figures into a topology config ------------------------------------------


def _set(text: str, pattern: str, value: str, path: Path) -> str:
    """Replace the value on the YAML line matched by pattern, keeping its comment."""
    new, count = re.subn(pattern, lambda m: f"{m.group(1)}{value}{m.group(3)}", text, count=1, flags=re.M)
    if count != 1:
        raise ValueError(f"{path}: no line matches {pattern!r}; cannot write the calibration")
    return new


def write_config(path: Path, result: dict[str, Any]) -> None:
    """compute_tflops, intra bandwidth/latency and inter latency into the YAML, comments kept."""
    text = path.read_text()
    text = _set(text, r"^(compute_tflops:\s*)(\S+)(.*)$", f"{result['ring']['compute_tflops']:.3g}", path)
    intra = result.get("intra")
    if intra:
        text = _set(text, r"^(  bandwidth_GBps:\s*)(\S+)(\s*# intra.*)$", f"{intra['bandwidth_GBps']:.3g}", path)
        text = _set(text, r"^(  latency_us:\s*)(\S+)(\s*# intra.*)$", f"{intra['latency_us']:.3g}", path)
    inter = result.get("inter")
    if inter:  # the bandwidth stays the fabric's tbf rate; only the start-up cost is measured
        text = _set(text, r"^(  latency_us:\s*)(\S+)(\s*# inter.*)$", f"{inter['latency_us']:.3g}", path)
    path.write_text(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=2048, help="global sequence length of the benchmark point")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--local", default=None, metavar="NxL", help="run N virtual nodes x L ranks here (no SLURM)")
    p.add_argument("--dir", default=None, help="a folder every task sees (srun mode: the rendezvous file)")
    p.add_argument("--write", action="append", default=[], type=Path, help="topology YAML to update (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here (rank 0)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = Shape(args.batch, args.seq_len, args.heads, args.kv_heads, args.head_dim)
    if args.local:
        found = re.fullmatch(r"(\d+)x(\d+)", args.local)
        if not found or int(found.group(1)) < 1 or int(found.group(2)) < 1:
            raise SystemExit(f"calibrate: --local {args.local!r}: NxL with N, L >= 1 (e.g. 2x2)")
        result = run_local(int(found.group(1)), int(found.group(2)), shape)
    elif "SLURM_PROCID" in os.environ:
        if not args.dir:
            raise SystemExit("calibrate: under srun, --dir SHARED_FOLDER is needed (the rendezvous file)")
        result = run_slurm(shape, args.dir)
    else:
        raise SystemExit("calibrate: run it under srun, or pass --local NxL")
    if result is None:
        return 0
    print(json.dumps(result), flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    for path in args.write:
        write_config(path, result)
        print(f"calibrate: wrote compute_tflops and intra into {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
