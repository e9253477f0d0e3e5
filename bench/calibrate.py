"""Calibrate the cost model under srun or as local processes, and edit a topology YAML in place.

The measuring is `ringctl calibrate`'s (ringctl/workloads/calibrate.py); this script runs it
outside a ringctl job, for bench/fabric.py, which calibrates inside its dev cluster with
srun and writes the figures into the scenario's topology YAML keeping its comments:

    # inside the dev cluster (what bench/fabric.py does): same nodes, tasks, env as the jobs
    srun -N2 --ntasks-per-node=2 python bench/calibrate.py --dir /tmp/cal --seq-len 8192
    # on this machine without SLURM (4 processes, 2 virtual nodes of 2), for a dry run
    python bench/calibrate.py --local 2x2 --seq-len 8192 [--write conf/topology/emulated2node.yaml]

Rank 0 prints one JSON object: `compute` (block computes + merges of one ring pass, with
ring hops in flight and with idle links; the K/V streaming rate, memory_bandwidth_GBps;
`ring_step`: the ring on 8-token blocks less the model's prediction without a fixed cost,
per step, step_overhead_us, measured after the links), `ring` (ringctl's own ring forward,
hierarchical plan: what `--write` uses as compute_tflops, less step_overhead_us per step;
pick --seq-len so its transfers hide behind compute), `intra` and `inter` (latency;
bandwidth per flow with every rank sending), `inter_one_lane`, `inter_shared_port` (3+
nodes: a NIC's efficiency with two peers at once) and `nics`. `--write CONFIG` puts
compute_tflops, step_overhead_us, memory_bandwidth_GBps, intra's bandwidth and latency,
inter's latency and (3+ nodes) inter's shared_port_efficiency into that topology YAML,
adding a missing step_overhead_us / memory_bandwidth_GBps (after step_overhead_us) /
shared_port_efficiency line (inter's bandwidth stays the fabric's tbf
rate, so the plan prices the link the fabric emulates). To write a whole topology file
from a job instead: `ringctl calibrate`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ringctl.topology import Topology
from ringctl.workloads.calibrate import (
    Shape,
    flat_ring_peers,
    measure_compute,
    measure_links,
    measure_ring_forward,
    measure_step_overhead,
    model_topology,
)

REPEATS = 5


def worker(rank: int, world: int, node_name: str, shape: Shape, store_dir: str) -> dict[str, Any] | None:
    """One rank's part (all ranks at once); rank 0 returns the figures."""
    store = dist.FileStore(os.path.join(store_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        names: list[Any] = [None] * world
        dist.all_gather_object(names, node_name)
        topology = Topology.discover(names)
        cpu = torch.device("cpu")
        order = [r for ranks in topology.ranks_of_nodes() for r in ranks]  # the flat node-order ring
        compute = measure_compute(
            shape, order.index(rank), world, cpu, repeats=REPEATS, busy_peers=flat_ring_peers(topology, rank), busy=world > 1,
        )
        links = measure_links(shape, topology, rank, cpu, repeats=REPEATS)
        # the fixed cost per ring step: the ring on tiny blocks less the model's prediction
        # without it, whose hops are priced with the links just measured
        step = measure_step_overhead(shape, model_topology(topology, compute, links), rank, cpu, repeats=REPEATS)
        compute["ring_step"], compute["step_overhead_us"] = step, step["step_overhead_us"]
        result = {
            "world_size": world,
            "nodes": topology.nodes,
            "ranks_per_node": list(topology.ranks_per_node),
            "torch_threads": torch.get_num_threads(),
            "shape": shape.__dict__,
            "block_tokens": shape.block_tokens(world),
            "compute": compute,
            # its rate less the same fixed cost per step, as the topology prices it apart
            "ring": measure_ring_forward(shape, topology, rank, cpu, step_overhead_s=step["step_overhead_us"] * 1e-6),
            **links,
        }
        dist.barrier()
        return result if rank == 0 else None
    finally:
        dist.destroy_process_group()


def _local_worker(rank: int, nodes: int, per_node: int, shape: Shape, store_dir: str, out: str) -> None:
    result = worker(rank, nodes * per_node, f"virtual{rank // per_node}", shape, store_dir)
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
    """This process is one srun task; its node is SLURMD_NODENAME."""
    env = os.environ
    node = env.get("SLURMD_NODENAME") or f"node{env['SLURM_NODEID']}"
    return worker(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), node, shape, store_dir)


# ---- writing the figures into a topology config ------------------------------------------


def _set(text: str, pattern: str, value: str, path: Path) -> str:
    """Replace the value on the YAML line matched by pattern, keeping its comment."""
    new, count = re.subn(pattern, lambda m: f"{m.group(1)}{value}{m.group(3)}", text, count=1, flags=re.MULTILINE)
    if count != 1:
        raise ValueError(f"{path}: no line matches {pattern!r}; cannot write the calibration")
    return new


def _set_or_add(
    text: str, section: str | None, key: str, value: str, comment: str, path: Path, after: str = "compute_tflops"
) -> str:
    """Replace `key`'s value (top level, or inside the `section:` block), its comment kept;
    a file without the key gets it as the block's last line (top level: after the `after`
    line, compute_tflops by default), with `comment`."""
    indent = "  " if section else ""
    if section is None:
        block = re.search(rf"^{after}:.*\n", text, flags=re.MULTILINE)
        if block is None:
            raise ValueError(f"{path}: no line matches '{after}:'; cannot write the calibration")
    else:
        block = re.search(rf"^{section}:.*\n(?:(?:  .*)?\n)*", text, flags=re.MULTILINE)
        if block is None:
            raise ValueError(f"{path}: no {section!r} block; cannot write the calibration")
    found = re.compile(rf"^({indent}{key}:\s*)(\S+)(.*)$", flags=re.MULTILINE)
    start, end = (block.start(), block.end()) if section else (0, len(text))
    if found.search(text, start, end):
        head, tail = text[:start], text[start:end]
        return head + found.sub(lambda m: f"{m.group(1)}{value}{m.group(3)}", tail, count=1) + text[end:]
    body = block.group(0).rstrip("\n")
    line = f"{indent}{key}: {value}    # {comment}"
    return text[: block.start()] + body + "\n" + line + "\n" + text[block.start() + len(body) + 1:]


def write_config(path: Path, result: dict[str, Any]) -> None:
    """compute_tflops, step_overhead_us, memory_bandwidth_GBps (null when not measurable),
    intra bandwidth/latency, inter latency and (3+ nodes) inter's shared_port_efficiency
    into the YAML, comments kept (a missing step_overhead_us, memory_bandwidth_GBps or
    shared_port_efficiency line is added)."""
    text = path.read_text()
    text = _set(text, r"^(compute_tflops:\s*)(\S+)(.*)$", f"{result['ring']['compute_tflops']:.3g}", path)
    compute = result["compute"]
    text = _set_or_add(
        text, None, "step_overhead_us", f"{compute['step_overhead_us']:.4g}",
        "fixed cost per ring step besides FLOPs (the ring on 8-token blocks less the model): bench/calibrate.py", path,
    )
    bandwidth = compute.get("memory_bandwidth_GBps")
    text = _set_or_add(
        text, None, "memory_bandwidth_GBps", "null" if bandwidth is None else f"{bandwidth:.4g}",
        "GB/s a rank streams K/V (1 query over a shard's keys less over 8; null: FLOPs only): bench/calibrate.py",
        path, after="step_overhead_us",
    )
    intra = result.get("intra")
    if intra:
        text = _set(text, r"^(  bandwidth_GBps:\s*)(\S+)(\s*# intra.*)$", f"{intra['bandwidth_GBps']:.3g}", path)
        text = _set(text, r"^(  latency_us:\s*)(\S+)(\s*# intra.*)$", f"{intra['latency_us']:.3g}", path)
    inter = result.get("inter")
    if inter:  # the bandwidth stays the fabric's tbf rate; only the start-up cost is measured
        text = _set(text, r"^(  latency_us:\s*)(\S+)(\s*# inter.*)$", f"{inter['latency_us']:.3g}", path)
    shared = result.get("inter_shared_port")
    if shared:
        text = _set_or_add(
            text, "inter", "shared_port_efficiency", f"{shared['efficiency']:.3g}",
            "inter: measured by bench/calibrate.py (one peer's time / two peers' at once through a NIC)", path,
        )
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
    result: dict[str, Any] | None  # None: a rank other than 0 under srun (rank 0 reports)
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
        print(f"calibrate: wrote compute_tflops, step_overhead_us, memory_bandwidth_GBps, intra and inter into {path}",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
