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
  neighbour in flight as in the ring (the time of the hop waits left out). With idle links
  and the backward blocks are timed too (reported, not used).
- block loop overhead: the same loop on blocks of 8 tokens (FLOPs negligible), per block:
  the fixed cost of a block compute + merge in that loop (launches, masks, the merge,
  Python). compute_tflops = the cost model's forward FLOPs (W x 4 B Hq D x causal factor x
  s^2) / (the forward's time - blocks x this block-loop overhead): the time subtracted from
  is the solo block loop's, so its own fixed cost is what comes out (the plain FLOPs / time
  when it would be over half of it: blocks too small to separate).
- step overhead (`step_overhead_us`, what the topology prices per ring step): ringctl's own
  ring forward (ring_attention over the job's plan, every rank) on blocks of 8 tokens, less
  what the cost model predicts for that call with step_overhead_us = 0 (the links' figures,
  so it is measured after them: hop latencies mostly), per ring step (W steps, flat or hierarchical), at least 0. Two
  figures, because on shared CPU cores a step in the ring costs more than the block loop
  alone (gloo's threads waking, the hop's Python, the ring's bookkeeping): 1.8 ms solo
  against 3.5-10 ms per step in bench/inference.py's ring under load. The ring's figure is
  the one the model adds to every step; the loop's only corrects the solo rate.
- memory bandwidth (`memory_bandwidth_GBps`, what bounds steps with few queries over many
  keys: decode, pass-Q): a block compute of one query row (the workload's batch, heads,
  dtype) over the shard's seq_len / W keys, less the same over 8 keys (the fixed cost
  cancels), solo, all ranks at once: K/V bytes of the keys in between / that difference
  (GB/s, 1e9). null when the difference is not positive (noise, or a shard of 8 tokens or
  fewer): blocks are then priced by FLOPs alone. The same K/V is read every call, so a
  shard that fits a cache measures the cache's rate (as a block just received would be).
- intra: every rank sends to the next rank of its node and receives from the previous one,
  all nodes at once (the inner ring's hop); inter: every rank sends to the rank with the
  same local index on the next node (the outer ring's hop, every lane at once), and then
  one lane per node alone. Latency = a 4-byte hop; bandwidth per flow = the slope between
  a K/V block (at least 256 KiB) and four of them (a rate limiter's burst credit and
  per-message costs cancel), or the plain rate when noise hides the difference.
- inter shared-port efficiency (three or more nodes): lane 0 of every node sends 2X bytes
  to the next node (one peer per NIC each way), then X to the next and X to the previous
  node at once (two peers); efficiency = one peer's time / two peers' time, in (0, 1] (TCP
  flows meeting in a rate-limited port lose rate to drops; credit-based fabrics do not).
  Intra's, and inter's below three nodes, are the config's.
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
from dataclasses import asdict, dataclass, replace
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
#: the fixed cost of a step is timed on blocks of this many tokens (FLOPs negligible)
TINY_BLOCK_TOKENS = 8
#: ... over this many passes of the tiny ring forward per timed run (its blocks are short)
TINY_PASSES = 4
#: the K/V streaming rate: one query over the shard's keys less one over this many keys
STREAM_FEW_KEYS = 8
#: ... each timed run this many block computes (one alone is a few microseconds)
STREAM_CALLS = 8
#: the fixed costs are subtracted from a forward's time only when they are at most this share
OVERHEAD_MAX_SHARE = 0.5
#: the two-peer hop needs this many nodes (with two, the next and previous node are one peer)
SHARED_PORT_MIN_NODES = 3


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


HopSpec = tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]  # (send, recv, (send_to, recv_from))


def post_hops(hops: list[HopSpec], group: Any = None) -> list[Any]:
    """Post send/recv pairs at once, every receive before any send, as RingComm.hops posts a
    step: a gloo send waits for its peer's "receive ready" notice, which travels on the same
    TCP stream as this rank's data to that peer, so a receive posted after a send to the
    same peer holds the reverse flow back until the send is done. Pairs without peers are
    skipped; the works to wait on."""
    live = [(send, recv, peers) for send, recv, peers in hops if peers is not None]
    if not live:
        return []
    ops = [dist.P2POp(dist.irecv, recv, group=group, group_peer=peers[1]) for _send, recv, peers in live]
    ops += [dist.P2POp(dist.isend, send, group=group, group_peer=peers[0]) for send, _recv, peers in live]
    return list(dist.batch_isend_irecv(ops))


def post_hop(send: torch.Tensor, recv: torch.Tensor, peers: tuple[int, int] | None, group: Any = None) -> list[Any]:
    """Post one send/recv pair (post_hops); the works to wait on."""
    return post_hops([(send, recv, peers)], group)


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
) -> dict[str, Any]:
    """One ring pass's block computes (forward with merges, and backward) at ring position
    `position`, as ringctl/ring/attention.py runs them, without their transfers.

    The forward is timed twice: with idle links, and as the ring computes, with a K/V
    block's hop in flight during every block (to `busy_peers`; every rank that has peers
    posts one, when `busy` says the job has links to keep busy). On CPU ranks the transfers
    take cores from the compute (gloo's threads, the kernel's network work); the busy figure
    is the rate a ring step gets, and the one the topology keeps.

    The block loop's own fixed cost (launches, masks, the merge, Python) is the same loop on
    blocks of TINY_BLOCK_TOKENS tokens (FLOPs negligible), per block; the rate is the FLOPs
    over the forward's time less that cost per block (`rate_without_overhead`). It is this
    loop's cost, not a ring step's (`measure_step_overhead`: more on shared cores), since
    it is this loop's time it comes out of. The K/V streaming rate (`measure_stream`) is
    timed here too, solo like the rest."""
    from ringctl.ring.block import block_backward

    s = shape.block_tokens(world)
    full = _RingBlocks(shape, shape.seq_len, position, world, device, seed)
    tiny = _RingBlocks(shape, tiny_seq_len(shape, world), position, world, device, seed)
    nbytes = shape.kv_bytes(world)
    send = torch.ones(nbytes, dtype=torch.uint8, device=device)
    recv = torch.empty(nbytes, dtype=torch.uint8, device=device)

    def backward() -> None:
        q, k, v = full.q, full.k, full.v
        dq = torch.zeros_like(q, dtype=full.out.dtype)
        for k_pos, _rows in full.sources:
            dq_b, _dk, _dv = block_backward(
                full.dout, q, k, v, full.out, full.lse, scale=full.scale, q_pos=full.q_pos, k_pos=k_pos
            )
            dq.add_(dq_b)

    def tiny_forward() -> float:
        return sum(tiny.forward() for _ in range(TINY_PASSES)) / TINY_PASSES

    t_idle = runs(full.forward, device, group, repeats)
    hops = (send, recv, busy_peers, group)
    t_busy = runs(lambda: full.forward(hops), device, group, repeats) if busy else t_idle
    t_bwd = timed(backward, device, group, repeats)
    t_tiny = runs(tiny_forward, device, group, repeats)
    overhead = t_tiny / len(tiny.sources)
    stream = measure_stream(shape, world, device, group, repeats, seed + position)
    blocks = len(full.sources)
    flops = shape.forward_flops(world)
    tflops, applied = rate_without_overhead(flops, t_busy, blocks, overhead)
    tflops_idle, _ = rate_without_overhead(flops, t_idle, blocks, overhead)
    return {
        "block_tokens": s,
        "blocks_computed": blocks,
        "forward_s": t_busy,
        "forward_idle_links_s": t_idle,
        "links_busy": busy,
        "backward_s": t_bwd,
        "model_forward_flops": flops,
        "tiny_block_tokens": tiny.block_tokens,
        "tiny_blocks_computed": len(tiny.sources),
        "tiny_block_s": t_tiny,
        "block_loop_overhead_us": overhead * 1e6,
        "step_overhead_subtracted": applied,
        "memory_bandwidth_GBps": stream["memory_bandwidth_GBps"],
        "stream": stream,
        "compute_tflops": tflops,
        "compute_tflops_idle_links": tflops_idle,
        "compute_tflops_with_overhead": flops / t_busy / 1e12,
        "backward_over_forward": t_bwd / t_idle,
        "model_backward_over_forward": BACKWARD_FLOP_RATIO,
    }


def measure_stream(
    shape: Shape, world: int, device: torch.device, group: Any = None, repeats: int = 5, seed: int = 0
) -> dict[str, Any]:
    """The rate one rank's attention streams K/V (`memory_bandwidth_GBps`): a block compute
    (ringctl.ring.block.block_forward) of one query row, the shape's batch, heads and dtype,
    over the shard's seq_len / W keys, less the same over STREAM_FEW_KEYS keys (the call's
    fixed cost cancels; FLOPs are nil either way), STREAM_CALLS calls per timed run, every
    rank at once. GB/s = the K/V bytes of the keys in between / that difference; None, with
    `note` saying why, when the difference is not positive or the shard has no more keys."""
    from ringctl.ring.block import block_forward

    keys = shape.block_tokens(world)
    dtype = getattr(torch, shape.dtype)
    gen = torch.Generator().manual_seed(seed)

    def randn(tokens: int, heads: int) -> torch.Tensor:
        size = (shape.batch, tokens, heads, shape.head_dim)
        return torch.randn(*size, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    q = randn(1, shape.heads)
    k, v = randn(keys, shape.kv_heads), randn(keys, shape.kv_heads)
    few = min(keys, STREAM_FEW_KEYS)
    k_few, v_few = k[:, :few].contiguous(), v[:, :few].contiguous()
    scale = 1.0 / math.sqrt(shape.head_dim)

    def calls(kk: torch.Tensor, vv: torch.Tensor) -> Callable[[], None]:
        def fn() -> None:
            for _ in range(STREAM_CALLS):
                block_forward(q, kk, vv, scale=scale)

        return fn

    per_token = 2 * shape.batch * shape.kv_heads * shape.head_dim * DTYPE_BYTES[shape.dtype]
    out: dict[str, Any] = {
        "keys": keys, "few_keys": few, "calls_per_run": STREAM_CALLS, "streamed_bytes": (keys - few) * per_token,
        "shard_s": None, "few_s": None, "memory_bandwidth_GBps": None, "note": None,
    }
    if keys <= few:
        out["note"] = f"the shard has {keys} keys, no more than the {few} the fixed cost is timed with: FLOPs only"
        return out
    t_shard = timed(calls(k, v), device, group, repeats) / STREAM_CALLS
    t_few = timed(calls(k_few, v_few), device, group, repeats) / STREAM_CALLS
    out["shard_s"], out["few_s"] = t_shard, t_few
    if t_shard <= t_few:
        out["note"] = (
            f"1 query over {keys} keys took no longer than over {few} ({t_shard * 1e6:.3g} vs {t_few * 1e6:.3g} us): "
            "noise hides the streaming; FLOPs only"
        )
        return out
    out["memory_bandwidth_GBps"] = out["streamed_bytes"] / (t_shard - t_few) / 1e9
    return out


def tiny_seq_len(shape: Shape, world: int) -> int:
    """The sequence whose blocks are TINY_BLOCK_TOKENS tokens (the layout's split kept; the
    shape's own when its blocks are that small already)."""
    if shape.block_tokens(world) <= TINY_BLOCK_TOKENS:
        return shape.seq_len
    tiny = TINY_BLOCK_TOKENS * world
    check_seq_len(tiny, shape.layout, world)  # every layout splits 8 W tokens (zigzag: 2W chunks of 4)
    return tiny


def rate_without_overhead(flops: float, seconds: float, blocks: int, overhead_s: float) -> tuple[float, bool]:
    """(TFLOP/s, subtracted): flops / (seconds - blocks x overhead_s), the rate the cost
    model's step = FLOPs / rate + overhead needs. When the fixed costs would leave less than
    OVERHEAD_MAX_SHARE's complement of the time (blocks too small to tell FLOPs from fixed
    cost, or noise), the plain flops / seconds, and False."""
    left = seconds - blocks * overhead_s
    if left <= 0 or left < (1 - OVERHEAD_MAX_SHARE) * seconds:
        return flops / seconds / 1e12, False
    return flops / left / 1e12, True


class _RingBlocks:
    """One rank's inputs of a ring pass of `seq_len` tokens (the shape's heads, dtype,
    layout) and its forward's block computes + merges, in the ring's visiting order (own
    block first; blocks no query sees skipped, as ringctl/ring/attention.py does)."""

    def __init__(self, shape: Shape, seq_len: int, position: int, world: int, device: torch.device, seed: int) -> None:
        from ringctl.ring.layouts import token_positions

        self.block_tokens = s = check_seq_len(seq_len, shape.layout, world)
        self.device = device
        dtype = getattr(torch, shape.dtype)
        gen = torch.Generator().manual_seed(seed + position)

        def randn(heads: int) -> torch.Tensor:
            size = (shape.batch, s, heads, shape.head_dim)
            return torch.randn(*size, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

        self.q, self.k, self.v, self.dout = (randn(h) for h in (shape.heads, shape.kv_heads, shape.kv_heads, shape.heads))
        self.scale = 1.0 / math.sqrt(shape.head_dim)

        def positions(p: int) -> torch.Tensor | None:
            return token_positions(seq_len, p, world, shape.layout).to(device) if shape.causal else None

        self.q_pos = q_pos = positions(position)
        self.sources: list[tuple[torch.Tensor | None, int]] = []
        for src in ((position - i) % world for i in range(world)):
            k_pos = positions(src)
            if q_pos is not None and k_pos is not None and bool(k_pos[0] > q_pos[-1]):
                continue
            first_row = 0 if q_pos is None or k_pos is None else int(torch.searchsorted(q_pos, k_pos[:1]))
            self.sources.append((k_pos, first_row))
        self.out = self.lse = torch.empty(0)

    def forward(self, hops: tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None, Any] | None = None) -> float:
        """Seconds spent computing, a hop (send, recv, peers, group) posted before each
        block when given (its waits excluded)."""
        from ringctl.ring.block import block_forward
        from ringctl.ring.merge import merge_block

        out = lse = None
        spent = 0.0
        for k_pos, rows in self.sources:
            works = post_hop(*hops) if hops is not None else []
            t0 = time.perf_counter()
            block_out, block_lse = block_forward(self.q, self.k, self.v, scale=self.scale, q_pos=self.q_pos, k_pos=k_pos)
            if out is None or lse is None:
                out, lse = block_out, block_lse
            else:
                merge_block(out[:, rows:], lse[:, :, rows:], block_out[:, rows:], block_lse[:, :, rows:])
            _sync(self.device)
            spent += time.perf_counter() - t0
            for work in works:
                work.wait()
        assert out is not None and lse is not None  # the own block is always computed
        self.out, self.lse = out, lse
        return spent


def ring_algorithm(topology: Topology) -> str:
    """The ring the ring measurements run: hierarchical when the nodes allow, else flat."""
    return "hierarchical" if topology.is_even and topology.nodes > 1 else "flat"


def _ring_forward(shape: Shape, topology: Topology, rank: int, device: torch.device, group: Any = None) -> tuple[Any, Callable[[], None]]:
    """(plan, a no-grad call of ringctl's ring_attention on this rank's random shard)."""
    from ringctl.plan import make_plan
    from ringctl.ring import ring_attention

    plan = make_plan(topology, layout=shape.layout, algorithm=ring_algorithm(topology))
    s = shape.block_tokens(topology.world_size)
    dtype = getattr(torch, shape.dtype)
    gen = torch.Generator().manual_seed(rank)
    q, k, v = (
        torch.randn(shape.batch, s, h, shape.head_dim, generator=gen).to(device=device, dtype=dtype)
        for h in (shape.heads, shape.kv_heads, shape.kv_heads)
    )

    def forward() -> None:
        with torch.no_grad():
            ring_attention(q, k, v, causal=shape.causal, layout=shape.layout, group=group, plan=plan)

    return plan, forward


def measure_ring_forward(
    shape: Shape, topology: Topology, rank: int, device: torch.device, group: Any = None, repeats: int = 3,
    step_overhead_s: float = 0.0,
) -> dict[str, Any]:
    """ringctl's own ring forward (hierarchical plan when the nodes allow, else flat) on the
    discovered placement: rate = the model's forward FLOPs / the slowest rank's time, less
    `step_overhead_s` per ring step (W steps; `rate_without_overhead`), the fixed cost the
    topology prices apart. At a size where the transfers hide behind compute this is what a
    ring step's compute costs with everything else the ring does (bench/fabric.py reports it
    beside the blocks' rate)."""
    plan, forward = _ring_forward(shape, topology, rank, device, group)
    seconds = timed(forward, device, group, repeats)
    world = topology.world_size
    flops = shape.forward_flops(world)
    tflops, subtracted = rate_without_overhead(flops, seconds, world, step_overhead_s)
    return {
        "plan": plan.algorithm, "forward_s": seconds, "compute_tflops": tflops, "step_overhead_subtracted": subtracted,
        "compute_tflops_with_overhead": flops / seconds / 1e12,
    }


def measure_step_overhead(
    shape: Shape, topology: Topology, rank: int, device: torch.device, group: Any = None, repeats: int = 5
) -> dict[str, Any]:
    """The fixed cost of one ring step as the ring pays it (`step_overhead_us`): ringctl's ring
    forward (`ring_algorithm`'s plan, every rank) on the sequence whose blocks are
    TINY_BLOCK_TOKENS tokens (TINY_PASSES calls per timed run), less the cost model's forward
    time for that call under `topology` (the measured figures, `model_topology`: its
    step_overhead_us must be 0), per ring step (W: flat and hierarchical alike), at least 0."""
    from ringctl.plan import Workload, estimate

    if topology.step_overhead_us:
        raise ValueError(f"topology.step_overhead_us={topology.step_overhead_us!r}: the prediction subtracted must be without it (0)")
    world = topology.world_size
    tiny = Shape(**{**asdict(shape), "seq_len": tiny_seq_len(shape, world)})
    plan, forward = _ring_forward(tiny, topology, rank, device, group)

    def passes() -> None:
        for _ in range(TINY_PASSES):
            forward()

    seconds = timed(passes, device, group, repeats) / TINY_PASSES
    workload = Workload(tiny.batch, tiny.seq_len, tiny.heads, tiny.kv_heads, tiny.head_dim, tiny.dtype, tiny.causal)
    predicted = estimate(plan, workload).forward_s
    residual = (seconds - predicted) / world
    return {
        "plan": plan.algorithm, "seq_len": tiny.seq_len, "block_tokens": tiny.block_tokens(world), "steps": world,
        "ring_forward_s": seconds, "model_forward_s": predicted, "clamped": residual < 0,
        "step_overhead_us": max(0.0, residual) * 1e6,
    }


def model_topology(topology: Topology, compute: dict[str, Any], links: dict[str, Any]) -> Topology:
    """`topology` (the job's placement; the config's figures) with the measured figures put in,
    as `topology_fields` writes them, and step_overhead_us = 0: what the step overhead's
    prediction prices."""
    intra, inter, shared = links.get("intra"), links.get("inter"), links.get("inter_shared_port")
    nics = int(links["nics"]["count"])
    return replace(
        topology,
        intra=replace(topology.intra, bandwidth_GBps=intra["bandwidth_GBps"], latency_us=intra["latency_us"])
        if intra else topology.intra,
        inter=replace(
            topology.inter, bandwidth_GBps=nic_bandwidth(inter, links.get("inter_one_lane"), nics),
            latency_us=inter["latency_us"],
            shared_port_efficiency=shared["efficiency"] if shared else topology.inter.shared_port_efficiency,
        ) if inter else topology.inter,
        nics_per_node=nics, compute_tflops=compute["compute_tflops"], step_overhead_us=0.0,
        memory_bandwidth_GBps=compute.get("memory_bandwidth_GBps"),
    )  # fmt: skip


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


    def shared_port_peers(self, rank: int) -> tuple[int, int] | None:
        """(next node's, previous node's) lane-0 rank for a lane-0 rank on three or more
        nodes (two distinct peers), else None (the rank only joins the barriers)."""
        n, l = self.where(rank)
        N = len(self.nodes)
        if N < SHARED_PORT_MIN_NODES or l != 0:
            return None
        return self.nodes[(n + 1) % N][0], self.nodes[(n - 1) % N][0]


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


def two_peer_hop_seconds(
    nbytes: int, peers: tuple[int, int] | None, device: torch.device, group: Any = None, repeats: int = 5
) -> float:
    """Seconds of nbytes sent to each of two peers and received from each at once (peers =
    (next, prev)), every rank with peers at once; as hop_seconds takes them. Both pairs go
    in one post_hops, receives first: posted as two pairs, the second receive waited behind
    the first send, and the probe measured 0.70 of the port (median of 9, 512 KiB-4 MiB,
    3-node 100 Mbit/s switch) where the ring's receive-first hops get 0.90-0.99."""
    send = [torch.ones(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    recv = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]

    def hop() -> None:
        if peers is None:
            return
        nxt, prev = peers
        for work in post_hops([(send[0], recv[0], (nxt, prev)), (send[1], recv[1], (prev, nxt))], group):
            work.wait()

    return timed(hop, device, group, repeats)


def measure_shared_port(
    nbytes: int, lanes: Lanes, rank: int, device: torch.device, group: Any = None, repeats: int = 5
) -> dict[str, Any] | None:
    """A switch port's efficiency under flows to two peers (the model's
    `shared_port_efficiency`): lane 0 of every node sends X bytes to the next node's and X to
    the previous node's lane-0 rank at once (t2), against 2X to the next node alone (t1):
    the same bytes through each NIC, one peer or two. efficiency = t1 / t2 in (0, 1]. X =
    SLOPE_FACTOR x the K/V block (at least MIN_MESSAGE_BYTES), so the latency is small
    beside the transfer. None below SHARED_PORT_MIN_NODES nodes (next and previous node are
    one peer)."""
    if len(lanes.nodes) < SHARED_PORT_MIN_NODES:
        return None
    message = SLOPE_FACTOR * max(nbytes, MIN_MESSAGE_BYTES) // 2
    peers = lanes.shared_port_peers(rank)
    one = hop_seconds(2 * message, peers, device, group, repeats)
    two = two_peer_hop_seconds(message, peers, device, group, repeats)
    return {
        "message_bytes": message,
        "one_peer_s": one,
        "two_peers_s": two,
        "efficiency": shared_port_efficiency(one, two),
    }


def shared_port_efficiency(one_peer_s: float, two_peers_s: float) -> float:
    """t1 / t2 rounded to 3 digits, within [0.001, 1] (two peers faster than one: noise, or
    a fabric where they do not share: 1)."""
    return min(1.0, max(0.001, round(one_peer_s / two_peers_s, 3)))


def measure_links(shape: Shape, topology: Topology, rank: int, device: torch.device, group: Any = None,
                  repeats: int = 5) -> dict[str, Any]:
    """intra and inter figures (None where the job has no such link), the inter port's
    efficiency under two peers (None below three nodes) and the NICs in use."""
    lanes = Lanes.of(topology)
    nbytes = shape.kv_bytes(topology.world_size)
    out: dict[str, Any] = {"intra": None, "inter": None, "inter_one_lane": None, "inter_shared_port": None}
    if any(len(r) > 1 for r in lanes.nodes):
        out["intra"] = measure_link(nbytes, lanes.intra_peers(rank), device, group, repeats)
    if len(lanes.nodes) > 1:
        width = lanes.width
        out["inter"] = measure_link(nbytes, lanes.inter_peers(rank, width), device, group, repeats)
        out["inter"]["flows_per_node"] = width
        if width > 1:
            out["inter_one_lane"] = measure_link(nbytes, lanes.inter_peers(rank, 1), device, group, repeats)
            out["inter_one_lane"]["flows_per_node"] = 1
    out["inter_shared_port"] = measure_shared_port(nbytes, lanes, rank, device, group, repeats)
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
    the job did not have (one node, one rank per node) keeps the config's figures, and so
    does a port efficiency not measured (intra always; inter below three nodes).
    `memory_bytes`: the measured memory per rank (`measure_memory`); None measures this
    process's (its node's fullest share), and unreadable keeps the config's."""
    topo = ctx.topology
    counts = list(topo.ranks_per_node)
    intra, inter, shared = links.get("intra"), links.get("inter"), links.get("inter_shared_port")
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
            "shared_port_efficiency": topo.intra.shared_port_efficiency,
        },
        "inter": {
            "bandwidth_GBps": inter_bw, "latency_us": inter["latency_us"] if inter else topo.inter.latency_us,
            "links": topo.inter.links,
            "shared_port_efficiency": shared["efficiency"] if shared else topo.inter.shared_port_efficiency,
        },
        "ring": str(cfg.topology.get("ring", "auto")),
        "direction": str(cfg.topology.get("direction", "auto")),
        "order": str(cfg.topology.get("order", "node")),
        "distribution": str(cfg.topology.get("distribution", "block")),
        "virtual_node_size": cfg.topology.get("virtual_node_size"),
        "compute_tflops": compute["compute_tflops"],
        "step_overhead_us": compute["step_overhead_us"],
        "memory_bandwidth_GBps": compute.get("memory_bandwidth_GBps"),
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
    shared = links.get("inter_shared_port")
    nics = links["nics"]
    subtracted = compute["step_overhead_subtracted"]
    loop_us = compute["block_loop_overhead_us"]

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
            f"{compute['model_backward_over_forward']}), "
            + (
                f"less the block loop's own fixed cost, {loop_us:.4g} us per block "
                f"({compute['compute_tflops_with_overhead']:.4g} TFLOP/s counting it as FLOPs' time)"
                if subtracted else
                f"the block loop's fixed cost ({loop_us:.4g} us per block) NOT subtracted (it was over half the time: "
                "calibrate at a larger seq_len)"
            )
        ),
        "step_overhead_us": step_note(compute),
        "memory_bandwidth_GBps": stream_note(compute.get("stream")),
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
            "shared_port_efficiency": "not measured: the config's",
        },
        "inter": {
            "bandwidth_GBps": (
                f"per NIC per direction, the most one NIC carried: {inter['flows_per_node']} flow(s) per node at once "
                f"got {mb(inter)} each over {nics['count']} NIC(s)" + (f"; one flow alone {mb(one)}" if one else "")
            ) if inter else "not measured (one node): the config's",
            "latency_us": "4-byte outer-ring hop, all lanes at once" if inter else "not measured: the config's",
            "links": "switch | mesh: declared by the config (NICs into a switch, or a link per node pair), not measured",
            "shared_port_efficiency": (
                f"lane 0 of every node, as many bytes back: {shared['message_bytes'] * 2} B to the next node in "
                f"{shared['one_peer_s'] * 1e3:.3g} ms / {shared['message_bytes']} B to each of the next and previous "
                f"node at once in {shared['two_peers_s'] * 1e3:.3g} ms"
            ) if shared else f"not measured (needs {SHARED_PORT_MIN_NODES} nodes): the config's",
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


def step_note(compute: dict[str, Any]) -> str:
    """How step_overhead_us was measured (the ring's tiny forward less the model's
    prediction without it, per step), beside the block loop's own figure."""
    loop = (
        f"the block loop alone: {compute['tiny_blocks_computed']} block computes + merges on blocks of "
        f"{compute['tiny_block_tokens']} tokens in {compute['tiny_block_s'] * 1e3:.3g} ms, "
        f"{compute['block_loop_overhead_us']:.4g} us per block"
    )
    ring = compute.get("ring_step")
    if not ring:
        return f"fixed cost of one ring step besides its FLOPs: {loop}"
    return (
        f"fixed cost of one ring step besides its FLOPs and K/V streaming: ringctl's {ring['plan']} ring forward "
        f"on blocks of {ring['block_tokens']} tokens took {ring['ring_forward_s'] * 1e3:.3g} ms, the model "
        f"without it predicts {ring['model_forward_s'] * 1e3:.3g} ms (hop latencies), / {ring['steps']} steps"
        + (" (less than predicted: 0)" if ring["clamped"] else "") + f"; {loop}"
    )


def stream_note(stream: dict[str, Any] | None) -> str:
    """How memory_bandwidth_GBps was measured, or why it is null."""
    if not stream:
        return "not measured: null (blocks priced by FLOPs alone)"
    if stream["memory_bandwidth_GBps"] is None:
        return f"null: {stream['note']}"
    return (
        f"GB/s (1e9 B) one rank streams K/V, solo, all ranks at once: 1 query over {stream['keys']} keys "
        f"{stream['shard_s'] * 1e6:.4g} us, over {stream['few_keys']} keys {stream['few_s'] * 1e6:.4g} us; "
        f"{stream['streamed_bytes']} B of K/V / the difference"
    )


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
    # last: the prediction it subtracts prices the hops with the links just measured
    compute["ring_step"] = measure_step_overhead(
        shape, model_topology(ctx.topology, compute, links), ctx.rank, ctx.device, ctx.group, repeats
    )
    compute["step_overhead_us"] = compute["ring_step"]["step_overhead_us"]
    name = default_name(cfg)
    fields = topology_fields(cfg, ctx, compute, links, name, measure_memory(ctx))
    result: dict[str, Any] = {
        "calibration": {"shape": asdict(shape), "repeats": repeats, "compute": compute, **links},
        "topology": fields,
    }
    step = {
        "calibrate/compute_tflops": compute["compute_tflops"], "calibrate/nics_per_node": fields["nics_per_node"],
        "calibrate/step_overhead_us": compute["step_overhead_us"],
        "calibrate/block_loop_overhead_us": compute["block_loop_overhead_us"],
    }
    if compute["memory_bandwidth_GBps"] is not None:  # null: not measurable here (stream's note says why)
        step["calibrate/memory_bandwidth_GBps"] = compute["memory_bandwidth_GBps"]
    if links.get("inter_shared_port"):
        step["calibrate/inter_shared_port_efficiency"] = links["inter_shared_port"]["efficiency"]
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
