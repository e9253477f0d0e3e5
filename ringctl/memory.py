"""Peak memory per rank of ring attention forward+backward, predicted without torch.

``predict_peak`` says, component by component, what one rank holds at the peak of one
``ring_attention`` forward and backward beyond what existed before the call (its inputs
q, k, v and dout are reported apart, in ``inputs``); ``max_seq_len`` inverts it: the
longest sequence whose peak, inputs included, fits a memory budget. The planner imports
this module (it stays torch-free); the runtime takes its pass count from ``head_passes``
here, so prediction and execution cannot drift apart.

What the runtime (ringctl/ring/attention.py) holds, and why:

- The ring runs once per *pass*: a group of K/V heads and their query heads. Heads are
  independent, so a pass keeps only its own heads' K/V blocks in flight, accumulators and
  kernel temporaries: 1/P of a shard's worth each (``head_passes``). What must span all
  heads is the result: out, lse and the gradients dq, dk, dv, in the input dtype.
- Per pass, double buffering (the price of hiding each hop behind a block's compute): the
  packed K/V block (also the first receive buffer) and one more; backward also two dK/dV
  accumulators (one travelling on, one arriving) in the accumulation dtype, and one
  block's dK/dV computed while its accumulator is still arriving. A hierarchical plan
  keeps such pairs per ring level.
- Accumulation is in float32 (float64 for float64): for bf16/fp16 inputs, the pass's
  merged output (forward) or dq (backward) in float32, and the tile inputs cast to float32
  one head chunk at a time (the ``torch`` block path: ATen's CPU flash kernel).
- The block kernels' own temporaries: the torch path computes a tile one head chunk at a
  time (about 1/8 of a pass's query heads), the Triton path a whole pass at once.
- ``direction`` (the plan's): bidirectional splits the K/V heads in two lanes, each with
  its own buffers, and makes at most ``floor(Hkv/2)`` passes (lane 1's heads), so a pass
  may hold more heads than one-way's. TokenRing keeps K/V home: per pass a copy of its
  query heads travels (backward: q, dout, out, lse; dout assumed contiguous, as autograd
  gives it), with one more such block per hop level; partials go back to their owner (two
  computed, two received, one on two ranks: forward out and lse as one ``(B, S, h, D+1)``
  tensor, backward dq), and the pass's out or dq, dk, dv accumulate in the accumulation dtype whatever the
  input dtype; no dK/dV travels. With few K/V heads (GQA) that is several times pass-KV's
  working set.

Counts are allocations (CUDA's ``max_memory_allocated`` sees them all); on CPU a buffer's
pages count in RSS only once written, so the gradients filled pass by pass read up to 1/P
lower there. bench/memory.py prints this prediction beside the measured peaks.

``check_plan_memory`` prices a RingPlan and its Workload against the topology's
``memory_per_rank_GB``: ``ringctl plan`` shows it, ``ringctl launch`` refuses a job that does
not fit (``memory_refusal``) before anything is submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ringctl.errors import ConfigError, check_positive_int
from ringctl.plan import ALGORITHMS, DIRECTIONS, DTYPE_BYTES, LAYOUTS, MAX_SEQ_LEN, check_seq_len, lane_kv_heads, seq_len_divisor

#: block implementations: ATen's CPU flash kernel (ringctl/ring/block.py), or the Triton
#: kernels (CUDA)
BLOCK_IMPLS = ("torch", "triton")

# The ring makes at most MAX_PASSES passes over the K/V heads. Each pass pays a hop's fixed
# costs once more per step (about a millisecond on gloo over TCP with a CPU block kernel,
# tens of microseconds on NCCL), so a pass must keep enough block compute to hide them: at
# least MIN_PASS_WORK multiply-adds of one block's q.k^T (batch * shard_tokens^2 * query
# heads of the pass * head_dim), by block implementation.
MAX_PASSES = 8
MIN_PASS_WORK = {"torch": 1 << 28, "triton": 1 << 37}
# The torch block path computes a tile in about this many pieces along the query heads, and,
# where it casts its inputs (bf16/fp16), in pieces of at most MAX_TILE_ROWS query rows by
# MAX_TILE_ROWS keys.
HEAD_CHUNKS = 8
MAX_TILE_ROWS = 1024
# ATen's CPU flash kernels: keys per inner tile (scratch per thread).
_KV_SPLIT = 512


def head_passes(
    *,
    batch: int,
    shard_tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_impl: str = "torch",
) -> int:
    """How many passes the ring makes: the largest P <= MAX_PASSES dividing ``kv_heads``
    whose per-pass block work ``batch * shard_tokens**2 * (heads / P) * head_dim`` keeps
    MIN_PASS_WORK[block_impl]; 1 when none does."""
    work = batch * shard_tokens * shard_tokens * heads * head_dim
    fits = [
        p for p in range(1, MAX_PASSES + 1)
        if kv_heads % p == 0 and work // p >= MIN_PASS_WORK[block_impl]
    ]  # fmt: skip
    return max(fits, default=1)


def head_chunk(heads: int, kv_heads: int) -> tuple[int, int]:
    """(query heads, kv heads) of one head chunk of the torch block path: about
    ``heads / HEAD_CHUNKS`` query heads, as whole kv head groups when a group is smaller
    than that, else an equal part of one group (one kv head, broadcast)."""
    group = heads // kv_heads
    want = max(1, heads // HEAD_CHUNKS)
    if want >= group:
        per = max(1, want // group)
        return per * group, per
    return max(d for d in range(1, want + 1) if group % d == 0), 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes per rank. ``forward`` and ``backward`` map component -> bytes alive
    at that phase's peak; ``breakdown`` is the larger of the two (the call's peak), and
    ``total`` its sum; ``inputs`` (q, k, v, dout shards) exist before the call.
    ``buffers``: per phase, the buffers of each ``_Ring`` channel (0 the travelling block,
    1 its accumulator, 2 owner partials received) a pass holds at its peak, all lanes."""

    forward: dict[str, int]
    backward: dict[str, int]
    inputs: int
    passes: int
    shard_tokens: int
    kv_buffers: int  # K/V blocks a pass holds at its peak (per ring level pairs; 0: TokenRing)
    acc_buffers: int  # dK/dV accumulators a pass holds at its peak
    direction: str = "one_way"
    buffers: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def peak_phase(self) -> str:
        return "backward" if sum(self.backward.values()) >= sum(self.forward.values()) else "forward"

    @property
    def breakdown(self) -> dict[str, int]:
        return self.backward if self.peak_phase == "backward" else self.forward

    @property
    def total(self) -> int:
        """Peak bytes the call adds (what bench/memory.py measures)."""
        return sum(self.breakdown.values())

    @property
    def with_inputs(self) -> int:
        """Peak bytes including the rank's input shards: what must fit in memory."""
        return self.total + self.inputs

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: totals, the peak's breakdown, both phases, passes and buffer counts."""
        return {
            "peak_bytes": self.total, "peak_bytes_with_inputs": self.with_inputs,
            "peak_phase": self.peak_phase, "breakdown": dict(self.breakdown),
            "forward": dict(self.forward), "backward": dict(self.backward),
            "inputs_bytes": self.inputs, "passes": self.passes, "shard_tokens": self.shard_tokens,
            "kv_buffers": self.kv_buffers, "acc_buffers": self.acc_buffers,
            "direction": self.direction,
            "buffers": {phase: list(counts) for phase, counts in self.buffers.items()},
        }  # fmt: skip


