"""calibrate: measure what the cost model needs on the nodes a job got, write a topology.

`ringctl calibrate` runs this as a job workload (SLURM or local processes, like `ringctl
launch`), so it measures with the job's own nodes, ranks, threads, NIC binding and backend.
The cost model (ringctl/plan.py `estimate`) prices a ring step as max(compute, transfer):
compute = the model's FLOPs / `compute_tflops`, transfer = latency + bytes / bandwidth, with
the inter-node flows of a node sharing its `nics_per_node` NICs. Every rank, all at once
(one barrier before each run; a figure is the slowest rank's time, the least over
`workload.repeats` runs: on shared cores the least run is the least disturbed one):

- compute: the block computes and log-sum-exp merges one ring forward does on this rank (its
  ring position's queries over every position's keys, the layout's causal masks, the
  workload's dtype and block of seq_len / W tokens), each with a K/V hop to its flat-ring
  neighbour in flight as in the ring (the time of the hop waits left out). compute_tflops =
  the cost model's forward FLOPs (W x 4 B Hq D x causal factor x s^2) / that time. With idle
  links and the backward blocks are timed too (reported, not used).
- intra: every rank sends to the next rank of its node and receives from the previous one,
  all nodes at once (the inner ring's hop); inter: every rank sends to the rank with the
  same local index on the next node (the outer ring's hop, every lane at once), and then
  one lane per node alone. Latency = a 4-byte hop; bandwidth per flow = the slope between
  a K/V block (at least 256 KiB) and four of them (a rate limiter's burst credit and
  per-message costs cancel), or the plain rate when noise hides the difference.
- NICs in use per node: the distinct interfaces the node's ranks bound gloo to
  (GLOO_SOCKET_IFNAME), else measured: all lanes' total rate / one lane's rate, rounded.
  The topology's inter bandwidth is per NIC: the most one NIC carried (all lanes' total /
  NICs, or one lane alone).

- memory per rank: a GPU rank's device memory (torch.cuda total_memory); a CPU rank's share
  of its host, MemTotal (or its cgroup's memory limit when lower) / the ranks on its node;
  the smallest over ranks.

Rank 0 writes the topology YAML (the fields of conf/topology/*.yaml, every figure
commented) to `<job folder>/topology/<name>.yaml` and to `workload.out` when set, logs the
figures to W&B and returns them for results.json.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ringctl.plan import BACKWARD_FLOP_RATIO, DTYPE_BYTES, check_seq_len
from ringctl.topology import Topology

#: the smallest message whose slope gives a bandwidth (below it, per-message costs dominate)
MIN_MESSAGE_BYTES = 256 * 1024
#: the larger message of the slope is this many K/V blocks
SLOPE_FACTOR = 4
#: the slope counts when the larger message took at least this share of its time longer
SLOPE_MIN_SHARE = 0.25


@dataclass(frozen=True)
class Shape:
    """The attention sizes being calibrated for (global sequence), as the cost model reads them."""

    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: str = "float32"
    layout: str = "zigzag"
    causal: bool = True

    @classmethod
    def from_config(cls, work: Any) -> Shape:
        return cls(
            int(work.batch), int(work.seq_len), int(work.heads), int(work.kv_heads), int(work.head_dim),
            str(work.dtype), str(work.layout), bool(work.causal),
        )

    def block_tokens(self, world: int) -> int:
        return check_seq_len(self.seq_len, self.layout, world)

    def kv_bytes(self, world: int) -> int:
        """K and V of one shard in the workload's dtype: what one ring hop carries."""
        return 2 * self.batch * self.block_tokens(world) * self.kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    def forward_flops(self, world: int) -> float:
        """The cost model's FLOPs of one ring forward on one rank: W blocks of
        4 B Hq D s^2, halved for causal balanced layouts (plan.estimate's causal factor)."""
        s = self.block_tokens(world)
        factor = 0.5 if self.causal and self.layout in ("zigzag", "striped") else 1.0
        return world * 4 * self.batch * self.heads * self.head_dim * factor * s * s


