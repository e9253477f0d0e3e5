"""One-way vs bidirectional pass-KV vs TokenRing ring attention, fwd+bwd, on emulated fabrics, side by side.

    sudo .venv/bin/python bench/bidirectional.py                    # 3 and 4 nodes, 100mbit, 8/8 and 8/2
    sudo .venv/bin/python bench/bidirectional.py --nodes 3 --seq-local 512 --rounds 3

For each node count, a `links=switch` and a `links=mesh` dev cluster (slurm/dev-cluster,
one rank per node, every hop crosses the fabric) are brought up together. On each, one srun
job (one task per node, gloo over eth0) runs ring_attention forward+backward in float32
with the plan one-way, bidirectional and TokenRing in rotation, round after round (the
first of a round rotating), for each `--shapes` Hq/Hkv, and reports the slowest rank's
seconds per call. The job also measures what the cost model needs, as `ringctl calibrate`
does: on a switch the port's efficiency under flows to two peers (shared_port_efficiency),
the fixed cost of a ring step (step_overhead_us) and the block compute rate (a ring of one
on the same shard size and query heads); with them and the fabric's tbf rate it asks the
planner for its prediction of each direction and for its `direction=auto` choice, and
prints beside them the errors and the choice of the model without the first two figures,
and auto's choice without its margin (topology.direction_min_gain=0: the fastest
prediction). Bytes sent per phase, link class and direction are checked against the plan's
prediction in every call.

Goal (issue 13): bidirectional / one-way <= 0.6 where link-bound on the mesh (~1.0 on a
switch: a one-way ring already keeps every NIC busy both ways), predictions within +-25%,
auto the measured fastest or within 10% of it. TokenRing moves the queries (and partial
results back) instead of K/V: with Hq == Hkv its queries are half the K/V bytes; with GQA
it moves more than pass-KV and should lose.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

LINKS = ("switch", "mesh")
DIRECTIONS = ("one_way", "bidirectional", "tokenring")
SHORT = {"one_way": "one", "bidirectional": "bi", "tokenring": "tr"}
HEAD_DIM = 64
INTER_LATENCY_US = 704.0  # emulated3node.yaml: bench/calibrate.py, a 4-byte hop
SHARED_PORT_BYTES = 4 << 20  # per peer in the shared-port probe (ringctl calibrate: 2 x a K/V block, 2 MiB at 8/8)


def parse_shape(text: str) -> tuple[int, int]:
    """Parse "Hq/Hkv" -> (query heads, K/V heads); Hkv must divide Hq."""
    try:
        hq, hkv = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shapes {text!r}: allowed Hq/Hkv, e.g. 8/8 or 8/2") from None
    if hq < 1 or hkv < 1 or hq % hkv:
        raise ValueError(f"--shapes {text!r}: Hq and Hkv >= 1, Hkv a divisor of Hq")
    return hq, hkv


def directions_for(kv_heads: int) -> tuple[str, ...]:
    """Directions the shape can run: bidirectional splits the K/V heads, so needs two."""
    return tuple(d for d in DIRECTIONS if d != "bidirectional" or kv_heads >= 2)


def _topology(nodes: int, links: str, rate_GBps: float, tflops: float, efficiency: float = 1.0, overhead_us: float = 0.0) -> Any:
    from ringctl.topology import LinkClass, Topology

    return Topology(
        (1,) * nodes, inter=LinkClass("inter", rate_GBps, INTER_LATENCY_US, links, shared_port_efficiency=efficiency),
        compute_tflops=tflops, step_overhead_us=overhead_us, name=f"emulated{nodes}node-{links}",
    )  # fmt: skip


def measure_efficiency(rank: int, world: int) -> dict[str, float] | None:
    """The switch port's efficiency under flows to two peers (topology.inter.
    shared_port_efficiency), measured by `ringctl calibrate`'s own probe
    (measure_shared_port, one rank per node): SHARED_PORT_BYTES to the next and to the
    previous rank at once against twice that to the next alone, every rank at once, the
    least of 5 runs each. None below three ranks (next and previous are one peer)."""
    import torch

    from ringctl.workloads.calibrate import SLOPE_FACTOR, Lanes, measure_shared_port

    block = 2 * SHARED_PORT_BYTES // SLOPE_FACTOR  # the probe sends SLOPE_FACTOR x block / 2 per peer
    return measure_shared_port(block, Lanes([[r] for r in range(world)]), rank, torch.device("cpu"))


def worker(args: argparse.Namespace) -> None:
    """One srun task: per shape, time the directions' calls in rotation; rank 0 prints JSON."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "eth0")
    import torch
    import torch.distributed as dist

    from ringctl.plan import Workload, estimate, make_plan
    from ringctl.ring import comm_stats, reset_comm_stats, ring_attention
    from ringctl.workloads.calibrate import Shape, measure_step_overhead, rate_without_overhead

    torch.set_num_threads(1)
    rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
    dist.init_process_group("gloo", init_method=f"file://{args.dir}/rendezvous", rank=rank, world_size=world)
    s = args.seq_local

    def call(plan: object | None, tensors: tuple[torch.Tensor, ...]) -> float:
        q, k, v, dout = tensors
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        dist.barrier()
        t0 = time.perf_counter()
        if plan is None:  # a ring of one: this rank's block compute alone (no group)
            out = _local_attention(*leaves)
        else:
            out = ring_attention(*leaves, layout="contiguous", plan=plan)
        torch.autograd.grad(out, leaves, dout)
        took = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        dist.all_reduce(took, op=dist.ReduceOp.MAX)
        return float(took)

    def _local_attention(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor) -> torch.Tensor:
        from ringctl.ring.attention import _RingAttention, _RingSpec, make_schedule
        from ringctl.ring.mask import MaskSpec

        one = make_plan(_topology(1, "switch", 1.0, 1.0), layout="contiguous", algorithm="flat")
        spec = _RingSpec(None, make_schedule(one, 0), "contiguous", MaskSpec(None, False, (-1, -1)), HEAD_DIM**-0.5)
        return _RingAttention.apply(q_, k_, v_, spec)

    # a switch: how much of a port's rate flows to two peers at once get (a mesh has none)
    probe = measure_efficiency(rank, world) if args.links == "switch" else None
    efficiency = probe["efficiency"] if probe else 1.0
    results: dict[str, dict[str, object]] = {}
    for shape in args.shapes:
        heads, kv_heads = parse_shape(shape)
        gen = torch.Generator().manual_seed(rank)
        tensors = tuple(torch.randn(1, s, n, HEAD_DIM, generator=gen) for n in (heads, kv_heads, kv_heads, heads))
        workload = Workload(batch=1, seq_len=s * world, heads=heads, kv_heads=kv_heads, head_dim=HEAD_DIM,
                            dtype="float32", causal=False)  # fmt: skip
        call(None, tensors)  # warm-up
        compute_s = statistics.median(call(None, tensors) for _ in range(2))
        # fwd + bwd FLOPs of one block: 4 S^2 H D forward, 2.5 x that backward (plan.BACKWARD_FLOP_RATIO)
        flops = 3.5 * 4 * s * s * heads * HEAD_DIM
        tflops0 = flops / compute_s / 1e12
        # the fixed cost of a ring step as `ringctl calibrate` measures it (a one-way ring
        # forward on 8-token blocks, less the model's time for it, per step); the block rate
        # then leaves out the two steps' worth (forward and backward) its timing paid
        shape_ = Shape(1, s * world, heads, kv_heads, HEAD_DIM, "float32", "contiguous", False)
        zero = _topology(world, args.links, args.rate_GBps, tflops0, efficiency)
        overhead_us = measure_step_overhead(shape_, zero, rank, torch.device("cpu"))["step_overhead_us"]
        tflops, _subtracted = rate_without_overhead(flops, compute_s, 2, overhead_us * 1e-6)
        topo = _topology(world, args.links, args.rate_GBps, tflops, efficiency, overhead_us)
        directions = directions_for(kv_heads)
        plans = {d: make_plan(topo, layout="contiguous", direction=d) for d in directions}
        before = _topology(world, args.links, args.rate_GBps, tflops0)  # the model without the new figures
        plans1 = {d: make_plan(before, layout="contiguous", direction=d) for d in directions}
        for d in directions:  # warm-up: connections, buffers
            call(plans[d], tensors)
        times: dict[str, list[float]] = {d: [] for d in directions}
        bytes_ok = True
        for r in range(args.rounds):
            for d in directions[r % len(directions) :] + directions[: r % len(directions)]:  # rotating first
                reset_comm_stats()
                times[d].append(call(plans[d], tensors))
                measured = comm_stats(by_direction=True)
                for phase in ("forward", "backward"):
                    predicted = plans[d].predicted_bytes(1, s * world, kv_heads, HEAD_DIM, 4, phase, by_direction=True, heads=heads)
                    want = {link: {h: per[rank] for h, per in by.items()} for link, by in predicted.items()}
                    bytes_ok &= measured[phase] == want
        ok = torch.tensor([int(bytes_ok)])
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        auto = make_plan(topo, layout="contiguous", direction="auto", workload=workload)
        results[shape] = {
            "times": times, "compute_s": compute_s, "tflops": tflops, "bytes_match_plan": bool(ok),
            "predicted": {d: estimate(p, workload).total_s for d, p in plans.items()}, "auto": auto.direction,
            "predicted_full_rate": {d: estimate(p, workload).total_s for d, p in plans1.items()},
            "auto_full_rate": make_plan(before, layout="contiguous", direction="auto", workload=workload).direction,
            "auto_no_margin": make_plan(topo, layout="contiguous", direction="auto", workload=workload,
                                        direction_min_gain=0.0).direction,
            "efficiency": efficiency, "probe": probe, "step_overhead_us": overhead_us,
        }  # fmt: skip
    if rank == 0:
        print(json.dumps({"shapes": results}), flush=True)
    dist.destroy_process_group()


