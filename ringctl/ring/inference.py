"""Context-parallel inference: the new tokens of a turn attend to the whole ring's KV cache.

Two strategies (arXiv 2411.01783, sec. 3), both exact, both run by the training ring's one
loop (``_Ring`` in attention.py) with one lane:

- ``pass_kv``: every rank's cache block (its cached and new K/V, padded to the longest
  position's) travels the ring; each rank merges its own new queries' attention over every
  block, as training's forward does. Bytes per step: the whole context / W.
- ``pass_q``: every rank's new queries (padded to the most any position has) travel the
  ring; each rank attends them to its own cache, and the partial result, out and lse as one
  ``(B, T, Hq, D+1)`` accumulator in the accumulation dtype, follows the queries one hop
  behind, merged by log-sum-exp at every rank (ringctl.ring.merge), and arrives home after
  a full revolution: the accumulator channel that carries dK/dV in training's backward.
  Bytes per step: the new tokens' Q and partials, independent of the context length: the
  cheaper choice when a few tokens meet a long cache (chat turns, decode).

``mode="auto"`` takes the cost model's choice (ringctl.infer_plan.choose_mode) for this
turn's sizes on the cache's plan; every rank computes the same choice. Masks are causal by
global token position (each rank knows every position's tokens from the placement), so a
block where no query sees a key is skipped, and padding rows see nothing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from .attention import Accumulator, _check_scale, _Ring
from .block import BlockMask, block_forward_into, seen_rows
from .comm import RingComm
from .kv_cache import CacheError, CacheTurn, RingKVCache
from .mask import MaskSpec
from .merge import acc_dtype, empty_partial, merge_partial, partial_views, reset_partial
from .schedule import make_schedule

#: the strategies, and what ``mode`` may say (the same names as ringctl.infer_plan's)
MODES = ("pass_kv", "pass_q")
MODE_CHOICES = ("auto", *MODES)
#: a language model's cache is causal by global position: query i sees keys j <= i
_CAUSAL = MaskSpec(None, True, (-1, -1))


def cached_attention(
    q: torch.Tensor,
    cache: RingKVCache,
    layer: int,
    *,
    mode: str = "auto",
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's new queries of the current turn over the whole
    context (every rank's cache, this turn's tokens included): ``(B, n, Hq, D)`` in,
    ``(B, n, Hq, D)`` out, n = ``len(cache.turn.positions)`` (possibly 0).

    Call after ``cache.append(layer, k, v)`` on every rank, with the same ``mode`` (and
    shapes) everywhere. Checked before any communication: the mode, the shapes against the
    cache, and that this layer's K/V of the turn were appended.
    """
    turn = _check(q, cache, layer, mode)
    scale = _check_scale(softmax_scale, q.shape[-1])
    if cache.world_size == 1:  # nothing travels: both strategies are one local block
        chosen = "pass_kv" if mode == "auto" else mode
    else:
        chosen = resolve_mode(mode, cache, q.shape[2])
        _check_same_on_every_rank(q, cache, chosen)
    if chosen == "pass_kv":
        return _pass_kv(q, cache, layer, turn, scale)
    return _pass_q(q, cache, layer, turn, scale)


def resolve_mode(mode: str, cache: RingKVCache, heads: int) -> str:
    """``mode`` itself, or for ``auto`` the cost model's faster strategy for this turn,
    priced once per turn (every layer of the turn has the same sizes)."""
    if mode != "auto":
        return mode
    from ringctl.infer_plan import InferWorkload, choose_mode

    turn = cache.turn
    assert turn is not None
    if heads not in turn.auto_modes:
        workload = InferWorkload(
            batch=cache.batch, new_tokens=turn.count, cached_tokens=turn.cached, heads=heads,
            kv_heads=cache.kv_heads, head_dim=cache.head_dim, dtype=str(cache.dtype).removeprefix("torch."),
            layout=cache.layout,
        )  # fmt: skip
        turn.auto_modes[heads] = choose_mode(cache.plan, workload, turn=turn.turn)
    return turn.auto_modes[heads]


def _check(q: torch.Tensor, cache: RingKVCache, layer: int, mode: object) -> CacheTurn:
    if mode not in MODE_CHOICES:
        raise CacheError(f"mode={mode!r} is invalid; allowed: {' | '.join(MODE_CHOICES)}")
    turn = cache.turn
    if turn is None:
        raise CacheError("cached_attention before cache.begin_turn: place the turn's tokens first")
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        shape = tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise CacheError(f"q must be a (B, n, Hq, D) tensor; got {shape}")
    n = int(turn.positions.numel())
    b, rows, hq, d = q.shape
    if (b, rows, d) != (cache.batch, n, cache.head_dim) or hq % cache.kv_heads:
        raise CacheError(
            f"q.shape={tuple(q.shape)} is invalid; allowed: (B={cache.batch}, {n} (this rank's "
            f"new tokens of the turn), Hq a multiple of kv_heads={cache.kv_heads}, "
            f"D={cache.head_dim})"
        )
    if q.dtype != cache.dtype:
        raise CacheError(f"q.dtype={q.dtype} but the cache holds {cache.dtype}; use one dtype")
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < cache.layers:
        raise CacheError(f"layer={layer!r} is invalid; allowed: 0..{cache.layers - 1}")
    if cache.filled(layer) != cache.held:
        raise CacheError(
            f"layer {layer}'s K/V of turn {turn.index} were not appended ({cache.filled(layer)} of "
            f"{cache.held} rows); call cache.append(layer, k, v) first"
        )
    return turn


