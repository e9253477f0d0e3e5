"""Ring attention: ``ring_attention`` and its autograd.Function with a hand-written backward.

Pass-KV (Liu et al., arXiv 2310.01889): each rank keeps its Q shard; K and V (only the Hkv
heads, packed into one contiguous tensor) travel the ring. Before a block is computed, the
hop that brings the next block is posted; it is waited for after the compute. Backward
sends K/V round again; each block's dK/dV accumulator travels with it, gaining one
contribution per rank, and takes one more hop home. Nothing remote is saved for backward.

``_Ring.run`` is the one loop. Masks (documents, causal, windows: ringctl.ring.mask) are a
function of global token positions, so layouts change only those positions and every block's
mask is its key ranges (``_Masks``); blocks where no query sees a key are skipped, and
causal is the case of one document without a window. Schedules (flat, hierarchical) change
only the levels the loop nests (see schedule.py). The loop runs once
per *pass*, a group of K/V heads with their query heads (ringctl.memory.head_passes):
heads are independent, so each pass holds only its heads' blocks in flight, accumulators
and kernel temporaries, and a rank's peak is its results plus 1/P of the ring's working
set (ringctl/memory.py predicts it, component by component).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.distributed as dist

from ringctl.documents import DOCS_LAYOUT, check_window
from ringctl.memory import head_passes

from .block import BlockMask, block_backward_into, block_forward_into, block_impl_for
from .comm import RingComm
from .layouts import LAYOUTS, check_layout, mask_positions
from .mask import MaskSpec, as_cu_seqlens
from .merge import acc_dtype
from .schedule import Schedule, make_schedule

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    layout: str = "zigzag",
    group: dist.ProcessGroup | None = None,
    plan: Any = None,
    cu_seqlens: torch.Tensor | Sequence[int] | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Attention of this rank's query shard over the whole ring's keys and values.

    q ``(B, S_local, Hq, D)``, k/v ``(B, S_local, Hkv, D)``, ``Hq % Hkv == 0``; every rank of
    ``group`` passes the shard of its ring position under ``layout`` (``shard_sequence``):
    its rank in ``group``, or ``plan.position(rank)`` when a RingPlan orders the ring.
    Returns ``(B, S_local, Hq, D)``: full-sequence attention restricted to this shard's rows.

    ``cu_seqlens`` (1-D int tensor or list ``[0, l1, l1+l2, ..., total]`` over the global
    sequence, the same on every rank, whatever the layout; batch rows share it): query i sees
    key j only in its own document; tokens from ``total`` on are padding: zero output, zero
    gradients. ``window_size=(left, right)``: also ``i - j <= left``, ``j - i <= right``
    (-1: unbounded), flash-attn's convention. Everything is checked before any communication.
    """
    _check_inputs(q, k, v, causal, layout)
    scale = _check_scale(softmax_scale, q.shape[-1])
    window = check_window(window_size, "window_size")
    world, rank = _group_size_rank(group)
    mask = MaskSpec(_check_documents(cu_seqlens, q, world, layout), causal, window)
    if plan is None:
        plan = _rank_order_plan(world, layout)
    else:
        _check_plan(plan, world, layout)
    if world > 1:
        _check_same_on_every_rank(q, k, mask, layout, group, world, plan)
    spec = _RingSpec(group, make_schedule(plan, rank), layout, mask, scale)
    return _RingAttention.apply(q, k, v, spec)


@cache
def _rank_order_plan(world: int, layout: str) -> Any:
    """No plan given: the rank-order ring on one node (every link "intra")."""
    from ringctl.plan import RingPlan

    return RingPlan.rank_order(world, layout)


@dataclass(frozen=True)
class _RingSpec:
    group: dist.ProcessGroup | None
    schedule: Schedule
    layout: str
    mask: MaskSpec
    scale: float

    def positions(self, position: int, local_len: int) -> torch.Tensor:
        """Global token positions of ``position``'s shard (CPU) as the mask sees them."""
        world = self.schedule.world_size
        return mask_positions(
            local_len, position, world, self.layout, cu_seqlens=self.mask.cu_seqlens
        )


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _RingSpec
    ) -> torch.Tensor:
        masks = _Masks(spec, q.shape[1])
        out, lse = _ring_forward(q, k, v, spec, masks)
        # backward reads out only through delta = rowsum(dout * out), as SDPA's own backward
        # does with its output: what is saved is the returned out, in q's dtype
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.masks = spec, masks
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.spec, ctx.masks)
        return dq, dk, dv, None