# ---- timing ---------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def least_of_slowest(seconds_per_run: list[float], device: torch.device, group: Any = None) -> float:
    """Per run the slowest rank (the ring waits for it), then the least run."""
    slowest = torch.tensor(seconds_per_run, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    return float(slowest.min())


def runs(fn: Callable[[], float], device: torch.device, group: Any = None, repeats: int = 5) -> float:
    """fn() returns the seconds it measured itself; run it once to warm up, then `repeats`
    times with a barrier before each so the ranks run at once: least_of_slowest."""
    fn()
    seconds = []
    for _ in range(repeats):
        dist.barrier(group)
        seconds.append(fn())
    return least_of_slowest(seconds, device, group)


def timed(fn: Callable[[], None], device: torch.device, group: Any = None, repeats: int = 5) -> float:
    """Wall seconds of fn() (device synchronised), as `runs` takes them."""

    def wall() -> float:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    return runs(wall, device, group, repeats)


# ---- compute --------------------------------------------------------------------------------


def post_hop(send: torch.Tensor, recv: torch.Tensor, peers: tuple[int, int] | None, group: Any = None) -> list[Any]:
    """Post one send/recv pair (irecv first, as RingComm.hop does); the works to wait on."""
    if peers is None:
        return []
    send_to, recv_from = peers
    ops = [
        dist.P2POp(dist.irecv, recv, group=group, group_peer=recv_from),
        dist.P2POp(dist.isend, send, group=group, group_peer=send_to),
    ]
    return list(dist.batch_isend_irecv(ops))


def measure_compute(
    shape: Shape,
    position: int,
    world: int,
    device: torch.device,
    group: Any = None,
    repeats: int = 5,
    seed: int = 0,
    busy_peers: tuple[int, int] | None = None,
    busy: bool = False,
) -> dict[str, float]:
    """One ring pass's block computes (forward with merges, and backward) at ring position
    `position`, as ringctl/ring/attention.py runs them, without their transfers.

    The forward is timed twice: with idle links, and as the ring computes, with a K/V
    block's hop in flight during every block (to `busy_peers`; every rank that has peers
    posts one, when `busy` says the job has links to keep busy). On CPU ranks the transfers
    take cores from the compute (gloo's threads, the kernel's network work); the busy figure
    is the rate a ring step gets, and the one the topology keeps."""
    from ringctl.ring.block import block_backward, block_forward
    from ringctl.ring.layouts import token_positions
    from ringctl.ring.merge import merge_block

    s = shape.block_tokens(world)
    dtype = getattr(torch, shape.dtype)
    gen = torch.Generator().manual_seed(seed + position)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q = randn(shape.batch, s, shape.heads, shape.head_dim)
    k = randn(shape.batch, s, shape.kv_heads, shape.head_dim)
    v = randn(shape.batch, s, shape.kv_heads, shape.head_dim)
    dout = randn(shape.batch, s, shape.heads, shape.head_dim)
    scale = 1.0 / math.sqrt(shape.head_dim)
    nbytes = shape.kv_bytes(world)
    send = torch.ones(nbytes, dtype=torch.uint8, device=device)
    recv = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def positions(p: int) -> torch.Tensor | None:
        return token_positions(shape.seq_len, p, world, shape.layout).to(device) if shape.causal else None

    q_pos = positions(position)
    # the ring's visiting order (own block first); blocks no query sees are skipped, as there
    sources = []
    for src in ((position - i) % world for i in range(world)):
        k_pos = positions(src)
        if q_pos is not None and k_pos is not None and bool(k_pos[0] > q_pos[-1]):
            continue
        first_row = 0 if q_pos is None or k_pos is None else int(torch.searchsorted(q_pos, k_pos[:1]))
        sources.append((k_pos, first_row))
    merged: dict[str, torch.Tensor] = {}

    def forward(with_hops: bool) -> float:
        """Seconds spent computing (hop waits excluded)."""
        out = lse = None
        spent = 0.0
        for k_pos, rows in sources:
            works = post_hop(send, recv, busy_peers, group) if with_hops else []
            t0 = time.perf_counter()
            block_out, block_lse = block_forward(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
            if out is None or lse is None:
                out, lse = block_out, block_lse
            else:
                merge_block(out[:, rows:], lse[:, :, rows:], block_out[:, rows:], block_lse[:, :, rows:])
            _sync(device)
            spent += time.perf_counter() - t0
            for work in works:
                work.wait()
        merged["out"], merged["lse"] = out, lse  # type: ignore[assignment]
        return spent

    def backward() -> None:
        dq = torch.zeros_like(q, dtype=merged["out"].dtype)
        for k_pos, _rows in sources:
            dq_b, _dk, _dv = block_backward(
                dout, q, k, v, merged["out"], merged["lse"], scale=scale, q_pos=q_pos, k_pos=k_pos
            )
            dq.add_(dq_b)

    t_idle = runs(lambda: forward(False), device, group, repeats)
    t_busy = runs(lambda: forward(True), device, group, repeats) if busy else t_idle
    t_bwd = timed(backward, device, group, repeats)
    flops = shape.forward_flops(world)
    return {
        "block_tokens": s,
        "blocks_computed": len(sources),
        "forward_s": t_busy,
        "forward_idle_links_s": t_idle,
        "links_busy": busy,
        "backward_s": t_bwd,
        "model_forward_flops": flops,
        "compute_tflops": flops / t_busy / 1e12,
        "compute_tflops_idle_links": flops / t_idle / 1e12,
        "backward_over_forward": t_bwd / t_idle,
        "model_backward_over_forward": BACKWARD_FLOP_RATIO,
    }


def measure_ring_forward(
    shape: Shape, topology: Topology, rank: int, device: torch.device, group: Any = None, repeats: int = 3
) -> dict[str, Any]:
    """ringctl's own ring forward (hierarchical plan when the nodes allow, else flat) on the
    discovered placement: rate = the model's forward FLOPs / the slowest rank's time. At a
    size where the transfers hide behind compute this is what a ring step's compute costs
    with everything else the ring does (bench/fabric.py reports it beside the blocks' rate)."""
    from ringctl.plan import make_plan
    from ringctl.ring import ring_attention

    algorithm = "hierarchical" if topology.is_even and topology.nodes > 1 else "flat"
    plan = make_plan(topology, layout=shape.layout, algorithm=algorithm)
    world = topology.world_size
    s = shape.block_tokens(world)
    dtype = getattr(torch, shape.dtype)
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (
        torch.randn(shape.batch, s, h, shape.head_dim, generator=gen).to(device=device, dtype=dtype)
        for h in (shape.heads, shape.kv_heads, shape.kv_heads)
    )

    def forward() -> None:
        with torch.no_grad():
            ring_attention(q, k, v, causal=shape.causal, layout=shape.layout, group=group, plan=plan)

    seconds = timed(forward, device, group, repeats)
    return {"plan": algorithm, "forward_s": seconds, "compute_tflops": shape.forward_flops(world) / seconds / 1e12}


# ---- links ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lanes:
    """Who sends to whom in the link measurements, from the job's discovered topology:
    `node` and `local` (index among the node's ranks, ascending) of every rank."""

    nodes: list[list[int]]

    @classmethod
    def of(cls, topology: Topology) -> Lanes:
        return cls(topology.ranks_of_nodes())

    def where(self, rank: int) -> tuple[int, int]:
        for n, ranks in enumerate(self.nodes):
            if rank in ranks:
                return n, ranks.index(rank)
        raise ValueError(f"rank {rank} is on no node of the topology")

    @property
    def width(self) -> int:
        """Lanes between nodes: every node has at least this many ranks."""
        return min(len(r) for r in self.nodes)

    def intra_peers(self, rank: int) -> tuple[int, int] | None:
        """(send_to, recv_from) of the inner-ring hop, None on a node with one rank."""
        n, l = self.where(rank)
        ranks = self.nodes[n]
        if len(ranks) < 2:
            return None
        return ranks[(l + 1) % len(ranks)], ranks[(l - 1) % len(ranks)]

    def inter_peers(self, rank: int, lanes: int) -> tuple[int, int] | None:
        """(send_to, recv_from) of the outer-ring hop on the first `lanes` lanes, None for a
        rank outside them (it only joins the barriers)."""
        n, l = self.where(rank)
        N = len(self.nodes)
        if N < 2 or l >= lanes:
            return None
        return self.nodes[(n + 1) % N][l], self.nodes[(n - 1) % N][l]


def flat_ring_peers(topology: Topology, rank: int) -> tuple[int, int] | None:
    """(send_to, recv_from) of `rank` on the node-contiguous flat ring (None alone): the hops
    the compute is timed beside, intra- and inter-node as a flat ring mixes them."""
    from ringctl.plan import make_plan

    if topology.world_size < 2:
        return None
    order = make_plan(topology, algorithm="flat", order="node").ring_order
    p = order.index(rank)
    return order[(p + 1) % len(order)], order[(p - 1) % len(order)]


def hop_seconds(
    nbytes: int, peers: tuple[int, int] | None, device: torch.device, group: Any = None, repeats: int = 5
) -> float:
    """Seconds of one send/recv pair of nbytes, every rank with peers at once; the slowest
    rank, least over the runs (a rank without peers only joins the barriers)."""
    send = torch.ones(nbytes, dtype=torch.uint8, device=device)
    recv = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def hop() -> None:
        for work in post_hop(send, recv, peers, group):
            work.wait()

    return timed(hop, device, group, repeats)


def measure_link(
    nbytes: int, peers: tuple[int, int] | None, device: torch.device, group: Any = None, repeats: int = 5
) -> dict[str, Any]:
    """Latency (4-byte hop) and bandwidth per flow (slope between nbytes and SLOPE_FACTOR x)."""
    small = max(nbytes, MIN_MESSAGE_BYTES)
    large = SLOPE_FACTOR * small
    latency = hop_seconds(4, peers, device, group, repeats)
    t_small = hop_seconds(small, peers, device, group, repeats)
    t_large = hop_seconds(large, peers, device, group, repeats)
    sloped = t_large - t_small >= SLOPE_MIN_SHARE * t_large
    # the slope when the larger message visibly took longer; else per-message costs and
    # noise dominate both, and the large message's plain rate is the honest (lower) figure
    per_flow = (large - small) / (t_large - t_small) if sloped else large / t_large
    return {
        "latency_us": latency * 1e6,
        "bandwidth_GBps": per_flow / 1e9,
        "message_bytes": [small, large],
        "seconds": [t_small, t_large],
        "plain_GBps": small / t_small / 1e9,
        "method": "slope" if sloped else "plain",
    }


def measure_links(shape: Shape, topology: Topology, rank: int, device: torch.device, group: Any = None,
                  repeats: int = 5) -> dict[str, Any]:
    """intra and inter figures (None where the job has no such link) and the NICs in use."""
    lanes = Lanes.of(topology)
    nbytes = shape.kv_bytes(topology.world_size)
    out: dict[str, Any] = {"intra": None, "inter": None, "inter_one_lane": None}
    if any(len(r) > 1 for r in lanes.nodes):
        out["intra"] = measure_link(nbytes, lanes.intra_peers(rank), device, group, repeats)
    if len(lanes.nodes) > 1:
        width = lanes.width
        out["inter"] = measure_link(nbytes, lanes.inter_peers(rank, width), device, group, repeats)
        out["inter"]["flows_per_node"] = width
        if width > 1:
            out["inter_one_lane"] = measure_link(nbytes, lanes.inter_peers(rank, 1), device, group, repeats)
            out["inter_one_lane"]["flows_per_node"] = 1
    out["nics"] = nics_in_use(out, lanes, rank, group)
    return out


def nics_in_use(links: dict[str, Any], lanes: Lanes, rank: int, group: Any = None) -> dict[str, Any]:
    """NICs per node: the distinct interfaces the node's ranks bound gloo to, when every rank
    bound one; else the rate all lanes reach together over one lane's, rounded (1..lanes)."""
    world = dist.get_world_size(group)
    bound: list[Any] = [None] * world
    mine = os.environ.get("GLOO_SOCKET_IFNAME") if dist.get_backend(group) == "gloo" else None
    dist.all_gather_object(bound, mine, group=group)
    inter, one = links.get("inter"), links.get("inter_one_lane")
    width = lanes.width if len(lanes.nodes) > 1 else 1
    measured = None
    if inter is not None:
        if one is None:
            measured = 1
        else:
            ratio = width * inter["bandwidth_GBps"] / one["bandwidth_GBps"]
            measured = min(width, max(1, round(ratio)))
    interfaces = None
    if all(bound):
        interfaces = min(len({bound[r] for r in ranks}) for ranks in lanes.nodes)
    count = interfaces if interfaces is not None else (measured or 1)
    if inter is not None:
        count = min(count, width)
    return {
        "count": count,
        "source": "interfaces" if interfaces is not None else ("measured" if measured is not None else "default"),
        "interfaces_per_node": interfaces,
        "measured": measured,
        "bound": bound,
    }


# ---- the topology file ------------------------------------------------------------------------


def _yaml_value(value: Any) -> str:
    """A scalar or a flat list as YAML (JSON's spelling is valid YAML)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value)


def nic_bandwidth(inter: dict[str, Any], one_lane: dict[str, Any] | None, nics: int) -> float:
    """GB/s one NIC carries per direction: the most a measurement pushed through one NIC,
    all lanes together / NICs or one lane alone (one flow on one NIC). Flows sharing a NIC
    may together fall short of it (TCP flows backing off at a rate limiter's queue); the
    cost model splits the NIC between its flows, so it takes the NIC's own rate."""
    together = inter["bandwidth_GBps"] * inter["flows_per_node"] / nics
    alone = one_lane["bandwidth_GBps"] if one_lane else 0.0
    return max(together, alone)


def _meminfo_bytes(field: str = "MemTotal") -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_limit_bytes() -> int | None:
    """This process's cgroup memory limit (v2 memory.max, else v1 memory.limit_in_bytes):
    what SLURM's task/cgroup plugin grants the job; None when unlimited or unreadable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            candidate = Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"
        elif "memory" in controllers.split(","):
            candidate = Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
        else:
            continue
        try:
            text = candidate.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "unlimited" with a huge number
            return int(text)
    return None


def rank_memory_bytes(device: torch.device, ranks_on_node: int) -> int | None:
    """Memory one rank may fill: a GPU's total device memory; on CPU the host's MemTotal, or
    the cgroup's limit when lower, shared by the node's ranks. None when unreadable."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    host = [b for b in (_meminfo_bytes(), _cgroup_limit_bytes()) if b]
    return min(host) // max(1, ranks_on_node) if host else None


def measure_memory(ctx: Any) -> int | None:
    """The smallest memory per rank over all ranks (the limit every rank must keep)."""
    topo = ctx.topology
    mine = rank_memory_bytes(ctx.device, topo.ranks_per_node[topo.rank_to_node[ctx.rank]])
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine, group=ctx.group)
    known = [g for g in gathered if g]
    return min(known) if known else None


def topology_fields(
    cfg: Any, ctx: Any, compute: dict[str, Any], links: dict[str, Any], name: str, memory_bytes: int | None = None
) -> dict[str, Any]:
    """The topology config the measurement describes: the job's discovered nodes and ranks,
    the measured figures, and the config's ring, order, distribution and virtual nodes. A link
    the job did not have (one node, one rank per node) keeps the config's figures.
    `memory_bytes`: the measured memory per rank (`measure_memory`); None measures this
    process's (its node's fullest share), and unreadable keeps the config's."""
    topo = ctx.topology
    counts = list(topo.ranks_per_node)
    intra, inter = links.get("intra"), links.get("inter")
    nics = links["nics"]["count"]
    inter_bw = topo.inter.bandwidth_GBps
    if inter is not None:
        inter_bw = nic_bandwidth(inter, links.get("inter_one_lane"), nics)
    gpus = int(cfg.resources.get("gpus_per_node") or 0) if ctx.device.type == "cuda" else 0
    return {
        "name": name,
        "nodes": topo.nodes,
        "ranks_per_node": counts[0] if len(set(counts)) == 1 else counts,
        "gpus_per_node": gpus,
        "nics_per_node": nics,
        "intra": {
            "bandwidth_GBps": intra["bandwidth_GBps"] if intra else topo.intra.bandwidth_GBps,
            "latency_us": intra["latency_us"] if intra else topo.intra.latency_us,
            "links": topo.intra.links,
        },
        "inter": {
            "bandwidth_GBps": inter_bw, "latency_us": inter["latency_us"] if inter else topo.inter.latency_us,
            "links": topo.inter.links,
        },
        "ring": str(cfg.topology.get("ring", "auto")),
        "direction": str(cfg.topology.get("direction", "auto")),
        "order": str(cfg.topology.get("order", "node")),
        "distribution": str(cfg.topology.get("distribution", "block")),
        "virtual_node_size": cfg.topology.get("virtual_node_size"),
        "compute_tflops": compute["compute_tflops"],
        "memory_per_rank_GB": _memory_GB(cfg, ctx, memory_bytes),
    }


def _memory_GB(cfg: Any, ctx: Any, memory_bytes: int | None) -> float | None:
    if memory_bytes is None:
        memory_bytes = rank_memory_bytes(ctx.device, max(ctx.topology.ranks_per_node))
    if memory_bytes is None:
        return cfg.topology.get("memory_per_rank_GB")
    return round(memory_bytes / 1e9, 3)


def render_yaml(fields: dict[str, Any], shape: Shape, compute: dict[str, Any], links: dict[str, Any],
                header: list[str]) -> str:
    """The topology YAML, each figure commented with how it was measured."""
    intra, inter, one = links.get("intra"), links.get("inter"), links.get("inter_one_lane")
    nics = links["nics"]

    def mb(link: dict[str, Any]) -> str:
        return f"{link['bandwidth_GBps'] * 1e3:.4g} MB/s"

    notes = {
        "name": "label shown by ringctl plan and in job folders (+topology=<file name>)",
        "nodes": "nodes the calibration job ran on",
        "ranks_per_node": "ranks per node it ran (the figures below are for this many at once)",
        "gpus_per_node": "GPUs per node (0: CPU ranks, gloo)",
        "nics_per_node": (
            f"NICs in use per node ({nics['source']}: interfaces bound {nics['interfaces_per_node']}, "
            f"rate ratio all lanes / one lane {nics['measured']})"
        ),
        "ring": "flat | hierarchical | auto (the cost model picks)",
        "direction": "one_way | bidirectional | auto (the cost model picks; one_way on a switch)",
        "order": "node: topology-aware ring order | rank: the rank-order baseline ring",
        "distribution": "block | cyclic: how SLURM placed the ranks on the nodes",
        "virtual_node_size": "ranks per virtual node (null: real nodes)",
        "compute_tflops": (
            f"per rank, all ranks at once: {compute['blocks_computed']} blocks of {compute['block_tokens']} tokens "
            f"+ merges in {compute['forward_s'] * 1e3:.3g} ms with ring hops in flight "
            f"({compute['forward_idle_links_s'] * 1e3:.3g} ms with idle links; {shape.dtype}, {shape.layout}, "
            f"{'causal' if shape.causal else 'full'}; bwd/fwd {compute['backward_over_forward']:.2f}, model "
            f"{compute['model_backward_over_forward']})"
        ),
        "memory_per_rank_GB": (
            "GB (1e9 B) one rank may fill: the GPU's device memory (torch.cuda total_memory), the least over ranks"
            if fields.get("gpus_per_node") else
            "GB (1e9 B) one rank may fill: host MemTotal (or the cgroup limit, if lower) / ranks on the node, the least over ranks"
        ),
    }
    link_notes = {
        "intra": {
            "bandwidth_GBps": f"per flow, inner-ring hops of all nodes at once ({mb(intra)})" if intra else "not measured (one rank per node): the config's",
            "latency_us": "4-byte hop, all at once" if intra else "not measured: the config's",
            "links": "switch | mesh: declared by the config (how ranks connect), not measured",
        },
        "inter": {
            "bandwidth_GBps": (
                f"per NIC per direction, the most one NIC carried: {inter['flows_per_node']} flow(s) per node at once "
                f"got {mb(inter)} each over {nics['count']} NIC(s)" + (f"; one flow alone {mb(one)}" if one else "")
            ) if inter else "not measured (one node): the config's",
            "latency_us": "4-byte outer-ring hop, all lanes at once" if inter else "not measured: the config's",
            "links": "switch | mesh: declared by the config (NICs into a switch, or a link per node pair), not measured",
        },
    }
    lines = [f"# {line}" if line else "#" for line in header]
    for key, value in fields.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for sub, subvalue in value.items():
                lines.append(f"  {sub}: {_yaml_value(subvalue)}    # {key}: {link_notes[key][sub]}")
        else:
            lines.append(f"{key}: {_yaml_value(value)}    # {notes[key]}")
    return "\n".join(lines) + "\n"


def write_topology(text: str, path: Path) -> Path:
    """Write atomically (a reader never sees half a file); parent folders are made."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def default_name(cfg: Any) -> str:
    """The written topology's name: workload.topology_name, else the stem of workload.out,
    else <topology.name>_calibrated."""
    work = cfg.workload
    if work.get("topology_name"):
        return str(work.topology_name)
    if work.get("out"):
        return Path(str(work.out)).stem
    return f"{cfg.topology.get('name', 'local')}_calibrated"


def run(cfg: Any, ctx: Any) -> dict[str, Any]:
    work = cfg.workload
    repeats = int(work.get("repeats", 5))
    if repeats < 1:
        raise ValueError(f"workload.repeats={repeats!r} is invalid; allowed: an integer >= 1")
    shape = Shape.from_config(work)
    compute = measure_compute(
        shape, ctx.position, ctx.world_size, ctx.device, ctx.group, repeats, int(work.seed),
        busy_peers=flat_ring_peers(ctx.topology, ctx.rank), busy=ctx.world_size > 1,
    )
    links = measure_links(shape, ctx.topology, ctx.rank, ctx.device, ctx.group, repeats)
    name = default_name(cfg)
    fields = topology_fields(cfg, ctx, compute, links, name, measure_memory(ctx))
    result: dict[str, Any] = {
        "calibration": {"shape": asdict(shape), "repeats": repeats, "compute": compute, **links},
        "topology": fields,
    }
    step = {"calibrate/compute_tflops": compute["compute_tflops"], "calibrate/nics_per_node": fields["nics_per_node"]}
    for link in ("intra", "inter"):
        if links.get(link):
            step[f"calibrate/{link}_GBps"] = fields[link]["bandwidth_GBps"]
            step[f"calibrate/{link}_latency_us"] = links[link]["latency_us"]
    ctx.metrics.log(step, step=1)
    if ctx.rank == 0:
        names = ", ".join(dict.fromkeys(ctx.node_names))
        header = [
            (
                f"Measured by `ringctl calibrate` on {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {ctx.world_size} ranks "
                f"on {ctx.topology.nodes} node(s) ({names}), {ctx.device.type}, {dist.get_backend(ctx.group)}."
            ),
            f"Job folder: {ctx.folder}",
            "Keep it in a config directory of your own as DIR/topology/<name>.yaml, then:",
            f"  ringctl plan --config-dir DIR +topology={name}    (and ringctl launch the same way)",
        ]
        text = render_yaml(fields, shape, compute, links, header)
        paths = [write_topology(text, Path(ctx.folder) / "topology" / f"{name}.yaml")]
        if work.get("out"):
            paths.append(write_topology(text, Path(str(work.out))))
        result["topology_paths"] = [str(p) for p in paths]
    return result