def run_job(cluster: object, nodes: int, links: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ringctl-bidir-") as folder:
        out = cluster.run(  # type: ignore[attr-defined]
            "srun", f"-N{nodes}", "--ntasks-per-node=1", "--export=ALL,OMP_NUM_THREADS=1",
            sys.executable, str(Path(__file__).resolve()), "--worker", "--dir", folder, "--links", links,
            "--seq-local", str(args.seq_local), "--rounds", str(args.rounds), "--rate-GBps", str(args.rate_GBps),
            "--shapes", *args.shapes, timeout=900, check=False,
        )  # fmt: skip
    # rank 0 prints before the group is torn down; a task's gloo teardown may still abort
    # (seen once: "terminate called without an active exception"), which loses no figure
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if len(lines) != 1:
        raise RuntimeError(f"bidirectional worker gave no result (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    return json.loads(lines[0])["shapes"]


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """One job's figures for a shape -> medians, ratios vs one-way, prediction errors
    (predicted / measured - 1), the measured fastest and auto's time over the fastest's."""
    med = {d: statistics.median(t) for d, t in res["times"].items()}
    fastest = min(med, key=lambda d: med[d])
    return {
        "median": med,
        "ratio": {d: med[d] / med["one_way"] for d in med},
        "error": {d: res["predicted"][d] / med[d] - 1 for d in med},
        "fastest": fastest,
        "auto_over_fastest": med[res["auto"]] / med[fastest] if res["auto"] in med else float("nan"),
    }


def _cell(table: dict[str, float], d: str, fmt: str, width: int) -> str:
    return format(table[d], fmt) if d in table else "-".rjust(width)


def format_row(nodes: int, links: str, shape: str, res: dict[str, Any]) -> str:
    """One table row (the header's columns; "-" where the shape cannot run a direction)."""
    got = summarise(res)
    med, ratio, err, pred = got["median"], got["ratio"], got["error"], res["predicted"]
    err1 = {d: res["predicted_full_rate"][d] / med[d] - 1 for d in med}
    return (
        f"{nodes:5d} {links:>6s} {shape:>6s} "
        + " ".join(_cell(med, d, "6.2f", 6) for d in DIRECTIONS)
        + f" {_cell(ratio, 'bidirectional', '6.2f', 6)} {_cell(ratio, 'tokenring', '6.2f', 6)} "
        f"{_cell(pred, 'one_way', '8.2f', 8)} {_cell(pred, 'bidirectional', '7.2f', 7)} "
        f"{_cell(pred, 'tokenring', '7.2f', 7)} {_cell(err, 'one_way', '+7.0%', 7)} "
        f"{_cell(err, 'bidirectional', '+6.0%', 6)} {_cell(err, 'tokenring', '+6.0%', 6)} "
        f"{res['auto']:>13s} {got['fastest']:>13s} {got['auto_over_fastest']:9.2f} "
        f"{'=plan' if res['bytes_match_plan'] else 'MISMATCH'}  (block compute {res['compute_s']:.3f} s; "
        f"port efficiency {res['efficiency']:.3f}; step overhead {res['step_overhead_us'] / 1e3:.1f} ms; "
        f"without both: err one/bi/tr {'/'.join(_cell(err1, d, '+.0%', 1) for d in DIRECTIONS)}, "
        f"auto {res['auto_full_rate']}; auto with no min gain: {res.get('auto_no_margin', '?')})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 4], help="node counts (default 3 4)")
    parser.add_argument("--inter", default="100mbit", help="tbf rate of every link, each way (default 100mbit)")
    parser.add_argument("--seq-local", type=int, default=256,
                        help="tokens per rank (default 256: every shape's one-way hop 3x its block's compute and more)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per job, directions rotating (default 7)")
    parser.add_argument("--shapes", nargs="+", default=["8/8", "8/2"], help="query/K-V heads (default 8/8 8/2)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--links", choices=LINKS, help=argparse.SUPPRESS)
    parser.add_argument("--rate-GBps", type=float, default=0.0125, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not args.inter.endswith("mbit"):
        raise SystemExit(f"bidirectional: --inter {args.inter}: allowed <N>mbit")
    args.rate_GBps = float(args.inter[:-4]) * 1e6 / 8 / 1e9
    if any(not 2 <= n <= 16 for n in args.nodes) or args.rounds < 1 or args.seq_local < 2:
        raise SystemExit("bidirectional: --nodes 2..16 each, --rounds >= 1, --seq-local >= 2")
    try:
        for shape in args.shapes:
            parse_shape(shape)
    except ValueError as exc:
        raise SystemExit(f"bidirectional: {exc}") from None
    if os.geteuid() != 0:
        raise SystemExit("bidirectional: the dev cluster needs root")
    from slurm_cluster import start, stop

    print(f"uptime load before: {os.getloadavg()[0]:.2f}; tbf {args.inter} each way per link; "
          f"{args.seq_local} tokens/rank, heads Hq/Hkv x {HEAD_DIM}, float32, fwd+bwd; "
          "seconds = slowest rank, median over rounds; err = predicted / measured - 1")  # fmt: skip
    print(f"{'nodes':>5s} {'links':>6s} {'Hq/Hkv':>6s} {'one s':>6s} {'bi s':>6s} {'tr s':>6s} {'bi/one':>6s} "
          f"{'tr/one':>6s} {'pred one':>8s} {'pred bi':>7s} {'pred tr':>7s} {'err one':>7s} {'err bi':>6s} "
          f"{'err tr':>6s} {'auto':>13s} {'fastest':>13s} {'auto/fast':>9s} bytes")  # fmt: skip
    for nodes in args.nodes:
        clusters: dict[str, object] = {}
        results: dict[str, dict[str, Any]] = {}
        try:
            for links in LINKS:
                clusters[links] = start(
                    Path(f"/tmp/ringctl-bidir-{links}-{os.getpid()}"), nodes=nodes, cpus=1,
                    prefix=f"d{links[0]}{os.getpid() % 10000}n", fabric=f"inter={args.inter},links={links}",
                )  # fmt: skip
            for links in LINKS:
                results[links] = run_job(clusters[links], nodes, links, args)
        finally:
            for cluster in clusters.values():
                stop(cluster)  # type: ignore[arg-type]
        for links in LINKS:
            for shape in args.shapes:
                print(format_row(nodes, links, shape, results[links][shape]))
    print(f"uptime load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