class _Masks:
    """Each block's mask for one call: this shard's rows against ring position ``src``'s
    keys, as the rows that see some key and their key ranges (MaskSpec.ranges over the
    shards' global positions). Built when first needed and kept for the backward, which
    computes the same blocks."""

    def __init__(self, spec: _RingSpec, local_len: int) -> None:
        self.spec, self.local_len = spec, local_len
        self._blocks: dict[int, tuple[slice, BlockMask] | None] = {}
        self._q_pos: torch.Tensor | None = None

    def block(self, src: int) -> tuple[slice, BlockMask | None] | None:
        """(rows to compute, their mask; None: every key) of the block from ``src``, or None
        when no query sees any of its keys (skip it)."""
        if self.spec.mask.is_full:
            return slice(0, self.local_len), None
        if src not in self._blocks:
            if self._q_pos is None:
                self._q_pos = self.spec.positions(self.spec.schedule.position, self.local_len)
            k_pos = self.spec.positions(src, self.local_len)
            lo, hi = self.spec.mask.ranges(self._q_pos, k_pos)
            seeing = (hi > lo).nonzero().flatten()
            entry = None
            if seeing.numel():
                first, last = int(seeing[0]), int(seeing[-1]) + 1
                entry = slice(first, last), BlockMask(lo[first:last], hi[first:last])
            self._blocks[src] = entry
        return self._blocks[src]