def _check(
    batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int, dtype: str,
    world_size: int, layout: str, algorithm: str, nodes: int, block_impl: str,
    direction: str = "one_way",
) -> int:  # fmt: skip
    """Tokens per shard; ValueError (ConfigError) naming the argument otherwise."""
    for name, value in (
        ("batch", batch), ("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim),
        ("world_size", world_size), ("nodes", nodes),
    ):  # fmt: skip
        check_positive_int(name, value)
    if heads % kv_heads:
        raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
    for name, choice, allowed in (
        ("dtype", dtype, tuple(DTYPE_BYTES)), ("layout", layout, LAYOUTS),
        ("algorithm", algorithm, ALGORITHMS), ("block_impl", block_impl, BLOCK_IMPLS),
        ("direction", direction, DIRECTIONS),
    ):  # fmt: skip
        if choice not in allowed:
            raise ValueError(f"{name}={choice!r}; allowed: {', '.join(allowed)}")
    if direction == "bidirectional" and world_size > 1:
        lane_kv_heads(kv_heads, direction)  # ValueError naming kv_heads for one K/V head
    if algorithm == "hierarchical" and world_size % nodes:
        raise ValueError(
            f"nodes={nodes} does not divide world_size={world_size}: a hierarchical ring "
            "needs the same number of ranks on every node"
        )
    return check_seq_len(seq_len, layout, world_size, key="seq_len")


def _levels(algorithm: str, world_size: int, nodes: int) -> list[int]:
    """Ring level sizes, outermost first (as ringctl.ring.schedule)."""
    if algorithm == "flat":
        return [world_size]
    return [nodes, world_size // nodes]


def _buffer_counts(levels: list[int]) -> tuple[int, int]:
    """(K/V blocks, dK/dV accumulators) a pass holds at its peak, per ring level pairs.

    Level 0's K/V pair is seeded with the packed block (so one more buffer once it hops);
    an inner level starts from the outer level's block and allocates its own pair as its
    hops need them. Each level's first accumulator is its pair's second buffer; the pair's
    first is allocated once the level hops."""
    if all(size == 1 for size in levels):
        return 0, len(levels)  # a ring of one computes on views; one zeroed accumulator
    kv = 1 + (1 if levels[0] >= 2 else 0)
    for size in levels[1:]:
        kv += (1 if size >= 2 else 0) + (1 if size >= 3 else 0)
    acc = sum(1 + (1 if size >= 2 else 0) for size in levels)
    return kv, acc


def predict_peak(
    *,
    batch: int,
    seq_len: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    world_size: int,
    layout: str = "zigzag",
    causal: bool = True,
    algorithm: str = "flat",
    nodes: int = 1,
    block_impl: str = "torch",
    cpu_threads: int = 1,
    direction: str = "one_way",
) -> MemoryEstimate:
    """Peak bytes per rank of one ring_attention forward+backward (see the module doc).

    Shapes are global (``seq_len`` is the whole sequence, ``heads`` the query heads);
    ``algorithm``/``nodes``/``direction`` as in the RingPlan (hierarchical: ``nodes`` rings
    of ``world_size / nodes``; direction: what travels, ringctl.plan.DIRECTIONS); a shard
    holds ``ceil(seq_len / world_size)`` tokens (``docs`` pads, the others divide).
    ``block_impl``: "triton" for the CUDA kernels, "torch" for the CPU path (ATen's flash
    kernel with ``cpu_threads`` threads). ``causal`` and ``layout`` change which blocks are
    computed, not the peak: every layout's own block has all rows.
    """
    s = _check(batch, seq_len, heads, kv_heads, head_dim, dtype, world_size, layout, algorithm,
               nodes, block_impl, direction)  # fmt: skip
    e = DTYPE_BYTES[dtype]
    a = 8 if dtype == "float64" else 4
    bsd = batch * s * head_dim  # elements of one head of one shard
    passes = head_passes(
        batch=batch, shard_tokens=s, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        block_impl=block_impl,
    )
    levels = _levels(algorithm, world_size, nodes)
    out = bsd * heads * e
    lse = batch * heads * s * a
    ring = _PassRing(batch, s, head_dim, e, a, block_impl, cpu_threads, levels, world_size)
    if direction == "tokenring" and world_size > 1:  # a ring of one runs pass-KV's loop
        hq, hk = heads // passes, kv_heads // passes
        per_pass = [ring.tokenring(hq, hk, copies=passes > 1)]
    else:
        passes, shapes = _pass_lanes(heads, kv_heads, passes, direction, world_size)
        per_pass = [ring.pass_kv(lanes) for lanes in shapes]
    fwd, bwd, buffers, n_kv, n_acc = (
        max((p[0] for p in per_pass), key=lambda d: sum(d.values())),
        max((p[1] for p in per_pass), key=lambda d: sum(d.values())),
        per_pass[0][2], per_pass[0][3], per_pass[0][4],
    )  # fmt: skip
    forward = {"out": out, "lse": lse, **fwd}
    backward = {"out, lse (saved)": out + lse, "dq, dk, dv": out + 2 * bsd * kv_heads * e, **bwd}
    inputs = bsd * (2 * heads + 2 * kv_heads) * e
    return MemoryEstimate(forward, backward, inputs, passes, s, n_kv, n_acc, direction, buffers)


def _pass_lanes(
    heads: int, kv_heads: int, passes: int, direction: str, world_size: int
) -> tuple[int, list[tuple[tuple[int, int], ...]]]:
    """(passes, each distinct pass as its lanes' (query heads, K/V heads)) of pass-KV, as
    ringctl.ring.attention._passes splits them: one lane of ``1/passes`` of the heads; or,
    bidirectional, two lanes (``lane_kv_heads``) and at most as many passes as lane 1 has
    heads, each taking a near-equal contiguous share of both."""
    group = heads // kv_heads
    if direction != "bidirectional" or world_size == 1:
        return passes, [((heads // passes, kv_heads // passes),)]
    sizes = lane_kv_heads(kv_heads, direction)
    n = max(1, min(passes, sizes[1]))
    shapes = {
        tuple((group * (h * (j + 1) // n - h * j // n), h * (j + 1) // n - h * j // n) for h in sizes)
        for j in range(n)
    }  # fmt: skip
    return n, sorted(shapes)


@dataclass(frozen=True)
class _PassRing:
    """What one pass of the ring holds beside the call's results, by direction: per phase
    (forward, backward) component -> bytes, the buffers per ``_Ring`` channel, and the K/V
    and dK/dV buffer counts of ``MemoryEstimate``."""

    batch: int
    s: int
    head_dim: int
    e: int  # input element bytes
    a: int  # accumulation element bytes
    block_impl: str
    threads: int
    levels: list[int]
    world_size: int

    def temporaries(self, hq: int, hk: int) -> tuple[int, int]:
        bsd = self.batch * self.s * self.head_dim
        return _block_temporaries(
            bsd, hq, hk, self.a, self.e != self.a, self.block_impl, self.s, self.threads, self.batch
        )

    def pass_kv(self, lanes: tuple[tuple[int, int], ...]) -> tuple[Any, ...]:
        """K/V travel (each lane its own heads' buffers); dK/dV accumulators follow them; the
        lanes' blocks compute one after the other (temporaries of one lane at a time)."""
        bsd, e, a, cast = self.batch * self.s * self.head_dim, self.e, self.a, self.e != self.a
        hq, hk = sum(q for q, _ in lanes), sum(k for _, k in lanes)
        n_kv, n_acc = _buffer_counts(self.levels)
        temps = [self.temporaries(q, k) for q, k in lanes]
        kv_block, acc_block, pass_q = 2 * bsd * hk * e, 2 * bsd * hk * a, bsd * hq * a
        forward = {
            "merge buffer (pass, float32)": pass_q if cast else 0,
            "K/V blocks in flight (pass)": n_kv * kv_block,
            "block temporaries": max(t[0] for t in temps),
        }
        backward = {
            "dq accumulator (pass, float32)": pass_q if cast else 0,
            "K/V blocks in flight (pass)": n_kv * kv_block,
            "dK/dV accumulators (pass)": n_acc * acc_block,
            "one block's dK/dV (pass)": acc_block,
            "block temporaries": max(t[1] for t in temps),
        }
        n = len(lanes)
        buffers = {"forward": (n * n_kv, 0, 0), "backward": (n * n_kv, n * n_acc, 0)}
        return forward, backward, buffers, n * n_kv, n * n_acc

    def tokenring(self, hq: int, hk: int, *, copies: bool) -> tuple[Any, ...]:
        """TokenRing: the pass's queries travel (forward: a copy of q's heads, which is level
        0's second buffer; backward: q, dout, out and lse of the heads, copied where their
        slices are not contiguous, i.e. with several passes, and not seeded as a buffer);
        K/V stay home and no accumulator travels. Partials (forward: out and lse as one
        (B, S, h, D+1) tensor; backward: dq) go back to their owner: two computed (one may
        be in flight) and two receive buffers (one on two ranks): a step posts the receive
        of its partial at its start, while the previous step's may still be arriving. The
        pass's out (forward) or dq, dk, dv (backward) accumulate in the accumulation dtype
        whatever the input dtype. Receive buffers are allocated at a step's start, before
        its compute, so a block's temporaries count beside them."""
        b, s, d, e, a = self.batch, self.s, self.head_dim, self.e, self.a
        bsd = b * s * d
        n_fwd = _buffer_counts(self.levels)[0]
        n_bwd = sum((1 if size >= 2 else 0) + (1 if size >= 3 else 0) for size in self.levels)
        q_side = 3 * bsd * hq * e + b * hq * s * a  # q, dout, out, lse of the pass's heads
        copied = (3 * bsd * hq * e if b * s > 1 else 0) + (b * hq * s * a if b > 1 else 0)
        fwd_temps, bwd_temps = self.temporaries(hq, hk)
        received = min(2, self.world_size - 1)
        forward = {
            "merge buffer (pass, accumulation dtype)": bsd * hq * a,
            "queries in flight (pass)": n_fwd * bsd * hq * e,
            f"out/lse partials (pass: 2 computed, {received} received)": (2 + received) * b * s * hq * (d + 1) * a,
            "block temporaries": fwd_temps,
        }
        backward = {
            "dq, dk, dv accumulators (pass, accumulation dtype)": bsd * (hq + 2 * hk) * a,
            "q, dout, out, lse copies (pass)": copied if copies else 0,
            "q, dout, out, lse in flight (pass)": n_bwd * q_side,
            f"dq partials (pass: 2 computed, {received} received)": (2 + received) * bsd * hq * a,
            "block temporaries": bwd_temps,
        }
        buffers = {"forward": (n_fwd, 0, received), "backward": (n_bwd, 0, received)}
        return forward, backward, buffers, 0, 0


def _block_temporaries(
    bsd: int, hq: int, hk: int, a: int, cast: bool, block_impl: str, s: int, threads: int,
    batch: int,
) -> tuple[int, int]:  # fmt: skip
    """Bytes alive inside one block call at its largest (all rows, all keys of a shard).

    torch path, per tile (of at most MAX_TILE_ROWS rows by MAX_TILE_ROWS keys when casting,
    else whole) and head chunk of nq query / nk kv heads (one at a time): the tile's inputs
    cast to the accumulation dtype (q, and dout, out in backward: only when casting; its
    keys' k, v: cast, or copied when several kv heads expand), the kernel's outputs (out;
    dq, dk, dv over the expanded heads, and the kv heads' sums), ATen's own copy of one
    query-side operand in backward and its per-thread scratch. Triton path: the kernel's
    outputs for the whole pass (dq, dk, dv and delta's float32 operands in backward)."""
    if block_impl == "triton":
        fwd = bsd * hq * a + batch * hq * s * a
        bwd = bsd * hq * a + 2 * bsd * hk * a + (2 if cast else 1) * bsd * hq * 4
        return fwd, bwd
    nq, nk = head_chunk(hq, hk)
    head_dim = bsd // (batch * s)
    rows = min(s, MAX_TILE_ROWS) if cast else s  # row and key pieces only where casting
    q_side = batch * rows * nq * head_dim * a  # one tile's query side, accumulation dtype
    bkd = batch * rows * head_dim  # one head of one tile's keys
    k_conv = bkd * nk * a if cast else 0
    k_expand = bkd * nq * a if (nk > 1 and nq != nk) else 0
    kv_inputs = 2 * (k_conv + k_expand)
    q_split = 256 if rows >= 768 else 64 if rows >= 192 else 32
    kv_split = min(_KV_SPLIT, rows)
    scratch_fwd = threads * (q_split * kv_split + 2 * q_split + q_split * head_dim) * a
    scratch_bwd = threads * 2 * q_split * kv_split * a
    fwd = (q_side if cast else 0) + kv_inputs + q_side + scratch_fwd
    head_sum = bkd * nk * a if nq != nk else 0
    bwd = (
        (3 * q_side if cast else 0) + kv_inputs  # inputs cast / expanded
        + q_side + 2 * bkd * nq * a + head_sum  # dq, dk, dv of the tile
        + q_side + scratch_bwd  # ATen's copy of an operand, and scratch
    )  # fmt: skip
    return fwd, bwd


def max_seq_len(
    memory_bytes: int,
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str,
    world_size: int,
    layout: str = "zigzag",
    causal: bool = True,
    algorithm: str = "flat",
    nodes: int = 1,
    block_impl: str = "torch",
    cpu_threads: int = 1,
    include_inputs: bool = True,
    direction: str = "one_way",
) -> int:
    """The longest global ``seq_len`` (a multiple of ``seq_len_divisor``) whose predicted peak
    per rank (with the input shards, unless ``include_inputs=False``) fits ``memory_bytes``;
    0 when not even the shortest does.

    The peak grows linearly in seq_len except where a longer shard affords more head passes
    (``head_passes``), where it drops; past the last such step it only grows, so the search
    is a bisection there and a scan of the few shorter lengths otherwise."""
    if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 0:
        raise ValueError(f"memory_bytes={memory_bytes!r} must be an int >= 0")
    divisor = seq_len_divisor(layout, world_size)
    if block_impl not in BLOCK_IMPLS:
        raise ValueError(f"block_impl={block_impl!r}; allowed: {', '.join(BLOCK_IMPLS)}")

    def fits(seq_len: int) -> bool:
        est = predict_peak(
            batch=batch, seq_len=seq_len, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            dtype=dtype, world_size=world_size, layout=layout, causal=causal,
            algorithm=algorithm, nodes=nodes, block_impl=block_impl, cpu_threads=cpu_threads,
            direction=direction,
        )  # fmt: skip
        return (est.with_inputs if include_inputs else est.total) <= memory_bytes

    # shortest length with the most passes it will ever get: the peak only grows past it
    most = max(p for p in range(1, MAX_PASSES + 1) if kv_heads % p == 0)
    need = MIN_PASS_WORK[block_impl] * most / (batch * heads * head_dim)  # shard_tokens ** 2
    shard = int(need**0.5) + 1
    tail = max(divisor, -(-shard * world_size // divisor) * divisor)
    if fits(tail):
        low, high = tail, 2 * tail
        while fits(high):
            low, high = high, 2 * high
        while high - low > divisor:  # fits(low), not fits(high)
            mid = (low + high) // 2 // divisor * divisor
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low
    for seq_len in range(tail - divisor, 0, -divisor):
        if fits(seq_len):
            return seq_len
    return 0


@dataclass(frozen=True)
class MemoryCheck:
    """A plan's predicted peak per rank against the topology's memory per rank: what
    ``ringctl plan`` shows and ``ringctl launch`` refuses on. ``limit_bytes`` None: the
    topology does not say (nothing to check; ``max_seq_len`` None too)."""

    estimate: MemoryEstimate
    limit_bytes: int | None
    max_seq_len: int | None
    block_impl: str
    cpu_threads: int

    @property
    def fits(self) -> bool:
        """The peak with the input shards fits the limit (True when the limit is unknown)."""
        return self.limit_bytes is None or self.estimate.with_inputs <= self.limit_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the estimate (``predict_peak``'s), the limit, whether it fits and the
        longest sequence that would (``max_seq_len``), with what the prediction assumed."""
        return {
            **self.estimate.to_dict(),
            "memory_per_rank_bytes": self.limit_bytes,
            "fits": self.fits,
            "max_seq_len": self.max_seq_len,
            "block_impl": self.block_impl,
            "cpu_threads": self.cpu_threads,
        }


def check_plan_memory(
    plan: Any, workload: Any, limit_bytes: int | None, *, block_impl: str = "torch", cpu_threads: int = 1
) -> MemoryCheck:
    """``predict_peak`` and ``max_seq_len`` for a RingPlan (its world size, layout, ring
    algorithm, nodes and direction) and a planner Workload (its global shapes and dtype) against
    ``limit_bytes`` per rank. ``block_impl``: "triton" for GPU ranks, "torch" for CPU ranks."""
    shapes = {
        "batch": workload.batch, "heads": workload.heads, "kv_heads": workload.kv_heads,
        "head_dim": workload.head_dim, "dtype": workload.dtype, "world_size": plan.world_size,
        "layout": plan.layout, "causal": workload.causal, "algorithm": plan.algorithm,
        "nodes": plan.nodes, "block_impl": block_impl, "cpu_threads": cpu_threads,
        "direction": getattr(plan, "direction", "one_way"),
    }  # fmt: skip
    est = predict_peak(seq_len=workload.seq_len, **shapes)
    longest = None
    if limit_bytes is not None:  # never past what the planner accepts (workload.seq_len <= 2**31)
        divisor = seq_len_divisor(plan.layout, plan.world_size)
        longest = min(max_seq_len(limit_bytes, **shapes), MAX_SEQ_LEN // divisor * divisor)
    return MemoryCheck(est, limit_bytes, longest, block_impl, cpu_threads)


def memory_refusal(check: MemoryCheck, seq_len: int, limit_key: str = "topology.memory_per_rank_GB") -> ConfigError | None:
    """The error for a job that cannot fit (None when it fits): one line naming the keys that
    drive the peak, the predicted bytes, the limit and the longest seq_len that fits."""
    if check.fits or check.limit_bytes is None:
        return None
    est, limit = check.estimate, check.limit_bytes
    allowed = (
        f"at most {check.max_seq_len} here" if check.max_seq_len else "none here: not even the shortest sequence fits"
    )  # fmt: skip
    return ConfigError(
        "workload.seq_len", seq_len,
        f"{allowed} (the longest whose predicted peak per rank fits {limit_key}={limit / 1e9:g})",
        f"predicted peak per rank {est.with_inputs:,} bytes = {est.total:,} for one ring_attention fwd+bwd + "
        f"{est.inputs:,} of input shards ({est.passes} head pass(es), {check.block_impl} blocks, direction {est.direction}) > {limit:,} bytes; "
        "it grows with workload.seq_len, workload.batch, workload.heads, workload.kv_heads, workload.head_dim and "
        "workload.dtype, and shrinks with more ranks (topology.nodes x topology.ranks_per_node)",
    )