_CHECKED: set[tuple[Any, ...]] = set()


def _check_same_on_every_rank(q: torch.Tensor, cache: RingKVCache, mode: str) -> None:
    """One small all_gather per (shape, mode) signature: every rank must send blocks of the
    same shape and run the same strategy, or the ring's hops would not match. Ranks that
    call with the same signatures in the same order (the only correct use) skip together."""
    # what every rank has in common (an object id would not be: a rank that skips the gather
    # while another runs it hangs both)
    key = (q.shape[0], q.shape[2], q.shape[3], q.dtype, mode, cache.group, cache.world_size, cache.kv_heads)
    if key in _CHECKED:
        return
    mine = [q.shape[0], q.shape[2], q.shape[3], MODES.index(mode)]
    device = q.device if q.is_cuda else torch.device("cpu")
    local = torch.tensor(mine, dtype=torch.int64, device=device)
    gathered = [torch.empty_like(local) for _ in range(cache.world_size)]
    dist.all_gather(gathered, local, group=cache.group)
    table = torch.stack(gathered).cpu().tolist()
    for i, name in enumerate(("q.shape[0] (B)", "q.shape[2] (Hq)", "q.shape[3] (D)", "mode")):
        values: list[Any] = [row[i] for row in table]
        if len(set(values)) > 1:
            if name == "mode":
                values = [MODES[v] for v in values]
            raise CacheError(f"{name} differs between ranks: {values} (by rank); pass the same on every rank")
    if len(_CHECKED) > 1024:
        _CHECKED.clear()
    _CHECKED.add(key)


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[slice, BlockMask] | None:
    """Causal mask of queries at ``q_pos`` against keys at ``k_pos`` (both ascending global
    positions): (rows that see a key, their ranges), or None when none does. Padding rows
    (past ``q_pos``) are never computed."""
    return seen_rows(*_CAUSAL.ranges(q_pos, k_pos))


def _kv_of(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``(B, S, Hkv, D)`` views of a cache block ``(S, 2, B, Hkv, D)``."""
    return block[:, 0].permute(1, 0, 2, 3), block[:, 1].permute(1, 0, 2, 3)


def _comm(cache: RingKVCache) -> tuple[RingComm, Any]:
    schedule = make_schedule(cache.plan, cache.rank)
    return RingComm(cache.group, cache.rank, "forward", schedule.link_class), schedule


def _pass_kv(q: torch.Tensor, cache: RingKVCache, layer: int, turn: CacheTurn, scale: float) -> torch.Tensor:
    """Every position's cache block travels; this rank's queries merge each into out/lse."""
    acc = acc_dtype(q.dtype)
    b, n, hq, d = q.shape
    out = q.new_zeros((b, n, hq, d), dtype=acc)
    lse = q.new_full((b, hq, n), -math.inf, dtype=acc)
    q_pos = turn.positions
    masks: dict[int, tuple[slice, BlockMask] | None] = {}

    def leaf(src: int, block: Any) -> None:
        if n == 0:
            return None
        if src not in masks:
            masks[src] = _mask(q_pos, turn.keys_by_position[src])
        found = masks[src]
        if found is None:
            return None
        rows, mask = found
        held = int(turn.keys_by_position[src].numel())
        k, v = _kv_of(block[:held])
        block_forward_into(out[:, rows], lse[:, :, rows], q[:, rows], k, v, scale=scale, mask=mask)
        return None

    if cache.world_size == 1:
        leaf(0, cache.block(layer))
    else:
        comm, schedule = _comm(cache)
        # a copy: the ring receives into the block it starts from (its second buffer)
        start = cache.block(layer, turn.turn.max_held).clone()
        _Ring(comm, schedule, [leaf]).run([start])
    return out.to(q.dtype)


def _partials(d: int) -> Accumulator:
    """Pass-Q's accumulator: the travelling queries' packed partial (out and lse,
    ringctl.ring.merge), merged by log-sum-exp at every rank (start: out 0, lse -inf)."""

    def new(block: Any) -> torch.Tensor:
        b, t, h, _ = block.shape
        return empty_partial(b, t, h, d, block)

    def fold(acc: torch.Tensor, part: torch.Tensor) -> None:
        merge_partial(*partial_views(acc), part)

    return Accumulator(new, reset_partial, fold)


def _pass_q(q: torch.Tensor, cache: RingKVCache, layer: int, turn: CacheTurn, scale: float) -> torch.Tensor:
    """Every position's new queries travel; each rank attends them to its own cache and the
    partial (out, lse) follows them home, merged at every rank."""
    b, n, hq, d = q.shape
    rows_max = turn.turn.max_new
    k, v = _kv_of(cache.block(layer))
    k_pos = turn.keys_by_position[cache.position]
    part = empty_partial(b, rows_max, hq, d, q)  # folded into the accumulator before the next visit
    masks: dict[int, tuple[slice, BlockMask] | None] = {}

    def leaf(src: int, block: Any) -> torch.Tensor | None:
        if src not in masks:
            masks[src] = _mask(turn.new_by_position[src], k_pos)
        found = masks[src]
        if found is None:
            return None
        rows, mask = found
        reset_partial(part)
        block_forward_into(*partial_views(part[:, rows]), block[:, rows], k, v, scale=scale, mask=mask)
        return part

    travelling = q.new_zeros((b, rows_max, hq, d))
    travelling[:, :n] = q
    comm, schedule = _comm(cache)
    [home] = _Ring(comm, schedule, [leaf], accumulator=_partials(d)).run([travelling])
    assert home is not None
    return home[:, :n, :, :d].to(q.dtype)