def _passes(q: torch.Tensor, k: torch.Tensor) -> list[tuple[slice, slice]]:
    """(query heads, K/V heads) of each pass of the ring (ringctl.memory.head_passes: heads
    are independent, so a pass holds only its heads' blocks, accumulators, temporaries)."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    n = head_passes(
        batch=b, shard_tokens=s, heads=hq, kv_heads=hkv, head_dim=d, block_impl=block_impl_for(q)
    )
    per, group = hkv // n, hq // hkv
    return [(slice(j * per * group, (j + 1) * per * group), slice(j * per, (j + 1) * per))
            for j in range(n)]  # fmt: skip


def _ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _RingSpec, masks: _Masks
) -> tuple[torch.Tensor, torch.Tensor]:
    """out in q's dtype and lse in the accumulation dtype, one pass per K/V head group.

    Each pass merges into a (0, -inf) start in the accumulation dtype (the first merge takes
    a block's result exactly): for float32/float64 that start is out's own heads, in place;
    for bf16/fp16 a float32 buffer of the pass's heads only, cast into out when the pass
    ends, so no float32 copy of the whole output ever exists."""
    acc = acc_dtype(q.dtype)
    b, s, hq, d = q.shape
    cast = q.dtype != acc
    out = (torch.empty if cast else torch.zeros)((b, s, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.full((b, hq, s), float("-inf"), dtype=acc, device=q.device)
    comm = RingComm(spec.group, spec.schedule.rank, "forward", spec.schedule.link_class)
    for qh, kh in _passes(q, k):
        nq = qh.stop - qh.start
        merged = q.new_zeros((b, s, nq, d), dtype=acc) if cast else out[:, :, qh]
        _forward_pass(comm, spec, masks, merged, lse[:, qh], q[:, :, qh], _pack(k, v, kh, spec))
        if cast:
            out[:, :, qh] = merged
        del merged  # not alive through the next pass
    return out, lse


def _forward_pass(
    comm: RingComm,
    spec: _RingSpec,
    masks: _Masks,
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    kv: Any,
) -> None:
    """One pass of the forward ring: merge every block of these heads into ``out``/``lse``."""

    def leaf(src: int, block: Sequence[torch.Tensor]) -> None:
        found = masks.block(src)
        if found is None:  # no query sees any key of this block
            return None
        r, mask = found  # rows outside r see nothing of this block
        block_forward_into(
            out[:, r], lse[:, :, r], q[:, r], block[0], block[1], scale=spec.scale, mask=mask
        )
        return None

    _Ring(comm, spec.schedule, leaf, grad=False).run(kv)


def _ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spec: _RingSpec,
    masks: _Masks,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv in q's dtype, one pass per K/V head group: dq of the pass's heads
    accumulates here, each block's dK/dV accumulator travels with it and lands, once home,
    in dk/dv. Accumulation is in the accumulation dtype; for bf16/fp16 only the pass's
    heads ever exist in float32."""
    acc = acc_dtype(q.dtype)
    b, s, _, d = q.shape
    cast = q.dtype != acc
    dq = (torch.empty if cast else torch.zeros)(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    comm = RingComm(spec.group, spec.schedule.rank, "backward", spec.schedule.link_class)
    for qh, kh in _passes(q, k):
        nq = qh.stop - qh.start
        dq_pass = q.new_zeros((b, s, nq, d), dtype=acc) if cast else dq[:, :, qh]
        home = _backward_pass(
            comm, spec, masks, dq_pass, dout[:, :, qh], q[:, :, qh], out[:, :, qh], lse[:, qh],
            _pack(k, v, kh, spec),
        )  # fmt: skip
        dk[:, :, kh] = home[0]
        dv[:, :, kh] = home[1]
        if cast:
            dq[:, :, qh] = dq_pass
        del home, dq_pass  # not alive through the next pass
    return dq, dk, dv


def _backward_pass(
    comm: RingComm,
    spec: _RingSpec,
    masks: _Masks,
    dq: torch.Tensor,
    dout: torch.Tensor,
    q: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv: Any,
) -> torch.Tensor:
    """One pass of the backward ring: dq of these heads accumulates into ``dq``; returns
    this rank's (2, B, S, h, D) dK/dV accumulator, home."""
    k = kv[0]
    # one block's dK/dV, reused every step: the accumulator it joins is still on its way
    # while the block computes (waiting for it first would serialise that hop)
    partial = k.new_empty((2, *k.shape), dtype=dq.dtype)

    def leaf(src: int, block: Sequence[torch.Tensor]) -> torch.Tensor | None:
        found = masks.block(src)
        if found is None:
            return None
        r, mask = found
        partial.zero_()
        block_backward_into(
            dq[:, r], partial[0], partial[1], dout[:, r], q[:, r], block[0], block[1],
            out[:, r], lse[:, :, r], scale=spec.scale, mask=mask,
        )  # fmt: skip
        return partial

    home = _Ring(comm, spec.schedule, leaf, grad=True).run(kv)
    if home is None:  # with grad set, run() always returns the home accumulator
        raise RuntimeError("ring backward produced no dK/dV")
    return home


def _pack(
    k: torch.Tensor, v: torch.Tensor, heads: slice, spec: _RingSpec
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``heads`` as the (2, B, S, h, D) block that travels: one contiguous copy
    per pass (a pass's heads are not contiguous in k and v), which is also the second of
    level 0's two K/V buffers (received into from step 1 on). A ring of one sends nothing
    and computes on views."""
    if spec.schedule.world_size == 1:
        return k[:, :, heads], v[:, :, heads]
    b, s, _, d = k.shape
    packed = k.new_empty((2, b, s, heads.stop - heads.start, d))
    packed[0] = k[:, :, heads]
    packed[1] = v[:, :, heads]
    return packed


# A leaf visit computes one block: (source position, its K/V as (K, V)) -> in backward the
# block's (2, ...) dK/dV, or None when it contributes nothing.
Leaf = Callable[[int, Sequence[torch.Tensor]], torch.Tensor | None]


class _Ring:
    """The ring loop, nested once per schedule level.

    At every step of a level: post the hop that brings the next block (tag 2*depth), visit
    the held block (the next level's whole ring, or a leaf compute), wait for the hop. With
    ``grad`` set (backward), each block's dK/dV accumulator follows it one hop behind (tag
    2*depth+1), sent after its visit and home after ``size`` hops; ``run`` returns it.
    Double buffering: each (level, channel) receives alternately into two buffers; the one
    written at step s was last sent at step s-1, whose hop has been waited for. Both pairs
    are seeded with what a level starts from, so nothing is allocated beside them: the
    caller's packed block is level 0's second K/V buffer (first received into at step 1),
    and a level's first accumulator (zeros, step 0) is its second accumulator buffer.
    Two buffers per channel are what overlap costs: the next block arrives while the held
    one computes, and the accumulator in flight to the next rank is not the one arriving.
    """

    def __init__(self, comm: RingComm, schedule: Schedule, leaf: Leaf, *, grad: bool) -> None:
        self.comm = comm
        self.schedule = schedule
        self.leaf = leaf
        self.grad = grad
        self._steps: list[int] = []
        self._buffers: dict[int, list[torch.Tensor | None]] = {}

    def _buffer(self, tag: int, step: int, block: Any, dtype: torch.dtype) -> torch.Tensor:
        """Buffer ``step % 2`` of channel ``tag``: shaped like the packed ``block`` (a
        (2, B, S, h, D) tensor, or a (K, V) pair), in ``dtype``."""
        pair = self._buffers.setdefault(tag, [None, None])
        buffer = pair[step % 2]
        if buffer is None:
            k = block[0]
            buffer = pair[step % 2] = k.new_empty((2, *k.shape), dtype=dtype)
        return buffer

    def run(self, kv: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
        if isinstance(kv, torch.Tensor):
            self._buffers[0] = [None, kv]
        return self._level(0, kv)

    def _level(self, depth: int, held: Any) -> torch.Tensor | None:
        level = self.schedule.levels[depth]
        acc_hop = None
        acc: torch.Tensor | None = None
        kv_tag, acc_tag = 2 * depth, 2 * depth + 1
        for step in range(level.size):
            kv_hop = None
            if step + 1 < level.size:
                into = self._buffer(kv_tag, step, held, held.dtype)
                kv_hop = self.comm.hop(held, level.send_to, level.recv_from, kv_tag, into)
            self._steps.append(step)
            grads = self._visit(depth, held)
            self._steps.pop()
            if self.grad:
                acc = acc_hop.wait() if acc_hop is not None else None  # type: ignore[assignment]
                if acc is None:  # the block's first contribution: zeros in the second buffer
                    acc = self._buffer(acc_tag, 1, held, acc_dtype(held[0].dtype)).zero_()
                if grads is not None:
                    acc.add_(grads)
                if level.size > 1:
                    into = self._buffer(acc_tag, step, acc, acc.dtype)
                    acc_hop = self.comm.hop(acc, level.send_to, level.recv_from, acc_tag, into)
            if kv_hop is not None:
                held = kv_hop.wait()
        return acc_hop.wait() if acc_hop is not None else acc  # type: ignore[return-value]

    def _visit(self, depth: int, held: Any) -> torch.Tensor | None:
        if depth + 1 < len(self.schedule.levels):
            return self._level(depth + 1, held)
        return self.leaf(self.schedule.source(self._steps), held)


# ---------------------------------------------------------------- input checks


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: object, layout: object
) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must have 4 dims (B, S_local, heads, D); got shape {tuple(x.shape)}"
            )
        if x.dtype not in DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype}; allowed: {', '.join(map(str, DTYPES))}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{name} has dtype {x.dtype} on {x.device} but q has {q.dtype} on {q.device}; "
                "q, k and v must share dtype and device"
            )
    if k.shape != v.shape:
        raise ValueError(f"k.shape={tuple(k.shape)} and v.shape={tuple(v.shape)} must be equal")
    b, s, hq, d = q.shape
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, s, d):
        raise ValueError(
            f"k.shape={tuple(k.shape)} must be (B={b}, S_local={s}, Hkv, D={d}) to match "
            f"q.shape={tuple(q.shape)}"
        )
    if min(b, s, hq, d, k.shape[2]) == 0:
        raise ValueError(f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)} have an empty dim")
    if hq % k.shape[2]:
        raise ValueError(
            f"q has Hq={hq} heads and k/v Hkv={k.shape[2]}; Hq must be a multiple of Hkv"
        )
    if not isinstance(causal, bool):
        raise ValueError(f"causal={causal!r} must be a bool")
    check_layout(layout)
    if layout == "zigzag" and s % 2:
        raise ValueError(
            f"q.shape[1]={s} (S_local) cannot be split by layout='zigzag': each shard holds "
            "two equal chunks, so S_local must be even; allowed layouts: "
            + ", ".join(LAYOUTS)
        )


def _check_scale(softmax_scale: object, head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise ValueError(f"softmax_scale={softmax_scale!r} must be a float or None")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(
            f"softmax_scale={softmax_scale!r} must be a finite number > 0 (or None for 1/sqrt(head_dim))"
        )
    return float(softmax_scale)


def _check_documents(
    cu_seqlens: object, q: torch.Tensor, world: int, layout: str
) -> tuple[int, ...] | None:
    """cu_seqlens as a tuple, checked against the global length: ``S_local * world``, or
    for ``docs`` (which pads internally) the most its shards can hold."""
    seq = q.shape[1] * world
    if layout != DOCS_LAYOUT:
        return as_cu_seqlens(cu_seqlens, seq, device=q.device)
    cu = as_cu_seqlens(cu_seqlens, None, device=q.device)
    if cu is not None and cu[-1] > seq:
        raise ValueError(
            f"cu_seqlens[-1]={cu[-1]} exceeds what layout='docs' shards of {q.shape[1]} rows "
            f"over {world} ranks hold: {seq} tokens; allowed: cu_seqlens[-1] <= {seq} (shard "
            "with shard_sequence(..., layout='docs', cu_seqlens=...) and pass the same "
            "cu_seqlens here)"
        )
    return cu


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None and not dist.is_initialized():
        return 1, 0  # one process, no process group: the ring of one
    return dist.get_world_size(group), dist.get_rank(group)


def _check_plan(plan: Any, world: int, layout: str) -> None:
    if plan.world_size != world:
        raise ValueError(
            f"plan.world_size={plan.world_size} but the group has {world} ranks; make the "
            "plan for this group"
        )
    if plan.layout != layout:
        raise ValueError(
            f"layout={layout!r} but plan.layout={plan.layout!r}; pass the plan's layout"
        )


# what every rank must agree on, and how many columns of the gathered table each takes
_FIELDS = (
    ("q.shape[0] (B)", 1),
    ("q.shape[1] (S_local)", 1),
    ("q.shape[2] (Hq)", 1),
    ("k.shape[2] (Hkv)", 1),
    ("q.shape[3] (D)", 1),
    ("dtype", 1),
    ("causal", 1),
    ("layout", 1),
    ("window_size", 2),
    ("cu_seqlens", 1),  # a fingerprint of the boundaries (MaskSpec.digest)
)


# input signatures whose rank consistency has been checked (most recent last)
_CHECKED: OrderedDict[tuple[Any, ...], None] = OrderedDict()
_CHECKED_MAX = 256


def _check_same_on_every_rank(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: MaskSpec,
    layout: str,
    group: dist.ProcessGroup | None,
    world: int,
    plan: Any = None,
) -> None:
    """One small all_gather: every rank must agree on shapes, dtype, layout and the mask
    (causal, window, documents: a fingerprint of the boundaries).

    Every rank sees the same gathered table, so all raise the same error and none hangs in
    a ring hop whose sizes do not match. It runs once per input signature (shapes, dtype,
    device, mask, layout, group, plan): on a GPU the gather is a host sync, once per
    layer and step if it ran on every call. Ranks that call with the same signatures in
    the same order (the only correct use) keep identical caches, so they skip together; a
    rank that changes its arguments on a later call of a signature the others repeat is
    not caught here (its peers' hops then fail or time out).
    """
    key = _signature(q, k, mask, layout, group, plan)
    if key is not None and key in _CHECKED:
        _CHECKED.move_to_end(key)
        return
    mine = [*q.shape, k.shape[2], DTYPES.index(q.dtype), int(mask.causal), LAYOUTS.index(layout)]
    mine[3], mine[4] = mine[4], mine[3]  # order as in _FIELDS: B, S, Hq, Hkv, D
    mine += [*mask.window, mask.digest()]
    device = q.device if q.is_cuda else torch.device("cpu")
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu()
    column = 0
    for field, width in _FIELDS:
        values: list[Any] = [tuple(row) for row in table[:, column : column + width].tolist()]
        column += width
        if len(set(values)) > 1:
            values = [row[0] if width == 1 else row for row in values]
            if field == "dtype":
                values = [str(DTYPES[i]) for i in values]
            elif field == "layout":
                values = [LAYOUTS[i] for i in values]
            elif field == "cu_seqlens":
                values = [f"fingerprint {i:#x}" if i else "None" for i in values]
            raise ValueError(
                f"{field} differs between ranks: {values} (by rank); every rank must pass a "
                "shard of the same sequence with the same arguments"
            )
    if key is not None:
        _CHECKED[key] = None
        while len(_CHECKED) > _CHECKED_MAX:
            _CHECKED.popitem(last=False)


def _signature(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: MaskSpec,
    layout: str,
    group: dist.ProcessGroup | None,
    plan: Any,
) -> tuple[Any, ...] | None:
    """What the rank check depends on, hashable; None (check every call) for an unhashable
    plan. The group is the object itself (None: the current default group), kept alive by
    the cache, so a new group never inherits a dead one's entry."""
    if group is None:
        group = dist.distributed_c10d._get_default_group()
    key = (tuple(q.shape), k.shape[2], q.dtype, q.device, mask, layout, group, plan)
    try:
        hash(key)
    except TypeError:
        return None
    return key
