"""Ring attention: ``ring_attention`` and its autograd.Function with a hand-written backward.

Pass-KV (Liu et al., arXiv 2310.01889): each rank keeps its Q shard; K and V (only the Hkv
heads, packed into one contiguous tensor) travel the ring. Before a block is computed, the
hop that brings the next block is posted; it is waited for after the compute. Backward
sends K/V round again; each block's dK/dV accumulator travels with it, gaining one
contribution per rank, and takes one more hop home. Nothing remote is saved for backward.

``_Ring.run`` is the one loop. Layouts change only token positions (masks); schedules
(flat, hierarchical) change only the levels it nests (see schedule.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.distributed as dist

from .block import block_backward, block_forward
from .comm import RingComm
from .layouts import LAYOUTS, check_layout, token_positions
from .merge import acc_dtype, merge_block
from .schedule import Schedule, make_schedule

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# A leaf visit computes one block: (source position, packed kv) -> dK/dV pair or None.
Leaf = Callable[[int, torch.Tensor], Sequence[torch.Tensor] | None]


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
) -> torch.Tensor:
    """Attention of this rank's query shard over the whole ring's keys and values.

    q ``(B, S_local, Hq, D)``, k/v ``(B, S_local, Hkv, D)``, ``Hq % Hkv == 0``; every rank of
    ``group`` passes the shard of its ring position under ``layout`` (``shard_sequence``):
    its rank in ``group``, or ``plan.position(rank)`` when a RingPlan orders the ring.
    Returns ``(B, S_local, Hq, D)``: full-sequence attention restricted to this shard's rows.
    """
    _check_inputs(q, k, v, causal, layout)
    scale = _check_scale(softmax_scale, q.shape[-1])
    world, rank = _group_size_rank(group)
    if plan is None:
        plan = _rank_order_plan(world, layout)
    else:
        _check_plan(plan, world, layout)
    if world > 1:
        _check_same_on_every_rank(q, k, causal, layout, group, world)
    spec = _RingSpec(group, make_schedule(plan, rank), layout, causal, scale)
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
    causal: bool
    scale: float

    def positions(self, position: int, local_len: int) -> torch.Tensor | None:
        """Global token indices of ``position``'s shard (CPU), or None when not causal."""
        if not self.causal:
            return None
        world = self.schedule.world_size
        return token_positions(local_len * world, position, world, self.layout)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _RingSpec
    ) -> torch.Tensor:
        out, lse = _ring_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec = spec
        return out.to(q.dtype)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dout: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, ctx.spec)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _RingSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    s = q.shape[1]
    q_pos = spec.positions(spec.schedule.position, s)
    q_pos_dev = _on(q_pos, q)  # constant over the ring: moved to q's device once
    merged: list[torch.Tensor] = []  # [out, lse] once the first block is in

    def leaf(src: int, kv: torch.Tensor) -> None:
        k_pos = spec.positions(src, s)
        if _hidden(q_pos, k_pos):
            return None
        block_out, block_lse = block_forward(
            q, kv[0], kv[1], scale=spec.scale, q_pos=q_pos_dev, k_pos=_on(k_pos, q)
        )
        if not merged:  # the first block (this rank's own) is the running result as is
            merged.extend((block_out, block_lse))
            return None
        out, lse = merged
        rows = _first_seeing_row(q_pos, k_pos)  # rows above it got nothing from this block
        merge_block(out[:, rows:], lse[:, :, rows:], block_out[:, rows:], block_lse[:, :, rows:])
        return None

    comm = RingComm(spec.group, spec.schedule.rank, "forward", spec.schedule.link_class)
    _Ring(comm, spec.schedule, leaf, grad_shape=None).run(torch.stack((k, v)))
    if not merged:  # cannot happen: position p's own block holds the diagonal
        raise RuntimeError("ring forward computed no block")
    return merged[0], merged[1]


def _ring_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spec: _RingSpec,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = acc_dtype(q.dtype)
    s = q.shape[1]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    q_pos = spec.positions(spec.schedule.position, s)
    q_pos_dev = _on(q_pos, q)

    def leaf(src: int, kv: torch.Tensor) -> Sequence[torch.Tensor] | None:
        k_pos = spec.positions(src, s)
        if _hidden(q_pos, k_pos):
            return None
        dq_b, dk_b, dv_b = block_backward(
            dout, q, kv[0], kv[1], out, lse,
            scale=spec.scale, q_pos=q_pos_dev, k_pos=_on(k_pos, q),
        )  # fmt: skip
        dq.add_(dq_b)
        return dk_b, dv_b

    comm = RingComm(spec.group, spec.schedule.rank, "backward", spec.schedule.link_class)
    ring = _Ring(comm, spec.schedule, leaf, grad_shape=(2, *k.shape))
    dkv = ring.run(torch.stack((k, v)))
    if dkv is None:  # with grad_shape set, run() always returns the home accumulator
        raise RuntimeError("ring backward produced no dK/dV")
    return dq, dkv[0], dkv[1]


def _hidden(q_pos: torch.Tensor | None, k_pos: torch.Tensor | None) -> bool:
    """True when no query of the shard sees any key of the block (skip it entirely)."""
    return q_pos is not None and k_pos is not None and bool(k_pos[0] > q_pos[-1])


