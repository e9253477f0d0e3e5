"""The RingPlan: which rank holds which shard, who sends to whom over which link, and what
it should cost (no torch import; deterministic, so every rank builds the same plan).

Two algorithms (see docs/internals.md for the exact schedules the runtime runs):

- `flat`: one ring over all W ranks, ordered node-contiguous (node 0's ranks, then node 1's,
  ...), so a revolution crosses nodes exactly N times whatever the rank numbering. The
  rank-order ring 0, 1, ..., W-1 is the baseline it is compared with: under SLURM's cyclic
  distribution every one of its hops crosses nodes.
- `hierarchical` (LoongTrain's double ring, arXiv 2406.18485): an inner ring per node over
  the intra link and an outer ring across nodes in which all L ranks of a node send to their
  peers on the next node at once, each outer transfer hidden behind L inner compute steps.

The cost model prices one attention forward+backward: per ring step
time = max(compute, transfer), compute from the FLOP rate, transfer = latency +
bytes / bandwidth, with concurrent inter-node flows leaving (or entering) a node sharing its
NICs. Everything is O(W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from ringctl.errors import ConfigError, check_positive_int
from ringctl.topology import LINKS, LinkClass, Topology, setting

# The names below are defined here once and imported everywhere else (config, launch, the
# runtime in ring/, benchmarks); this module has no torch import, so anything may use them.

#: ring algorithms: one flat ring, or LoongTrain's double ring
ALGORITHMS = ("flat", "hierarchical")
#: what topology.ring may say: an algorithm, or `auto` (the cost model's faster one)
RING_CHOICES = ("auto", *ALGORITHMS)
#: ring order of a flat ring: node-contiguous (topology-aware) or rank order (the baseline)
ORDERS = ("node", "rank")
#: sequence layouts (workload.layout): which global tokens each ring position holds; `docs`
#: splits every packed document head-and-tail over the positions (ringctl.documents)
LAYOUTS = ("contiguous", "zigzag", "striped", "docs")
#: the two passes of one attention call; byte counters and predictions are kept per phase
PHASES = ("forward", "backward")
#: what travels the ring and which way (topology.direction): every K/V head one way round it;
#: the K/V heads split in two lanes walking it in opposite directions in lock-step (both
#: directions of each link); or TokenRing (arXiv 2412.20501): the queries travel one way while
#: every partial result goes straight back to the rank owning those queries
DIRECTIONS = ("one_way", "bidirectional", "tokenring")
#: what topology.direction may say: a direction, or `auto` (the cost model's fastest)
DIRECTION_CHOICES = ("auto", *DIRECTIONS)
#: direction=auto leaves the one-way ring only for a strategy the cost model predicts at
#: least this fraction faster (topology.direction_min_gain). The other strategies hold more
#: memory (TokenRing: its queries, dout and the partials travel) and talk to more peers, and
#: the model prices them with wider error (tens of percent on a shared switch port): a
#: near-tie is not worth that risk, and staying costs at most this fraction if the model is
#: right. 0: the fastest prediction, whatever the margin.
DIRECTION_MIN_GAIN = 0.1
#: which way a hop goes, as byte counters label it: lane 0 to the next ring position, lane 1
#: (bidirectional) to the previous one; TokenRing: its queries "next", its partials on their
#: way back to their owners "prev"
HOP_DIRECTIONS = ("next", "prev")


def lane_kv_heads(kv_heads: int, direction: str) -> tuple[int, ...]:
    """K/V heads each lane carries: all of them one way (and TokenRing's one lane, where
    the K/V stay home); bidirectional, the first ceil(Hkv/2) heads forward and the rest
    backward (ValueError for one K/V head)."""
    if direction not in DIRECTIONS:
        raise ConfigError("topology.direction", direction, " | ".join(DIRECTIONS))
    if direction != "bidirectional":
        return (kv_heads,)
    if kv_heads < 2:
        raise ValueError(
            f"kv_heads={kv_heads} cannot be split over two directions; direction="
            "'bidirectional' needs kv_heads >= 2 (use topology.direction=one_way, tokenring or auto)"
        )
    return (kv_heads - kv_heads // 2, kv_heads // 2)
#: dtype names (workload.dtype) and their element size
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
#: sizes beyond these are refused: the Triton and flash kernels stop at 256 (head_dim), and
#: token positions are int32 in some kernels (seq_len)
MAX_HEAD_DIM = 256
MAX_SEQ_LEN = 2**31


def seq_len_divisor(layout: str, world_size: int) -> int:
    """A global sequence must be a multiple of this to split under `layout` over
    `world_size` ring positions: zigzag cuts it in 2W chunks, contiguous and striped in W
    shards; docs takes any length (1): its shards hold ceil(S / W) rows, fewer than W of
    them internal padding in all."""
    if layout not in LAYOUTS:
        raise ConfigError("workload.layout", layout, " | ".join(LAYOUTS))
    if layout == "docs":
        return 1
    return 2 * world_size if layout == "zigzag" else world_size


def check_seq_len(seq_len: object, layout: str, world_size: int, key: str = "workload.seq_len") -> int:
    """Tokens per shard (padded ones included); ConfigError naming `key` when `layout`
    cannot split `seq_len`."""
    div = seq_len_divisor(layout, world_size)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1 or seq_len % div:
        how = f"2 x world size {world_size} chunks" if layout == "zigzag" else f"world size {world_size} shards"
        raise ConfigError(key, seq_len, f"a positive multiple of {div} ({layout} splits it in {how})")
    return -(-seq_len // world_size)
#: backward FLOPs / forward FLOPs of blockwise attention (recompute of P, then dV, dP, dQ, dK)
BACKWARD_FLOP_RATIO = 2.5


@dataclass(frozen=True)
class Workload:
    """The attention sizes the cost model prices. Shapes are global: `seq_len` is the whole
    sequence; `heads` are query heads, `kv_heads` the K/V heads that travel the ring."""

    batch: int = 1
    seq_len: int = 131072
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    causal: bool = True
    #: packed documents (ringctl.documents.DocumentSpec, drawn with `documents_seed`): the
    #: cost model then prices only the query-key pairs the mask leaves; None: one sequence
    documents: Any = None
    documents_seed: int = 0

    def __post_init__(self) -> None:
        for key in ("batch", "seq_len", "heads", "kv_heads", "head_dim"):
            check_positive_int(f"workload.{key}", getattr(self, key))
        if self.documents is not None:
            from ringctl.documents import DocumentSpec, parse_documents

            spec = self.documents
            if not isinstance(spec, DocumentSpec):
                spec = parse_documents(spec)
                object.__setattr__(self, "documents", spec)
            if spec is not None and spec.kind == "lengths" and sum(spec.lengths) > self.seq_len:
                raise ConfigError(
                    "workload.documents", list(spec.lengths)[:8],
                    f"document lengths summing to <= workload.seq_len={self.seq_len} "
                    f"(they sum to {sum(spec.lengths)})",
                )  # fmt: skip
        if self.head_dim > MAX_HEAD_DIM:
            raise ConfigError("workload.head_dim", self.head_dim, f"an integer in 1..{MAX_HEAD_DIM} (the attention kernels' limit)")
        if self.seq_len > MAX_SEQ_LEN:
            raise ConfigError("workload.seq_len", self.seq_len, f"an integer in 1..{MAX_SEQ_LEN} (2**31)")
        if self.heads % self.kv_heads:
            raise ConfigError("workload.kv_heads", self.kv_heads, f"a divisor of workload.heads={self.heads}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError("workload.dtype", self.dtype, " | ".join(DTYPE_BYTES))

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @classmethod
    def from_config(cls, cfg: Any) -> Workload:
        """From the `workload` config node (mapping or attributes); missing keys keep the
        defaults above (a long-context bfloat16 GQA layer)."""
        kwargs = {k: setting(cfg, k, None) for k in ("batch", "seq_len", "heads", "kv_heads", "head_dim", "dtype", "causal")}
        kwargs["documents"] = setting(cfg, "documents", None)
        kwargs["documents_seed"] = setting(cfg, "seed", None)
        return cls(**{k: v for k, v in kwargs.items() if v is not None})

    def cu_seqlens(self) -> tuple[int, ...] | None:
        """Boundaries of the documents drawn for this workload (the jobs draw the same)."""
        if self.documents is None:
            return None
        from ringctl.documents import cu_seqlens_of

        return cu_seqlens_of(self.documents.sample(self.seq_len, self.documents_seed))


def _acc_bytes(dtype_bytes: int) -> int:
    """dK/dV accumulators travel in the accumulation dtype: float64 stays float64, else float32."""
    return 8 if dtype_bytes == 8 else 4


def _kv_bytes(batch: int, block_tokens: int, kv_heads: int, head_dim: int, nbytes: int) -> int:
    """K and V of one shard (only the kv heads travel)."""
    return 2 * batch * block_tokens * kv_heads * head_dim * nbytes


def _tokenring_bytes(batch: int, block_tokens: int, heads: int, head_dim: int, nbytes: int, phase: str) -> tuple[int, int]:
    """TokenRing's two messages of one shard: (the block that travels, one partial result).
    Forward: Q, and out with its lse ((D+1) columns in the accumulation dtype). Backward:
    q, dout, out and lse (accumulation dtype), and a dq partial (accumulation dtype)."""
    acc = _acc_bytes(nbytes)
    rows = batch * block_tokens * heads
    if phase == "backward":
        return 3 * rows * head_dim * nbytes + rows * acc, rows * head_dim * acc
    return rows * head_dim * nbytes, rows * (head_dim + 1) * acc


@dataclass(frozen=True)
class RingPlan:
    """Ring order and placement; the runtime executes it, the report draws it.

    `ring_order[p]` is the global rank at ring position p (which holds shard p of the
    layout). `inner_size`: hierarchical, the ranks per node L (position p sits on node
    p // L at local index p % L); flat, the whole world size (one ring)."""

    algorithm: str
    layout: str
    world_size: int
    ring_order: tuple[int, ...]
    rank_to_node: tuple[int, ...]
    nodes: int
    inner_size: int
    node_names: tuple[str, ...] = ()
    topology: Topology | None = field(default=None, repr=False, compare=False)
    #: what was asked for: the algorithm itself, or "auto" when the cost model chose it
    requested: str = field(default="", compare=False)
    #: one_way | bidirectional | tokenring (DIRECTIONS): what travels the ring, which way
    direction: str = "one_way"
    #: what topology.direction asked for: the direction itself, or "auto"
    direction_requested: str = field(default="", compare=False)
    #: auto's margin for leaving the one-way ring (topology.direction_min_gain)
    direction_min_gain: float = field(default=DIRECTION_MIN_GAIN, compare=False)
    _positions: tuple[int, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError("topology.ring", self.algorithm, " | ".join(ALGORITHMS))
        if self.layout not in LAYOUTS:
            raise ConfigError("workload.layout", self.layout, " | ".join(LAYOUTS))
        if self.direction not in DIRECTIONS:
            raise ConfigError("topology.direction", self.direction, " | ".join(DIRECTIONS))
        world = self.world_size
        positions = [-1] * world
        if len(self.ring_order) != world or len(self.rank_to_node) != world:
            raise ValueError(f"ring_order and rank_to_node need {world} entries each")
        for p, rank in enumerate(self.ring_order):
            if not 0 <= rank < world or positions[rank] != -1:
                raise ValueError(f"ring_order must be a permutation of 0..{world - 1}; got {rank} at position {p}")
            positions[rank] = p
        object.__setattr__(self, "_positions", tuple(positions))
        if not self.node_names:
            object.__setattr__(self, "node_names", tuple(f"node{n}" for n in range(self.nodes)))
        if self.algorithm == "hierarchical":
            L = self.inner_size
            if L * self.nodes != world or any(self.rank_to_node[r] != p // L for p, r in enumerate(self.ring_order)):
                raise ValueError("hierarchical plan: position p must sit on node p // inner_size")

    # ---- structure ------------------------------------------------------------------
    @classmethod
    def rank_order(cls, world_size: int, layout: str = "zigzag") -> RingPlan:
        """The single-node ring 0, 1, ..., W-1 (every link intra): used when
        ring_attention gets no plan."""
        return make_plan(Topology((world_size,)), layout=layout, algorithm="flat", order="rank")

    @property
    def seq_len_divisor(self) -> int:
        """seq_len must be a multiple of this (see `seq_len_divisor`)."""
        return seq_len_divisor(self.layout, self.world_size)

    def position(self, rank: int) -> int:
        """Ring position (shard index) of a global rank."""
        return self._positions[rank]

    def link_class(self, src_rank: int, dst_rank: int) -> str:
        """"intra" when both ranks share a node, else "inter"."""
        return "intra" if self.rank_to_node[src_rank] == self.rank_to_node[dst_rank] else "inter"

    def edges(self, reverse: bool = False) -> list[tuple[int, int, str, str]]:
        """Every send of one revolution's schedule as (src_rank, dst_rank, link_class, ring):
        ring is "flat", or "inner"/"outer" for the hierarchical double ring. O(W).
        `reverse`: the sends of a bidirectional plan's second lane (every ring walked the
        other way). TokenRing's queries take these hops; its partials go straight home."""
        world, order = self.world_size, self.ring_order
        if world == 1:
            return []
        out = []
        step = -1 if reverse else 1
        if self.algorithm == "flat":
            for p in range(world):
                src, dst = order[p], order[(p + step) % world]
                out.append((src, dst, self.link_class(src, dst), "flat"))
            return out
        L, N = self.inner_size, self.nodes
        for p in range(world):
            n, l = divmod(p, L)
            src = order[p]
            if L > 1:
                dst = order[n * L + (l + step) % L]
                out.append((src, dst, self.link_class(src, dst), "inner"))
            if N > 1:
                dst = order[((n + step) % N) * L + l]
                out.append((src, dst, self.link_class(src, dst), "outer"))
        return out

    def lane_fractions(self, kv_heads: int) -> tuple[float, ...]:
        """Share of the K/V bytes each lane carries (one lane: 1.0)."""
        if self.world_size == 1:
            return (1.0,)
        return tuple(h / kv_heads for h in lane_kv_heads(kv_heads, self.direction))

    @property
    def cross_node_hops(self) -> int:
        """Hops that cross nodes in one revolution of a KV block around the ring: for a flat
        ring, how many of its W edges join two nodes; hierarchical, N (the outer ring's
        hops, each carried by all L lanes at once)."""
        if self.algorithm == "hierarchical":
            return self.nodes if self.nodes > 1 else 0
        return _ring_crossings(self.ring_order, self.rank_to_node)

    @property
    def baseline_cross_node_hops(self) -> int:
        """The same count for the rank-order ring 0, 1, ..., W-1 on this placement."""
        return _ring_crossings(range(self.world_size), self.rank_to_node)

    # ---- bytes ------------------------------------------------------------------------
    def check_seq_len(self, seq_len: int, key: str = "workload.seq_len") -> int:
        """Tokens per shard; ConfigError naming `key` when the layout cannot split seq_len."""
        return check_seq_len(seq_len, self.layout, self.world_size, key)

    def predicted_bytes(
        self,
        batch: int,
        seq_len: int,
        kv_heads: int,
        head_dim: int,
        dtype_bytes: int,
        phase: str,
        by_direction: bool = False,
        *,
        heads: int | None = None,
    ) -> dict[str, Any]:
        """Bytes each global rank SENDS per link class in one `phase` (the schedules of
        docs/internals.md, byte for byte): ``{link: [per rank]}``, or with `by_direction`
        ``{link: {"next"|"prev": [per rank]}}`` (HOP_DIRECTIONS: which way each lane went).
        `heads` (query heads) is needed by TokenRing only, whose queries travel."""
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r} is invalid; allowed: {' | '.join(PHASES)}")
        block = self.check_seq_len(seq_len)
        backward = phase == "backward"
        world = self.world_size
        out = {link: {d: [0] * world for d in HOP_DIRECTIONS} for link in LINKS}
        if self.direction == "tokenring" and world > 1:
            self._tokenring_sends(out, _tokenring_bytes(batch, block, _need_heads(heads), head_dim, dtype_bytes, phase))
            return out if by_direction else {link: [sum(col) for col in zip(*out[link].values(), strict=True)] for link in LINKS}
        lanes = lane_kv_heads(kv_heads, self.direction) if world > 1 else ()
        for lane, heads in enumerate(lanes):
            d = HOP_DIRECTIONS[lane]
            kv = _kv_bytes(batch, block, heads, head_dim, dtype_bytes)
            dkv = _kv_bytes(batch, block, heads, head_dim, _acc_bytes(dtype_bytes))
            if self.algorithm == "flat":
                sent = (world - 1) * kv + (world * dkv if backward else 0)
                step = 1 if lane == 0 else -1
                for p in range(world):
                    src, dst = self.ring_order[p], self.ring_order[(p + step) % world]
                    out[self.link_class(src, dst)][d][src] += sent
                continue
            N, L = self.nodes, self.inner_size
            inter = (N - 1) * kv + (N * dkv if backward and N > 1 else 0)
            intra = N * (L - 1) * kv + (N * L * dkv if backward and L > 1 else 0)
            out["inter"][d] = [inter] * world
            out["intra"][d] = [intra] * world
        if by_direction:
            return out
        return {link: [sum(col) for col in zip(*out[link].values(), strict=True)] for link in LINKS}

    def bytes_per_step(
        self, batch: int, seq_len: int, kv_heads: int, head_dim: int, dtype_bytes: int, *, heads: int | None = None
    ) -> dict[str, int]:
        """Forward bytes sent by all ranks together per ring step (one KV block computed per
        rank), per link class. Hierarchical: an outer step's bytes / L (it spans L steps).
        TokenRing (needs `heads`): its Q blocks' hops counted so, plus one partial per rank
        per step, split over the classes as all partials are (their mean over the W-1
        steps that send, rounded)."""
        block = self.check_seq_len(seq_len)
        counts = {link: 0 for link in LINKS}
        if self.world_size == 1:
            return counts
        moving = 0
        if self.direction == "tokenring":
            moving, part = _tokenring_bytes(batch, block, _need_heads(heads), head_dim, dtype_bytes, "forward")
            partials = {link: {d: [0] * self.world_size for d in HOP_DIRECTIONS} for link in LINKS}
            self._tokenring_sends(partials, (0, part))
            for link in LINKS:
                counts[link] += round(sum(partials[link]["prev"]) / (self.world_size - 1))
        for lane, lane_heads in enumerate(lane_kv_heads(kv_heads, self.direction)):
            kv = moving or _kv_bytes(batch, block, lane_heads, head_dim, dtype_bytes)
            if self.algorithm == "hierarchical":
                N, L = self.nodes, self.inner_size
                counts["intra"] += N * (L - 1) * kv
                counts["inter"] += N * kv if N > 1 else 0
                continue
            for _src, _dst, link, _ring in self.edges(reverse=lane == 1):
                counts[link] += kv
        return counts

    def _tokenring_sends(self, out: dict[str, dict[str, list[int]]], sizes: tuple[int, int]) -> None:
        """Add TokenRing's sends to `out` ({link: {direction: [per rank]}}), sizes = (the
        travelling block, one partial): the block hops as one-way pass-KV's K/V ("next");
        each rank sends one partial to every other rank, the owner of queries it held
        ("prev"; its own block's partial stays home). W > 1."""
        moving, part = sizes
        world = self.world_size
        if self.algorithm == "flat":
            for p in range(world):
                src, dst = self.ring_order[p], self.ring_order[(p + 1) % world]
                out[self.link_class(src, dst)]["next"][src] += (world - 1) * moving
        else:
            N, L = self.nodes, self.inner_size
            for r in range(world):
                out["inter"]["next"][r] += (N - 1) * moving
                out["intra"]["next"][r] += N * (L - 1) * moving
        on_node = _counts(self.rank_to_node, self.nodes)
        for r in range(world):
            peers = on_node[self.rank_to_node[r]] - 1
            out["intra"]["prev"][r] += peers * part
            out["inter"]["prev"][r] += (world - 1 - peers) * part

    # ---- output -----------------------------------------------------------------------
    def to_dict(self, workload: Workload | None = None) -> dict[str, Any]:
        """JSON-able plan (what `ringctl plan --json` prints and results.json keeps); with a
        workload, also bytes and the cost model's predictions (needs `topology`)."""
        out: dict[str, Any] = {
            "ring": self.algorithm,
            "ring_requested": self.requested or self.algorithm,
            "direction": self.direction,
            "direction_requested": self.direction_requested or self.direction,
            "direction_min_gain": self.direction_min_gain,
            "layout": self.layout,
            "world_size": self.world_size,
            "nodes": self.nodes,
            "inner_size": self.inner_size,
            "node_names": list(self.node_names),
            "ranks_per_node": _counts(self.rank_to_node, self.nodes),
            "ring_order": list(self.ring_order),
            "positions": list(self._positions),
            "rank_to_node": list(self.rank_to_node),
            "cross_node_hops": self.cross_node_hops,
            "baseline_cross_node_hops": self.baseline_cross_node_hops,
        }
        if workload is not None:
            out.update(estimate(self, workload).to_dict())
            out["bytes_by_direction"] = bytes_by_direction(self, workload)
            out["baseline"] = estimate(baseline_plan(self), workload).to_dict()
            out["alternatives"] = {
                name: {
                    "cross_node_hops": alt.cross_node_hops,
                    "direction": alt.direction,
                    **{k: v for k, v in estimate(alt, workload).to_dict().items() if k.startswith("predicted_") or k == "overlap_ok"},
                    "overlap_from_seq_len": overlap_seq_len(alt, workload),
                    "bytes_by_direction": bytes_by_direction(alt, workload),
                }
                for name, alt in alternatives(self, workload).items()
            }
            out["overlap_from_seq_len"] = overlap_seq_len(self, workload)
        return out


def bytes_by_direction(plan: RingPlan, workload: Workload) -> dict[str, dict[str, dict[str, int]]]:
    """{phase: {link: {"next"|"prev": bytes all ranks send}}}: the plan's predicted_bytes summed."""
    w = workload
    return {
        phase: {
            link: {d: sum(per_rank) for d, per_rank in by_dir.items()}
            for link, by_dir in plan.predicted_bytes(
                w.batch, w.seq_len, w.kv_heads, w.head_dim, w.dtype_bytes, phase, by_direction=True, heads=w.heads
            ).items()
        }
        for phase in PHASES
    }


def _need_heads(heads: int | None) -> int:
    if heads is None:
        raise ValueError("heads=None: direction='tokenring' moves the queries, so its bytes need heads (workload.heads)")
    return heads


def _ring_crossings(order: Any, rank_to_node: tuple[int, ...]) -> int:
    order = list(order)
    world = len(order)
    if world < 2:
        return 0
    return sum(rank_to_node[order[p]] != rank_to_node[order[(p + 1) % world]] for p in range(world))


def _counts(rank_to_node: tuple[int, ...], nodes: int) -> list[int]:
    counts = [0] * nodes
    for node in rank_to_node:
        counts[node] += 1
    return counts


def make_plan(
    topology: Topology,
    layout: str = "zigzag",
    algorithm: str = "flat",
    *,
    order: str = "node",
    workload: Workload | None = None,
    direction: str = "one_way",
    direction_min_gain: float = DIRECTION_MIN_GAIN,
) -> RingPlan:
    """The plan for `topology`. order="node" (default): node-contiguous ring order;
    order="rank": the rank-order ring 0..W-1 (the topology-blind baseline; flat only), so
    the baseline can run as a real job (`topology.order=rank`). algorithm="auto": the
    algorithm the cost model predicts fastest for `workload` (the default Workload when
    none is given), among those the topology allows. direction: one_way | bidirectional |
    tokenring | auto (DIRECTION_CHOICES; auto: the fastest for `workload`, ties going to
    the first in DIRECTIONS order, but the one-way ring unless the fastest is predicted at
    least `direction_min_gain` faster than it: DIRECTION_MIN_GAIN)."""
    if direction not in DIRECTION_CHOICES:
        raise ConfigError("topology.direction", direction, " | ".join(DIRECTION_CHOICES))
    gain = check_min_gain(direction_min_gain)
    if algorithm not in RING_CHOICES:
        raise ConfigError("topology.ring", algorithm, " | ".join(RING_CHOICES))
    if layout not in LAYOUTS:
        raise ConfigError("workload.layout", layout, " | ".join(LAYOUTS))
    if order not in ORDERS:
        raise ConfigError("topology.order", order, " | ".join(ORDERS))
    priced = workload or Workload()
    if direction == "bidirectional" and workload is not None and workload.kv_heads < 2:
        raise ConfigError(
            "topology.direction", direction,
            f"one_way | tokenring | auto with workload.kv_heads={workload.kv_heads} (bidirectional splits "
            "the K/V heads into two lanes, one per direction: it needs kv_heads >= 2)",
        )  # fmt: skip
    directions = _feasible_directions(priced) if direction == "auto" else (direction,)
    algorithms = _feasible(topology, order) if algorithm == "auto" else (algorithm,)
    candidates = [
        replace(_build(topology, layout, a, order), direction=d, direction_requested=direction, direction_min_gain=gain)
        for a in algorithms
        for d in directions
    ]
    if len(candidates) == 1:
        return replace(candidates[0], requested=algorithm)
    return replace(_fastest(candidates, priced, gain), requested=algorithm)


def _fastest(candidates: list[RingPlan], workload: Workload, min_gain: float) -> RingPlan:
    """The candidate predicted fastest (ties: the first), unless it leaves the one-way ring
    for less than `min_gain` (a fraction) over the fastest one-way candidate."""
    totals = [estimate(p, workload).total_s for p in candidates]
    best = min(range(len(candidates)), key=totals.__getitem__)
    one_way = [i for i, p in enumerate(candidates) if p.direction == "one_way"]
    if candidates[best].direction != "one_way" and one_way:
        stay = min(one_way, key=totals.__getitem__)
        if totals[best] > (1.0 - min_gain) * totals[stay]:
            return candidates[stay]
    return candidates[best]


def check_min_gain(value: object, key: str = "topology.direction_min_gain") -> float:
    """`value` if it is a number in [0, 1), else ConfigError naming `key`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(
            key, value, "a number in [0, 1): the least predicted gain (a fraction) for which direction=auto leaves the one-way ring",
        )  # fmt: skip
    return float(value)


def _feasible_directions(workload: Workload) -> tuple[str, ...]:
    """Directions `auto` weighs: bidirectional needs two K/V heads to split."""
    return tuple(d for d in DIRECTIONS if d != "bidirectional" or workload.kv_heads >= 2)


def _feasible(topology: Topology, order: str) -> tuple[str, ...]:
    """Algorithms that can run on `topology`: hierarchical needs even nodes, several of
    them, and the node-contiguous order (with one node it is the flat ring)."""
    if order == "node" and topology.is_even and topology.nodes > 1:
        return ALGORITHMS
    return ("flat",)


def _build(topology: Topology, layout: str, algorithm: str, order: str) -> RingPlan:
    world = topology.world_size
    if order == "rank":
        if algorithm != "flat":
            raise ConfigError("topology.order", order, "node with topology.ring=hierarchical (the rank-order ring is flat only)")
        ring_order = tuple(range(world))
    else:
        ring_order = tuple(r for ranks in topology.ranks_of_nodes() for r in ranks)
    inner = world
    if algorithm == "hierarchical":
        if not topology.is_even:
            shown = ",".join(map(str, topology.ranks_per_node[:8])) + ("..." if topology.nodes > 8 else "")
            raise ConfigError(
                "topology.ring", "hierarchical",
                f"flat or auto for uneven nodes (ranks per node {shown}; hierarchical needs the same count on every node)",
            )
        inner = topology.ranks_per_node[0]
    return RingPlan(
        algorithm=algorithm, layout=layout, world_size=world, ring_order=ring_order,
        rank_to_node=topology.rank_to_node, nodes=topology.nodes, inner_size=inner,
        node_names=topology.node_names, topology=topology, requested=algorithm,
    )


def alternatives(plan: RingPlan, workload: Workload) -> dict[str, RingPlan]:
    """The plans `ringctl plan` shows side by side on the plan's topology and layout: every
    feasible algorithm in node order, one-way and, with several ranks, bidirectional (two
    K/V heads or more) and TokenRing ("flat bidirectional", "flat tokenring", ...), and the
    rank-order ring (the topology-blind baseline)."""
    topo = _topology_of(plan)
    out = {}
    for d in _feasible_directions(workload) if plan.world_size > 1 else ("one_way",):
        for a in _feasible(topo, "node"):
            name = a if d == "one_way" else f"{a} {d}"
            out[name] = replace(_build(topo, plan.layout, a, "node"), direction=d)
    out["rank-order"] = baseline_plan(plan)
    return out


def overlap_seq_len(plan: RingPlan, workload: Workload) -> int:
    """The shortest global sequence (a multiple of the layout's divisor) from which every
    hop of `plan` hides behind its block's compute: below it the ring is transfer-bound."""
    cost = estimate(plan, workload)
    need = max((n for phase in cost.min_block_tokens.values() for n in phase.values()), default=0)
    div = plan.seq_len_divisor
    return max(div, math.ceil(need * plan.world_size / div) * div)


def plan_from_config(topology: Topology, topology_cfg: Any, workload_cfg: Any) -> tuple[RingPlan, Workload]:
    """The RingPlan and Workload a job's `topology` and `workload` config nodes ask for on
    `topology`, with the sequence checked against the layout.

    The one place a config becomes a plan: `ringctl plan`, launch validation and every rank
    of the job call it, so what validates is what runs and what `ringctl plan` shows."""
    workload = Workload.from_config(workload_cfg)
    plan = make_plan(
        topology,
        layout=setting(workload_cfg, "layout", "zigzag"),
        algorithm=setting(topology_cfg, "ring", "auto"),
        order=setting(topology_cfg, "order", "node"),
        workload=workload,
        direction=setting(topology_cfg, "direction", "auto"),
        direction_min_gain=setting(topology_cfg, "direction_min_gain", DIRECTION_MIN_GAIN),
    )
    plan.check_seq_len(workload.seq_len)
    return plan, workload


def baseline_plan(plan: RingPlan) -> RingPlan:
    """The rank-order flat ring on the same topology and layout (what a topology-blind ring runs)."""
    return _build(_topology_of(plan), plan.layout, "flat", "rank")


def _topology_of(plan: RingPlan) -> Topology:
    if plan.topology is not None:
        return plan.topology
    return Topology(tuple(_counts(plan.rank_to_node, plan.nodes)), rank_to_node=plan.rank_to_node)


# ---- cost model ----------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """Predicted time of one attention forward+backward under a plan.

    `step_time_s`: steady-state forward time per ring step (one KV block per rank);
    hierarchical: one outer step / L. `overlap` holds, per phase and link, the smallest
    block (tokens per shard) whose compute hides that link's transfer."""

    block_tokens: int
    compute_s: dict[str, float]
    transfer_s: dict[str, float]
    step_time_s: float
    forward_s: float
    backward_s: float
    bytes_per_step: dict[str, int]
    bytes_total: dict[str, dict[str, int]]
    min_block_tokens: dict[str, dict[str, int]]
    inter_flows_per_nic: float
    documents: dict[str, Any] | None = None  # packed documents: work per rank (document_work)

    @property
    def total_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def overlap_ok(self) -> bool:
        return all(self.block_tokens >= need for phase in self.min_block_tokens.values() for need in phase.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "block_tokens": self.block_tokens,
            "bytes_per_step": dict(self.bytes_per_step),
            "bytes_total": {p: dict(v) for p, v in self.bytes_total.items()},
            "compute_time_per_block_s": dict(self.compute_s),
            "transfer_time_per_hop_s": dict(self.transfer_s),
            "inter_flows_per_nic": self.inter_flows_per_nic,
            "predicted_step_time_s": self.step_time_s,
            "predicted_forward_time_s": self.forward_s,
            "predicted_backward_time_s": self.backward_s,
            "predicted_total_time_s": self.total_s,
            "overlap": {
                "condition": "block_tokens >= min_block_tokens: compute of a block (FLOPs / FLOP rate) "
                "covers its transfer (latency + bytes / bandwidth); roughly block >= F/B tokens "
                "x (2 Hkv bytes)/(4 Hq causal factor); hierarchical outer: L times looser",
                "block_tokens": self.block_tokens,
                "min_block_tokens": {p: dict(v) for p, v in self.min_block_tokens.items()},
            },
            "overlap_ok": self.overlap_ok,
            **({"documents": self.documents} if self.documents is not None else {}),
        }


@dataclass(frozen=True)
class _Path:
    """One class of hop: latency (s) and the bandwidth (bytes/s) a flow gets on it."""

    latency_s: float
    bytes_per_s: float

    def time(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s if nbytes > 0 else 0.0


def _path(link: LinkClass, share: float = 1.0) -> _Path:
    return _Path(link.latency_us * 1e-6, link.bandwidth_GBps * 1e9 * share)


def _slowest(paths: list[_Path], nbytes: float) -> float:
    return max((p.time(nbytes) for p in paths), default=0.0)


def _min_block(flops_per_pair: float, bytes_per_token: float, path: _Path, looser: int = 1) -> int:
    """Smallest s with looser * s^2 * a >= latency + s * b (a: seconds per query-key pair,
    b: seconds per token moved): the overlap condition, latency included."""
    a = looser * flops_per_pair
    b = bytes_per_token / path.bytes_per_s
    s = (b + math.sqrt(b * b + 4 * a * path.latency_s)) / (2 * a)
    s_int = max(1, math.ceil(s - 1e-9))
    return s_int


def _link_factors(plan: RingPlan, topo: Topology, fractions: tuple[float, ...], ring: str) -> tuple[dict[str, set[float]], float]:
    """How many blocks' worth of bytes the busiest resource under each hop carries per step
    (a hop then takes latency + factor x block / bandwidth), per link class, for the hops of
    `ring` ("flat", "inner" or "outer") of every lane (lane i carries `fractions[i]` of each
    block; lane 1 walks the ring the other way). Switch links: a hop waits on its sender's
    and receiver's port (a rank's whole share of the class, both lanes together) and, inter,
    on its nodes' NICs (all the node's inter bytes over `nics_per_node`). Mesh links: on
    the link of its pair (ranks for intra, nodes for inter) in its direction only. Also
    returns the worst inter blocks per NIC (flows per NIC for a one-way ring)."""
    flows = [
        (src, dst, link, frac)
        for lane, frac in enumerate(fractions)
        for src, dst, link, r in plan.edges(reverse=lane == 1)
        if r == ring
    ]
    node = plan.rank_to_node
    ports = _Ports(topo)
    pair: dict[tuple[str, int, int], float] = {}
    for src, dst, link, frac in flows:
        ports.add(link, src, dst, node[src], node[dst], frac)
        ends = (node[src], node[dst]) if link == "inter" else (src, dst)
        pair[(link, *ends)] = pair.get((link, *ends), 0.0) + frac
    factors: dict[str, set[float]] = {link: set() for link in LINKS}
    worst = 0.0
    for src, dst, link, _frac in flows:
        ends = (node[src], node[dst]) if link == "inter" else (src, dst)
        if topo.link(link).links == "mesh":
            factor = pair[(link, *ends)]
        else:
            factor = max(ports.load((link, "out", src)), ports.load((link, "in", dst)))
        if link == "inter":
            nic_keys = (("inter", "nic_out", node[src]), ("inter", "nic_in", node[dst]))
            worst = max(worst, max(ports.raw[k] for k in nic_keys) / topo.nics_per_node)
            if topo.inter.links == "switch":
                factor = max(factor, max(ports.load(k) for k in nic_keys) / topo.nics_per_node)
        factors[link].add(round(factor, 12))
    return factors, worst


class _Ports:
    """What the switch resources under a set of simultaneous flows carry: each rank's port
    per link class, out and in, and (inter) each node's NICs, out and in. ``load(key)``:
    bytes (or blocks) on it, over the link class's ``shared_port_efficiency`` when flows to
    or from two or more peers meet there (peer ranks at a port, peer nodes at a NIC)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.raw: dict[tuple[str, str, int], float] = {}
        self.peers: dict[tuple[str, str, int], set[int]] = {}

    def add(self, link: str, src: int, dst: int, src_node: int, dst_node: int, amount: float) -> None:
        sides = [("out", src, dst), ("in", dst, src)]
        if link == "inter":
            sides += [("nic_out", src_node, dst_node), ("nic_in", dst_node, src_node)]
        for side, at, peer in sides:
            key = (link, side, at)
            self.raw[key] = self.raw.get(key, 0.0) + amount
            self.peers.setdefault(key, set()).add(peer)

    def load(self, key: tuple[str, str, int]) -> float:
        shared = len(self.peers[key]) > 1 and self.topo.link(key[0]).links == "switch"
        return self.raw[key] / (self.topo.link(key[0]).shared_port_efficiency if shared else 1.0)


def _flat_paths(plan: RingPlan, topo: Topology, fractions: tuple[float, ...] = (1.0,)) -> tuple[dict[str, list[_Path]], float]:
    """Distinct hop classes of a flat ring (see _link_factors): paths per link and the worst
    inter blocks per NIC."""
    factors, worst = _link_factors(plan, topo, fractions, "flat")
    paths = {link: [_path(topo.link(link), 1.0 / f) for f in sorted(factors[link], reverse=True)] for link in LINKS}
    return paths, worst


def estimate(plan: RingPlan, workload: Workload) -> Cost:
    """Predicted forward and backward time of one attention call under `plan`."""
    topo = _topology_of(plan)
    w = workload
    W = plan.world_size
    s = plan.check_seq_len(w.seq_len)
    balanced = w.causal and plan.layout in ("zigzag", "striped", "docs")
    # a causal ring step waits on its busiest rank: balanced layouts halve every block's
    # work on average; contiguous leaves some ranks a full block every step
    causal_factor = 0.5 if balanced else 1.0
    docs = document_work(plan, w) if w.documents is not None else None
    if docs is not None:  # the busiest rank's visible pairs per step, blocks nobody sees skipped
        causal_factor = sum(docs["busiest_pairs_per_step"]) / W / (s * s)
    rate = topo.compute_tflops * 1e12
    pair_fwd = 4 * w.batch * w.heads * w.head_dim * causal_factor / rate  # seconds per (q, k) pair
    pair = {"forward": pair_fwd, "backward": BACKWARD_FLOP_RATIO * pair_fwd}
    db, acc = w.dtype_bytes, _acc_bytes(w.dtype_bytes)
    kv = _kv_bytes(w.batch, s, w.kv_heads, w.head_dim, db)
    lanes = len(plan.lane_fractions(w.kv_heads)) if plan.direction != "tokenring" else 1
    c = {phase: step_compute(topo, pair[phase] * s * s, kv, lanes) for phase in PHASES}
    dkv = _kv_bytes(w.batch, s, w.kv_heads, w.head_dim, acc)
    per_token = {"forward": kv / s, "backward": (kv + dkv) / s}
    totals = {
        phase: {
            link: sum(b)
            for link, b in plan.predicted_bytes(w.batch, w.seq_len, w.kv_heads, w.head_dim, db, phase, heads=w.heads).items()
        }
        for phase in PHASES
    }
    per_step = plan.bytes_per_step(w.batch, w.seq_len, w.kv_heads, w.head_dim, db, heads=w.heads)
    if plan.direction == "tokenring" and W > 1:
        return _tokenring_estimate(plan, topo, w, s, pair, docs, per_step, totals)
    fractions = plan.lane_fractions(w.kv_heads)
    if plan.algorithm == "flat":
        paths, flows = _flat_paths(plan, topo, fractions)
        every = paths["intra"] + paths["inter"]
        t_kv, t_both, t_dkv = (_slowest(every, x) for x in (kv, kv + dkv, dkv))
        if W == 1:
            fwd, bwd, step = c["forward"], c["backward"], c["forward"]
        else:
            step = max(c["forward"], t_kv)
            fwd = (W - 1) * step + c["forward"]
            bwd = (W - 1) * max(c["backward"], t_both) + c["backward"] + t_dkv
        if docs is not None:
            busy = _busy_computes(topo, w, docs["busiest_pairs_per_step"], lanes)
            fwd = _ring_time(busy["forward"], t_kv, 0.0)
            bwd = _ring_time(busy["backward"], t_both, t_dkv)
        need = {
            phase: {link: max((_min_block(pair[phase], per_token[phase], p) for p in paths[link]), default=0) for link in LINKS}
            for phase in PHASES
        }
        transfer = {link: _slowest(paths[link], kv) for link in LINKS}
    else:
        N, L = plan.nodes, plan.inner_size
        inner_f, _ = _link_factors(plan, topo, fractions, "inner")
        outer_f, flows = _link_factors(plan, topo, fractions, "outer")
        inner = [_path(topo.intra, 1.0 / max(inner_f["intra"]))] if L > 1 else []
        outer = [_path(topo.inter, 1.0 / max(outer_f["inter"]))] if N > 1 else []

        def inner_ring(compute: float, moving: float, home: float) -> float:
            """L computes, L-1 overlapped intra hops, then the accumulator's hop home."""
            if L == 1:
                return compute
            return (L - 1) * max(compute, _slowest(inner, moving)) + compute + _slowest(inner, home)

        ring_f = inner_ring(c["forward"], kv, 0)
        ring_b = inner_ring(c["backward"], kv + dkv, dkv)
        fwd = (N - 1) * max(ring_f, _slowest(outer, kv)) + ring_f
        bwd = (N - 1) * max(ring_b, _slowest(outer, kv + dkv)) + ring_b + _slowest(outer, dkv)
        if docs is not None:  # each outer step: the inner ring over that step's L blocks
            busy = _busy_computes(topo, w, docs["busiest_pairs_per_step"], lanes)
            rings = {phase: [busy[phase][o * L : (o + 1) * L] for o in range(N)] for phase in PHASES}
            fwd = _ring_time(
                [_ring_time(r, _slowest(inner, kv), 0.0) for r in rings["forward"]], _slowest(outer, kv), 0.0
            )
            bwd = _ring_time(
                [_ring_time(r, _slowest(inner, kv + dkv), _slowest(inner, dkv)) for r in rings["backward"]],
                _slowest(outer, kv + dkv), _slowest(outer, dkv),
            )  # fmt: skip
        step = max(ring_f, _slowest(outer, kv)) / L if N > 1 else ring_f / L
        need = {
            phase: {
                "intra": _min_block(pair[phase], per_token[phase], inner[0]) if inner else 0,
                "inter": _min_block(pair[phase], per_token[phase], outer[0], looser=L) if outer else 0,
            }
            for phase in PHASES
        }
        transfer = {"intra": _slowest(inner, kv), "inter": _slowest(outer, kv)}
    return Cost(
        block_tokens=s, compute_s=c, transfer_s=transfer, step_time_s=step, forward_s=fwd, backward_s=bwd,
        bytes_per_step=per_step, bytes_total=totals, min_block_tokens=need, inter_flows_per_nic=flows,
        documents=docs,
    )


def _flow_loads(plan: RingPlan, topo: Topology, flows: list[tuple[int, int, int]]) -> tuple[dict[str, float], float]:
    """Flows (src rank, dst rank, bytes) sent at once: per link class, the bytes on the
    busiest resource under any of them (each then takes latency + that / bandwidth), and
    the most inter flows leaving or entering one NIC. The resources of _link_factors:
    switch, a rank's port per class both ways and (inter) its node's NICs; mesh, the pair's
    link (ranks intra, nodes inter) in the flow's direction."""
    node = plan.rank_to_node
    ports = _Ports(topo)
    pair: dict[tuple[str, int, int], float] = {}
    count: dict[tuple[str, int], int] = {}
    on_pairs: list[tuple[str, int, int]] = []
    on_ports: list[tuple[tuple[str, str, int], int]] = []  # (resource, NICs sharing it)
    for src, dst, nbytes in flows:
        link = plan.link_class(src, dst)
        ports.add(link, src, dst, node[src], node[dst], nbytes)
        if topo.link(link).links == "mesh":
            ends = (link, node[src], node[dst]) if link == "inter" else (link, src, dst)
            pair[ends] = pair.get(ends, 0.0) + nbytes
            on_pairs.append(ends)
        else:
            on_ports += [((link, "out", src), 1), ((link, "in", dst), 1)]
        if link == "inter":
            for side, n in (("nic_out", node[src]), ("nic_in", node[dst])):
                count[(side, n)] = count.get((side, n), 0) + 1
                if topo.inter.links == "switch":
                    on_ports.append((("inter", side, n), topo.nics_per_node))
    worst = {link: 0.0 for link in LINKS}
    for ends in on_pairs:
        worst[ends[0]] = max(worst[ends[0]], pair[ends])
    for key, share in on_ports:
        worst[key[0]] = max(worst[key[0]], ports.load(key) / share)
    return worst, max(count.values(), default=0) / topo.nics_per_node


def _load_time(topo: Topology, loads: dict[str, float]) -> float:
    """The slowest link class's transfer: latency + busiest bytes / bandwidth."""
    return max((_path(topo.link(link)).time(b) for link, b in loads.items()), default=0.0)


def _tokenring_estimate(
    plan: RingPlan, topo: Topology, w: Workload, s: int, pair: dict[str, float], docs: dict[str, Any] | None,
    per_step: dict[str, int], totals: dict[str, dict[str, int]],
) -> Cost:
    """TokenRing's cost, the runtime's schedule step by step (W > 1): at ring step g every
    rank computes the queries it holds against its own K/V while those queries hop on (as
    one-way pass-KV's K/V; no hop after the last step), and sends the step's partial
    straight to its owner once computed (the owner posted its receive at the step's start;
    step 0's queries are the rank's own: no partial travels). A step lasts the longest of
    its compute, all its transfers on their busiest resource (_flow_loads), and its compute
    followed by its partials alone: on a switch a rank's port (and NIC) carries its Q hop
    and its partial together, on a mesh each goes over its own pair's link. Backward: the
    same with (q, dout, out, lse) travelling and dq partials.

    Hierarchical (an approximation): the inner ring's steps as above, with the partials
    bound for this node (those of outer step 0's blocks); the outer step's inter traffic,
    its Q hop and the partials of blocks from other nodes, summed over the outer step (one
    latency) and hidden behind its inner ring, as pass-KV's outer hop is, but not sent
    before the first of those partials is computed.
    Packed documents: each step's compute is its busiest rank's visible pairs between the
    visiting queries and its own keys (document_work's matrix, read the other way round).

    Equal nodes in node-contiguous order look alike (a shift by one node maps every flow of
    a step onto another): then only the flows touching node 0 are priced, O(W L) a phase;
    otherwise all of them, O(W^2)."""
    W, N, L = plan.world_size, plan.nodes, plan.inner_size
    kv = _kv_bytes(w.batch, s, w.kv_heads, w.head_dim, w.dtype_bytes)  # the K/V a step reads: its own, home
    order = plan.ring_order
    hierarchical = plan.algorithm == "hierarchical"
    mine = _node_zero_positions(plan)
    near = {order[p] for p in mine}
    hops = {
        ring: [(a, b) for a, b, _link, r in plan.edges() if r == ring and (a in near or b in near)]
        for ring in ("flat", "inner", "outer")
    }
    if docs is not None:
        from ringctl.documents import ring_sources

        matrix = _pairs_matrix(plan.layout, w.seq_len, W, w.cu_seqlens(), w.causal)
        sources = ring_sources(((N, L), (L, 1)) if hierarchical else ((W, 1),), W)  # [step][p]: whose queries p holds
        computes = _busy_computes(topo, w, [max(matrix[src][p] for p, src in enumerate(row)) for row in sources])
    else:
        computes = {phase: [step_compute(topo, pair[phase] * s * s, kv)] * W for phase in PHASES}
    times: dict[str, float] = {}
    worst: dict[str, dict[str, float]] = {}
    step = flows_per_nic = 0.0
    for phase in PHASES:
        moving, part = _tokenring_bytes(w.batch, s, w.heads, w.head_dim, w.dtype_bytes, phase)
        c = computes[phase]
        peak = {link: 0.0 for link in LINKS}

        def partials(g: int, part: int = part) -> list[tuple[int, int, int]]:
            """Step g's partials (sent once step g's block is computed) that leave or reach
            node 0's ranks."""
            holders = sorted({*mine, *(_tokenring_position(plan, q, g, +1) for q in mine)})
            return [
                (order[p], order[src], part) for p in holders if (src := _tokenring_position(plan, p, g, -1)) != p
            ]

        def loads(flows: list[tuple[int, int, int]], peak: dict[str, float] = peak) -> tuple[dict[str, float], float]:
            got, nic = _flow_loads(plan, topo, flows)
            for link in LINKS:
                peak[link] = max(peak[link], got[link])
            return got, nic

        total = 0.0
        for o in range(N if hierarchical else 1):
            outer = [(a, b, moving) for a, b in hops["outer"]] if hierarchical and o < N - 1 else []
            away: list[tuple[int, int, int]] = []  # partials bound for other nodes
            ring, size, first_away = 0.0, L if hierarchical else W, None
            for i in range(size):
                g = o * size + i
                inner = [(a, b, moving) for a, b in hops["inner" if hierarchical else "flat"]] if i < size - 1 else []
                back: list[tuple[int, int, int]] = []
                for flow in partials(g):
                    if hierarchical and plan.link_class(flow[0], flow[1]) == "inter":
                        away.append(flow)
                        first_away = ring + c[g] if first_away is None else first_away
                    else:
                        back.append(flow)
                got, nic = loads(inner + back)
                # the partials leave once the block is computed, the queries at the step's start
                took = max(c[g], _load_time(topo, got), c[g] + _load_time(topo, _flow_loads(plan, topo, back)[0]))
                ring += took
                if phase == "forward" and not hierarchical:
                    step, flows_per_nic = max(step, took), max(flows_per_nic, nic)
            got, nic = loads(outer + away)
            took = max(ring, _load_time(topo, got))
            if first_away is not None:  # the first partial away leaves after its block's compute
                took = max(took, first_away + _load_time(topo, _flow_loads(plan, topo, away)[0]))
            total += took
            if phase == "forward" and hierarchical:
                step, flows_per_nic = max(step, took / L), max(flows_per_nic, nic)
        times[phase] = total
        worst[phase] = peak
    need = {
        phase: {
            link: _min_block(pair[phase], worst[phase][link] / s, _path(topo.link(link)), L if hierarchical and link == "inter" else 1)
            if worst[phase][link] else 0
            for link in LINKS
        }
        for phase in PHASES
    }
    transfer = {link: _path(topo.link(link)).time(worst["forward"][link]) for link in LINKS}
    return Cost(
        block_tokens=s, compute_s={phase: step_compute(topo, pair[phase] * s * s, kv) for phase in PHASES},
        transfer_s=transfer, step_time_s=step, forward_s=times["forward"], backward_s=times["backward"],
        bytes_per_step=per_step, bytes_total=totals, min_block_tokens=need, inter_flows_per_nic=flows_per_nic,
        documents=docs,
    )


def _tokenring_position(plan: RingPlan, position: int, step: int, sign: int) -> int:
    """sign -1: whose queries `position` holds at ring `step` (Schedule.source's
    mixed-radix rule); +1: who holds `position`'s queries then."""
    if plan.algorithm == "flat":
        return (position + sign * step) % plan.world_size
    L, N = plan.inner_size, plan.nodes
    (n, l), (o, i) = divmod(position, L), divmod(step, L)
    return ((n + sign * o) % N) * L + (l + sign * i) % L


def _node_zero_positions(plan: RingPlan) -> range:
    """Node 0's ring positions when every node holds L consecutive ones (all nodes then
    carry the same traffic, shifted), else every position."""
    W, N = plan.world_size, plan.nodes
    L = W // N
    if W % N == 0 and all(plan.rank_to_node[r] == p // L for p, r in enumerate(plan.ring_order)):
        return range(L)
    return range(W)


def step_compute(topo: Topology, flop_seconds: float, kv_bytes: float = 0.0, lanes: int = 1) -> float:
    """One ring step's block compute, a roofline plus a fixed cost: the longer of its FLOPs'
    time and streaming the block's ``kv_bytes`` of K/V (``memory_bandwidth_GBps``, when the
    topology gives it: few queries over many keys, as in decode and pass-Q, are bound by
    it), plus the fixed per-step cost (kernel launches, the merge, Python:
    ``step_overhead_us``) once per lane (a bidirectional step computes a block of each).
    A step with nothing to compute is skipped, and costs nothing."""
    if flop_seconds <= 0:
        return 0.0
    stream = kv_bytes / (topo.memory_bandwidth_GBps * 1e9) if topo.memory_bandwidth_GBps else 0.0
    return max(flop_seconds, stream) + lanes * topo.step_overhead_us * 1e-6


def _busy_computes(topo: Topology, w: Workload, busiest_pairs: list[int], lanes: int = 1) -> dict[str, list[float]]:
    """Each ring step's compute per phase from its busiest rank's visible pairs (over a
    block of seq_len / W keys)."""
    per_pair = 4 * w.batch * w.heads * w.head_dim / (topo.compute_tflops * 1e12)
    kv = _kv_bytes(w.batch, w.seq_len // len(busiest_pairs), w.kv_heads, w.head_dim, w.dtype_bytes)
    ratio = {"forward": 1.0, "backward": BACKWARD_FLOP_RATIO}
    return {phase: [step_compute(topo, ratio[phase] * per_pair * n, kv, lanes) for n in busiest_pairs] for phase in PHASES}


def _ring_time(computes: list[float], moving: float, home: float) -> float:
    """One ring whose steps compute ``computes`` in turn, each hiding the next block's hop
    (``moving``), then the accumulator's hop ``home``; one step: its compute alone."""
    if len(computes) == 1:
        return computes[0]
    return sum(max(c, moving) for c in computes[:-1]) + computes[-1] + home


def document_work(plan: RingPlan, workload: Workload) -> dict[str, Any]:
    """What packed documents leave of the ring's work (torch-free, ringctl.documents): the
    query-key pairs each position's queries see, per rank and per ring step (a step lasts as
    long as its busiest rank's block), the imbalance (max / mean) under this layout and the
    others, and the `docs` layout's internal padding."""
    from ringctl.documents import imbalance, layout_padding, rank_pairs, ring_sources, step_pairs

    w, world = workload, plan.world_size
    cu = w.cu_seqlens()
    if plan.algorithm == "hierarchical":
        levels: tuple[tuple[int, int], ...] = ((plan.nodes, plan.inner_size), (plan.inner_size, 1))
    else:
        levels = ((world, 1),)
    matrix = _pairs_matrix(plan.layout, w.seq_len, world, cu, w.causal)
    steps = step_pairs(matrix, ring_sources(levels, world))
    per_rank = rank_pairs(matrix)
    others = {}
    for layout in LAYOUTS:
        if w.seq_len % seq_len_divisor(layout, world) == 0:
            others[layout] = imbalance(rank_pairs(_pairs_matrix(layout, w.seq_len, world, cu, w.causal)))
    pad = layout_padding(w.seq_len, world) if plan.layout == "docs" else 0
    return {
        "spec": w.documents.describe(),
        "seed": w.documents_seed,
        "count": len(cu) - 1 if cu else 0,
        "tokens": cu[-1] if cu else 0,
        "visible_pairs_per_rank": per_rank,
        "busiest_pairs_per_step": [max(row) for row in steps],
        "imbalance": imbalance(per_rank),
        "imbalance_by_layout": others,
        "layout_padding_tokens": pad,
        "layout_padding_fraction": pad / (w.seq_len + pad),
    }


@lru_cache(maxsize=32)
def _pairs_matrix(
    layout: str, seq_len: int, world: int, cu: tuple[int, ...] | None, causal: bool
) -> list[list[int]]:
    from ringctl.documents import visible_pairs

    return visible_pairs(layout, seq_len, world, cu_seqlens=cu, causal=causal)