def _first_seeing_row(q_pos: torch.Tensor | None, k_pos: torch.Tensor | None) -> int:
    """First query row that sees some key of the block (positions ascend within a shard)."""
    if q_pos is None or k_pos is None:
        return 0
    return int(torch.searchsorted(q_pos, k_pos[:1]))


def _on(pos: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if pos is None else pos.to(like.device)


class _Ring:
    """The ring loop, nested once per schedule level.

    At every step of a level: post the hop that brings the next block (tag 2*depth), visit
    the held block (the next level's whole ring, or a leaf compute), wait for the hop. With
    ``grad_shape`` set (backward), each block's dK/dV accumulator follows it one hop behind
    (tag 2*depth+1), sent after its visit and home after ``size`` hops; ``run`` returns it.
    Double buffering: each (level, channel) receives alternately into two buffers; the one
    written at step s was last sent at step s-1, whose hop has been waited for.
    """

    def __init__(
        self,
        comm: RingComm,
        schedule: Schedule,
        leaf: Leaf,
        grad_shape: tuple[int, ...] | None,
    ) -> None:
        self.comm = comm
        self.schedule = schedule
        self.leaf = leaf
        self.grad_shape = grad_shape
        self._steps: list[int] = []
        self._buffers: dict[int, list[torch.Tensor]] = {}

    def _buffer(self, tag: int, step: int, like: torch.Tensor) -> torch.Tensor:
        pair = self._buffers.setdefault(tag, [])
        if len(pair) < 2:
            pair.append(torch.empty_like(like))
        return pair[step % 2]

    def run(self, kv: torch.Tensor) -> torch.Tensor | None:
        return self._level(0, kv)

    def _level(self, depth: int, held: torch.Tensor) -> torch.Tensor | None:
        level = self.schedule.levels[depth]
        acc_hop = None
        acc: torch.Tensor | None = None
        kv_tag, acc_tag = 2 * depth, 2 * depth + 1
        for step in range(level.size):
            kv_hop = None
            if step + 1 < level.size:
                into = self._buffer(kv_tag, step, held)
                kv_hop = self.comm.hop(held, level.send_to, level.recv_from, kv_tag, into)
            self._steps.append(step)
            grads = self._visit(depth, held)
            self._steps.pop()
            if self.grad_shape is not None:
                acc = _accumulate(acc_hop.wait() if acc_hop else None, grads, self.grad_shape, held)
                if level.size > 1:
                    into = self._buffer(acc_tag, step, acc)
                    acc_hop = self.comm.hop(acc, level.send_to, level.recv_from, acc_tag, into)
            if kv_hop is not None:
                held = kv_hop.wait()
        return acc_hop.wait() if acc_hop is not None else acc

    def _visit(self, depth: int, held: torch.Tensor) -> Sequence[torch.Tensor] | None:
        if depth + 1 < len(self.schedule.levels):
            return self._level(depth + 1, held)
        return self.leaf(self.schedule.source(self._steps), held)


def _accumulate(
    acc: torch.Tensor | None,
    grads: Sequence[torch.Tensor] | None,
    shape: tuple[int, ...],
    like: torch.Tensor,
) -> torch.Tensor:
    """acc + grads (a dK, dV pair), allocating zeros when neither exists yet."""
    if acc is None:
        acc = torch.zeros(shape, dtype=acc_dtype(like.dtype), device=like.device)
    if grads is not None:
        acc[0].add_(grads[0])
        acc[1].add_(grads[1])
    return acc


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
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale={softmax_scale!r} must be finite")
    return float(softmax_scale)


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


_FIELDS = (
    "q.shape[0] (B)",
    "q.shape[1] (S_local)",
    "q.shape[2] (Hq)",
    "k.shape[2] (Hkv)",
    "q.shape[3] (D)",
    "dtype",
    "causal",
    "layout",
)


def _check_same_on_every_rank(
    q: torch.Tensor,
    k: torch.Tensor,
    causal: bool,
    layout: str,
    group: dist.ProcessGroup | None,
    world: int,
) -> None:
    """One small all_gather: every rank must agree on shapes, dtype, causal and layout.

    Every rank sees the same gathered table, so all raise the same error and none hangs in
    a ring hop whose sizes do not match.
    """
    mine = [*q.shape, k.shape[2], DTYPES.index(q.dtype), int(causal), LAYOUTS.index(layout)]
    mine[3], mine[4] = mine[4], mine[3]  # order as in _FIELDS: B, S, Hq, Hkv, D
    device = q.device if q.is_cuda else torch.device("cpu")
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=group)
    table = torch.stack(gathered).cpu()
    for column, field in enumerate(_FIELDS):
        values = table[:, column].tolist()
        if len(set(values)) > 1:
            if field == "dtype":
                values = [str(DTYPES[i]) for i in values]
            elif field == "layout":
                values = [LAYOUTS[i] for i in values]
            raise ValueError(
                f"{field} differs between ranks: {values} (by rank); every rank must pass a "
                "shard of the same sequence with the same arguments"
            )
