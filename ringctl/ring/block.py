"""Attention of one query block against one K/V block, with log-sum-exp (docs/internals.md).

``block_forward`` / ``block_backward`` are the one place the ring computes; they dispatch to
the Triton kernels (``ringctl_kernels``, same signatures) for CUDA tensors, or to the torch
implementation here. ``RINGCTL_BLOCK_IMPL=torch|triton`` forces one. The ring itself calls
the ``_into`` forms, which fold a block straight into the running result (forward: merge
into out/lse; backward: add into dq/dk/dv), so no block-sized result is ever allocated
beside the accumulators.

The mask of a block reaches it as key *ranges* (``BlockMask``: row i sees keys
``lo[i] <= j < hi[i]``, both non-decreasing, ringctl.ring.mask) or as causal positions (the
case ``lo = 0``). The torch implementation first reduces the ranges to *tiles*: rows that see
nothing are never computed, runs of rows with one range are unmasked tiles, runs whose range
grows by one key per row are top-left causal tiles (diagonal blocks of every layout,
striped off-diagonals, a document's own chunk), and the rest (short documents, windows)
get an explicit mask, built per chunk of rows over the chunk's key range so memory stays
bounded. A block, or a chunk, where no query sees a key is skipped. Each tile is
computed one *head chunk* at a time (about 1/8 of the query heads, whole K/V head
groups or part of one), and where inputs are cast (bf16/fp16) tiles span at most
MAX_TILE_ROWS rows by MAX_TILE_ROWS keys, K/V cast per tile, so the temporaries of a call
(inputs cast to the accumulation dtype, GQA heads expanded, kernel outputs) are a fraction
of a shard, not a shard. On CPU each tile runs ATen's fused flash kernel
(``_scaled_dot_product_flash_attention_for_cpu`` and its backward, which takes the ring's final out/lse like the contract asks); elsewhere, a
chunked matmul version. Inputs are computed in the accumulation dtype (float32, or float64
for float64), so block results carry no bf16/fp16 rounding into the merge; on a CPU without
bf16 arithmetic ATen's bf16 kernel is also several times slower than casting a head chunk.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field
from functools import cache
from types import ModuleType
from typing import Any

import torch

from ringctl.memory import MAX_TILE_ROWS, head_chunk

from .merge import acc_dtype, merge_block

IMPL_ENV = "RINGCTL_BLOCK_IMPL"
IMPLS = ("torch", "triton")
# rows per chunk when a tile needs an explicit mask (or on the matmul path)
CHUNK_ROWS = 256
# runs of rows shorter than this (irregular masks) get explicit-mask tiles (see tiles)
MIN_RUN_ROWS = 8
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---------------------------------------------------------------- public entry points


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    mask: BlockMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B,Sq,Hq,D), lse (B,Hq,Sq))`` in the accumulation dtype; hidden rows: 0, -inf."""
    mask = _block_mask(q, k, q_pos, k_pos, mask)
    kernels = _triton_for(q)
    if kernels is not None:
        return kernels.block_forward(q, k, v, scale=scale, ranges=_ranges(mask, q))
    return _torch_forward(q, k, v, scale, None, None, mask=mask)


def block_forward_into(
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    mask: BlockMask | None = None,
) -> None:
    """Merge this block's attention into the running ``out`` (B,Sq,Hq,D) and ``lse`` (B,Hq,Sq),
    both in the accumulation dtype, in place. Starting from ``out = 0, lse = -inf`` the first
    merge gives the block's own result exactly."""
    mask = _block_mask(q, k, q_pos, k_pos, mask)
    kernels = _triton_for(q)
    if kernels is not None:
        block_out, block_lse = kernels.block_forward(q, k, v, scale=scale, ranges=_ranges(mask, q))
        merge_block(out, lse, block_out, block_lse)
        return
    _torch_forward_into(out, lse, q, k, v, scale, mask)


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    mask: BlockMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the accumulation dtype, given the ring's final merged out and lse."""
    mask = _block_mask(q, k, q_pos, k_pos, mask)
    kernels = _triton_for(q)
    if kernels is not None:
        return kernels.block_backward(
            dout, q, k, v, out, lse, scale=scale, ranges=_ranges(mask, q)
        )
    return _torch_backward(dout, q, k, v, out, lse, scale, None, None, mask=mask)


def block_backward_into(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    mask: BlockMask | None = None,
) -> None:
    """Add this block's gradients into ``dq`` (like q) and ``dk``/``dv`` (like k), all in the
    accumulation dtype; ``out`` (any float dtype) and ``lse`` are the ring's final ones."""
    mask = _block_mask(q, k, q_pos, k_pos, mask)
    kernels = _triton_for(q)
    if kernels is not None:
        gq, gk, gv = kernels.block_backward(
            dout, q, k, v, out, lse, scale=scale, ranges=_ranges(mask, q)
        )
        dq.add_(gq)
        dk.add_(gk)
        dv.add_(gv)
        return
    _torch_backward_into(dq, dk, dv, dout, q, k, v, out, lse, scale, mask)


# ---------------------------------------------------------------- dispatch


@cache
def _kernels_module() -> ModuleType | None:
    try:
        import ringctl_kernels
    except ImportError:
        return None
    return ringctl_kernels


def block_impl_for(q: torch.Tensor) -> str:
    """"triton" or "torch": which implementation computes blocks of ``q``."""
    return "triton" if _triton_for(q) is not None else "torch"


def _triton_for(q: torch.Tensor) -> ModuleType | None:
    """The Triton kernels module if this call should use it, else None (torch path)."""
    impl = os.environ.get(IMPL_ENV, "")
    if impl not in ("", *IMPLS):
        raise ValueError(f"{IMPL_ENV}={impl!r} is not a block implementation; allowed: {IMPLS}")
    if impl == "torch":
        return None
    kernels = _kernels_module()
    if impl == "triton":
        if kernels is None:
            raise RuntimeError(f"{IMPL_ENV}=triton but ringctl_kernels cannot be imported")
        return kernels
    supported = (
        kernels is not None
        and q.dtype in _TRITON_DTYPES
        and q.shape[-1] in getattr(kernels, "HEAD_DIMS", ())
    )
    return kernels if q.is_cuda and supported else None


def _check_positions(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor | None, k_pos: torch.Tensor | None
) -> None:
    if (q_pos is None) != (k_pos is None):
        raise ValueError("q_pos and k_pos must both be given (causal) or both be None")
    if q_pos is None or k_pos is None:
        return
    for name, pos, length in (("q_pos", q_pos, q.shape[1]), ("k_pos", k_pos, k.shape[1])):
        if pos.dim() != 1 or pos.shape[0] != length or pos.dtype != torch.int64:
            raise ValueError(
                f"{name} must be a 1-D int64 tensor of length {length}; got shape "
                f"{tuple(pos.shape)}, dtype {pos.dtype}"
            )


def _block_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    mask: BlockMask | None,
) -> BlockMask | None:
    """The block's mask as ranges, from either form (None: every query sees every key)."""
    _check_positions(q, k, q_pos, k_pos)
    if mask is not None:
        if q_pos is not None:
            raise ValueError("give either q_pos/k_pos (causal positions) or mask, not both")
        if mask.lo.shape != (q.shape[1],) or mask.hi.shape != (q.shape[1],):
            raise ValueError(
                f"mask ranges have {tuple(mask.lo.shape)} rows; q has {q.shape[1]}: one "
                "(lo, hi) per query row"
            )
        if q.shape[1] and int(mask.hi[-1]) > k.shape[1]:
            raise ValueError(f"mask.hi[-1]={int(mask.hi[-1])} exceeds the {k.shape[1]} keys")
        return mask
    if q_pos is None or k_pos is None:
        return None
    return BlockMask.causal(q_pos, k_pos)


def _ranges(mask: BlockMask | None, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    return None if mask is None else mask.on(q.device)


# ---------------------------------------------------------------- mask -> tiles


@dataclass(frozen=True)
class Tile:
    """Rows x keys of a block with one mask mode: none, top-left causal, or explicit."""

    rows: slice
    keys: slice
    causal: bool = False
    visible: torch.Tensor | None = None  # bool (rows, keys) when neither none nor causal


@dataclass(eq=False)
class BlockMask:
    """One block's mask: query row i sees keys ``lo[i] <= j < hi[i]`` (CPU int64, both
    non-decreasing down the rows; ringctl.ring.mask.MaskSpec.ranges). Its tiles and device
    copy are kept, so the forward and the backward of a ring step build them once."""

    lo: torch.Tensor
    hi: torch.Tensor
    _tiles: dict[tuple[int | None, int | None, torch.device], list[Tile]] = field(
        default_factory=dict, repr=False
    )
    _on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @classmethod
    def causal(cls, q_pos: torch.Tensor, k_pos: torch.Tensor) -> BlockMask:
        """Causal positions: row i sees the keys at or before its position (a prefix)."""
        hi = torch.searchsorted(k_pos.cpu(), q_pos.cpu(), right=True)
        return cls(torch.zeros_like(hi), hi)

    def sees_any(self) -> bool:
        return bool((self.hi > self.lo).any())

    def tiles(
        self, sk: int, max_rows: int | None, device: torch.device, max_keys: int | None = None
    ) -> list[Tile]:
        key = (max_rows, max_keys, device)
        if key not in self._tiles:
            self._tiles[key] = tiles(self.lo.shape[0], sk, self, max_rows, device, max_keys)
        return self._tiles[key]

    def on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:
            self._on[device] = (self.lo.to(device), self.hi.to(device))
        return self._on[device]


def seen_rows(lo: torch.Tensor, hi: torch.Tensor) -> tuple[slice, BlockMask] | None:
    """The rows of a block whose range ``lo[i] <= j < hi[i]`` is not empty, as (their slice,
    their BlockMask), or None when no row sees a key (skip the block). Masks are monotone,
    so the rows that see something are one run."""
    seeing = (hi > lo).nonzero().flatten()
    if not seeing.numel():
        return None
    first, last = int(seeing[0]), int(seeing[-1]) + 1
    return slice(first, last), BlockMask(lo[first:last], hi[first:last])


def tiles(
    sq: int,
    sk: int,
    mask: BlockMask | None,
    max_rows: int | None = None,
    device: torch.device | None = None,
    max_keys: int | None = None,
) -> list[Tile]:
    """The visible part of a block as tiles; [] if no query sees any key.

    Rows that see nothing are left out. The others split into runs (``_runs``): a *plateau*
    (one range ``[a, m)``) is one unmasked tile; a *diagonal* (``[a, m)``, ``[a, m+1)``, ...)
    is a top-left causal tile over keys ``m-1..`` plus, when ``m-1 > a``, an unmasked tile
    over keys ``a..m-1`` for the same rows (tiles of one row range merge by log-sum-exp like
    blocks). Every causal block the layouts give without documents is one run; runs shorter
    than MIN_RUN_ROWS and irregular rows (windows, one-token documents) go to explicit-mask
    tiles of up to CHUNK_ROWS consecutive rows over the keys those rows see. With
    ``max_rows``, tiles have at most that many rows, so a call's query-side temporaries
    (casts, dq, the kernel's own copy) stay that small while every row is still computed
    once per block; a diagonal's later pieces start at m > 1. With ``max_keys``, tiles also
    span at most that many keys (``_cut_keys``), so the key-side temporaries (K/V cast per
    tile, the tile's dK/dV) stay that small too; with ``max_keys == max_rows`` a diagonal's
    causal tiles are already that wide and its unmasked ones are cut into squares that end
    on the diagonal.
    """
    cap = max_rows or max(sq, 1)
    if mask is None:
        kcap = max_keys or max(sk, 1)
        return [
            Tile(slice(r, min(r + cap, sq)), slice(c, min(c + kcap, sk)))
            for r in range(0, sq, cap)
            for c in range(0, sk, kcap)
        ]
    runs = _runs(mask.lo.cpu(), mask.hi.cpu())
    lo, hi = mask.lo.tolist(), mask.hi.tolist()
    whole = len(runs) == 1 and runs[0][2] != "irregular"
    out: list[Tile] = []
    loose: list[tuple[int, int]] = []  # row ranges waiting for explicit-mask tiles
    for start, stop, kind in runs:
        if kind == "irregular" or (stop - start < MIN_RUN_ROWS and not whole):
            if loose and loose[-1][1] == start:
                loose[-1] = (loose[-1][0], stop)
            else:
                loose.append((start, stop))
            continue
        for piece in range(start, stop, cap):
            end = min(piece + cap, stop)
            rows, a, m = slice(piece, end), lo[piece], hi[piece]
            if kind == "plateau":
                out.append(Tile(rows, slice(a, m)))
                continue
            if m - 1 > a:
                out.append(Tile(rows, slice(a, m - 1)))
            out.append(Tile(rows, slice(m - 1, m - 1 + end - piece), causal=True))
    for start, stop in loose:
        out += _explicit(start, stop, mask, min(CHUNK_ROWS, cap), device)
    if max_keys is None:
        return out
    return [cut for tile in out for cut in _cut_keys(tile, mask, max_keys, device)]


def _cut_keys(
    tile: Tile, mask: BlockMask, max_keys: int, device: torch.device | None
) -> list[Tile]:
    """``tile`` cut into tiles of at most ``max_keys`` keys, exact: each piece is the mask
    restricted to its rows and key chunk. Chunks end at the tile's last key (for a diagonal's
    unmasked tile, on the diagonal). Rows that see none of a chunk's keys leave that piece
    (lo and hi never decrease, so those that do are consecutive); a piece is unmasked when
    its rows see one range, causal when it keeps the top-left causal shape, else explicit."""
    a, b = tile.keys.start, tile.keys.stop
    if b - a <= max_keys:
        return [tile]
    r0, r1 = tile.rows.start, tile.rows.stop
    lo, hi = mask.lo[r0:r1], mask.hi[r0:r1]
    out = []
    for c1 in range(b, a, -max_keys):
        c0 = max(a, c1 - max_keys)
        # what each row sees of [c0, c1): [clo, chi), empty when clo >= chi
        clo, chi = lo.clamp(c0, c1), hi.clamp(c0, c1)
        sees = (chi > clo).nonzero().flatten()
        if sees.numel() == 0:
            continue
        first, last = int(sees[0]), int(sees[-1]) + 1
        clo, chi = clo[first:last], chi[first:last]
        rows, n = slice(r0 + first, r0 + last), last - first
        k0, k1 = int(clo[0]), int(chi[-1])
        if int(clo[-1]) == k0 and int(chi[0]) == k1:
            out.append(Tile(rows, slice(k0, k1)))
        elif int(clo[-1]) == k0 and k1 - k0 == n and bool(
            (chi == torch.arange(k0 + 1, k0 + n + 1)).all()
        ):
            out.append(Tile(rows, slice(k0, k1), causal=True))
        else:
            key = torch.arange(k0, k1)
            visible = (key[None, :] >= clo[:, None]) & (key[None, :] < chi[:, None])
            out.append(Tile(rows, slice(k0, k1), visible=visible.to(device)))
    return out[::-1]


def _runs(lo: torch.Tensor, hi: torch.Tensor) -> list[tuple[int, int, str]]:
    """The rows that see some key as (start, stop, kind) runs, greedily from the top of each
    stretch of such rows: "plateau" (equal ranges), "diagonal" (same start, one more key per
    row), "irregular" (rows each unlike the next). Walks the stretches of equal row-to-row
    changes, not the rows, so a structured mask costs a few steps."""
    m = lo.shape[0]
    sees = (hi > lo).to(torch.int8)
    edges = torch.diff(sees, prepend=sees.new_zeros(1), append=sees.new_zeros(1))
    starts = (edges == 1).nonzero().flatten().tolist()
    stops = (edges == -1).nonzero().flatten().tolist()
    if m > 1:
        dlo, dhi = lo.diff(), hi.diff()
        change = torch.where((dlo == 0) & (dhi >= 0) & (dhi <= 1), dhi, torch.full_like(dhi, 2))
        values_t, lengths = torch.unique_consecutive(change, return_counts=True)
        values, ends = values_t.tolist(), torch.cumsum(lengths, 0).tolist()
    runs = []
    seg = 0  # the stretch of equal changes holding change i (row i to row i + 1)
    for first, stop in zip(starts, stops, strict=True):
        i = first
        while i < stop:
            if i == stop - 1:
                runs.append((i, stop, "plateau"))
                break
            seg = bisect.bisect_right(ends, i, lo=seg)
            value, end = values[seg], min(ends[seg], stop - 1)
            if value == 2:
                end = stop if end == stop - 1 else end
                runs.append((i, end, "irregular"))
                i = end
                continue
            runs.append((i, end + 1, "plateau" if value == 0 else "diagonal"))
            i = end + 1
    return runs


def _explicit(
    start: int, stop: int, mask: BlockMask, chunk: int, device: torch.device | None
) -> list[Tile]:
    """Explicit-mask tiles over rows ``start..stop`` (each seeing some key), ``chunk`` rows
    at a time, each over the keys its rows see; a chunk of one range needs no mask."""
    out = []
    for at in range(start, stop, chunk):
        end = min(at + chunk, stop)
        lo, hi = mask.lo[at:end], mask.hi[at:end]
        a, b = int(lo[0]), int(hi[-1])  # lo and hi are non-decreasing
        rows, keys = slice(at, end), slice(a, b)
        if int(lo[-1]) == a and int(hi[0]) == b:
            out.append(Tile(rows, keys))
            continue
        key = torch.arange(a, b)
        visible = (key[None, :] >= lo[:, None]) & (key[None, :] < hi[:, None])
        out.append(Tile(rows, keys, visible=visible.to(device)))
    return out


# ---------------------------------------------------------------- torch implementation


@cache
def head_chunks(hq: int, hkv: int) -> tuple[tuple[slice, slice], ...]:
    """``(query heads, kv heads)`` of each head chunk a tile is computed in (sizes from
    ``ringctl.memory.head_chunk``: about ``hq / HEAD_CHUNKS`` query heads, whole K/V head
    groups or an equal part of one, whose one kv head is then broadcast, not copied).
    Query head h uses kv head ``h // (hq // hkv)``."""
    nq, nk = head_chunk(hq, hkv)
    group = hq // hkv
    return tuple(
        (slice(h, h + nq), slice(h // group, h // group + nk)) for h in range(0, hq, nq)
    )


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B,S,Hkv,D) -> (B,S,heads,D); query head h uses kv head h // (heads // Hkv). One kv
    head is broadcast (a view with head stride 0, which ATen's flash kernel reads as is)."""
    b, s, hkv, d = x.shape
    if hkv == heads:
        return x
    if hkv == 1:
        return x.expand(b, s, heads, d)
    return x.unsqueeze(3).expand(b, s, hkv, heads // hkv, d).reshape(b, s, heads, d)


def _sum_heads(x: torch.Tensor, hkv: int) -> torch.Tensor:
    b, s, h, d = x.shape
    return x if h == hkv else x.reshape(b, s, hkv, h // hkv, d).sum(3)


def _mask_of(tile: Tile, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The tile's mask as the additive float mask ATen's flash kernel takes."""
    if tile.visible is None:
        return None
    mask = torch.zeros(tile.visible.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~tile.visible, float("-inf"))


def _max_rows(q: torch.Tensor, acc: torch.dtype) -> int | None:
    """Rows per tile: MAX_TILE_ROWS when q is cast (bf16/fp16: each call's casts of q, dout
    and out are then that small), else whole runs (fewer calls; float32 has no casts)."""
    return MAX_TILE_ROWS if q.dtype != acc else None


def _max_keys(q: torch.Tensor, acc: torch.dtype) -> int | None:
    """Keys per tile: MAX_TILE_ROWS when K/V are cast (square tiles: each tile's K/V casts
    and dK/dV are then that small, for one more cast of K/V per row tile), else all."""
    return MAX_TILE_ROWS if q.dtype != acc else None


def _tiles_of(mask: BlockMask | None, q: torch.Tensor, k: torch.Tensor, acc: torch.dtype) -> list[Tile]:
    max_rows, max_keys = _max_rows(q, acc), _max_keys(q, acc)
    if mask is None:
        return tiles(q.shape[1], k.shape[1], None, max_rows, max_keys=max_keys)
    return mask.tiles(k.shape[1], max_rows, q.device, max_keys)


def _kv_inputs(
    heads: tuple[slice, slice], keys: slice, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v of one head chunk and one tile's keys in ``dtype``, kv heads expanded to the
    chunk's query heads: cast per tile, so a cast spans a tile's keys, not the block's (a
    view, no copy, when nothing is cast or expanded)."""
    qh, kh = heads
    n = qh.stop - qh.start
    return (
        _expand_heads(_dense(k[:, keys, kh], dtype), n),
        _expand_heads(_dense(v[:, keys, kh], dtype), n),
    )


def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with unit stride along D: ATen's CPU flash kernel assumes it and
    silently reads wrong elements otherwise."""
    x = x.to(dtype)
    return x if x.stride(-1) == 1 else x.contiguous()


def _torch_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    path: str | None = None,
    mask: BlockMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = acc_dtype(q.dtype)
    b, sq, hq, d = q.shape
    out = torch.zeros((b, sq, hq, d), dtype=acc, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=acc, device=q.device)
    _torch_forward_into(out, lse, q, k, v, scale, _block_mask(q, k, q_pos, k_pos, mask), path)
    return out, lse


def _torch_forward_into(
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: BlockMask | None,
    path: str | None = None,
) -> None:
    tile_forward = _tile_path(q, path)[0]
    found = _tiles_of(mask, q, k, out.dtype)
    for heads in head_chunks(q.shape[2], k.shape[2]) if found else ():
        for tile in found:
            kt, vt = _kv_inputs(heads, tile.keys, k, v, out.dtype)
            qt = _dense(q[:, tile.rows, heads[0]], out.dtype)
            add = _mask_of(tile, out.dtype, q.device)
            o, l = tile_forward(qt, kt, vt, scale, tile, add)
            merge_block(out[:, tile.rows, heads[0]], lse[:, heads[0], tile.rows], o, l)
            del qt, kt, vt, o, l  # before the next tile's: only one tile's temporaries live


def _torch_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    path: str | None = None,
    mask: BlockMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    mask = _block_mask(q, k, q_pos, k_pos, mask)
    _torch_backward_into(dq, dk, dv, dout, q, k, v, out, lse, scale, mask, path)
    return dq, dk, dv


def _torch_backward_into(
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    mask: BlockMask | None,
    path: str | None = None,
) -> None:
    acc = dq.dtype
    tile_backward = _tile_path(q, path)[1]
    found = _tiles_of(mask, q, k, acc)
    for heads in head_chunks(q.shape[2], k.shape[2]) if found else ():
        qh, kh = heads
        n_kv = kh.stop - kh.start
        for tile in found:
            rows = tile.rows
            kt, vt = _kv_inputs(heads, tile.keys, k, v, acc)
            grads = _Grads(
                _dense(dout[:, rows, qh], acc), _dense(out[:, rows, qh], acc),
                lse[:, qh, rows].to(acc),
            )  # fmt: skip
            qt = _dense(q[:, rows, qh], acc)
            add = _mask_of(tile, acc, q.device)
            gq, gk, gv = tile_backward(grads, qt, kt, vt, scale, tile, add)
            del qt, kt, vt, grads
            dq[:, rows, qh] += gq
            dk[:, tile.keys, kh] += _sum_heads(gk, n_kv)
            dv[:, tile.keys, kh] += _sum_heads(gv, n_kv)
            del gq, gk, gv  # before the next tile's: only one tile's temporaries live


def _tile_path(q: torch.Tensor, path: str | None) -> tuple[Any, Any]:
    """(tile forward, tile backward): ATen's CPU flash kernel on CPU, matmul elsewhere."""
    if path is None:
        path = "flash" if q.device.type == "cpu" else "matmul"
    if path == "flash":
        return _flash_forward, _flash_backward
    if path == "matmul":
        return _matmul_forward, _matmul_backward
    raise ValueError(f"path={path!r}; allowed: 'flash' (CPU only), 'matmul'")


@dataclass(frozen=True)
class _Grads:
    """What the backward of one tile needs besides q, k, v: dout, final out, final lse."""

    dout: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor


# Tile functions take (B,S,H,D) inputs already in the acc dtype with expanded heads, and
# the tile's additive mask (``_mask_of``; None unless the tile needs an explicit one).


def _flash_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    tile: Tile,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, tile.causal,
        attn_mask=mask, scale=scale,
    )  # fmt: skip
    return o.transpose(1, 2), lse


def _flash_backward(
    g: _Grads,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    tile: Tile,
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = [x.transpose(1, 2) for x in (g.dout, q, k, v, g.out)]
    gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *t, g.lse.contiguous(), 0.0, tile.causal, attn_mask=mask, scale=scale,
    )  # fmt: skip
    return gq.transpose(1, 2), gk.transpose(1, 2), gv.transpose(1, 2)


def _chunk_hidden(
    tile: Tile, start: int, rows: int, keys: int, device: torch.device
) -> torch.Tensor | None:
    """Bool mask of hidden scores for rows start..start+rows of the tile, or None."""
    if tile.causal:
        i = torch.arange(start, start + rows, device=device)[:, None]
        return torch.arange(keys, device=device)[None, :] > i
    if tile.visible is not None:
        return ~tile.visible[start : start + rows]
    return None


def _scores(
    q: torch.Tensor, k: torch.Tensor, scale: float, hidden: torch.Tensor | None
) -> torch.Tensor:
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return s if hidden is None else s.masked_fill_(hidden, float("-inf"))


def _matmul_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    tile: Tile,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked over rows so the score matrix stays CHUNK_ROWS x Sk (non-CPU devices)."""
    outs, lses = [], []
    for start in range(0, q.shape[1], CHUNK_ROWS):
        qc = q[:, start : start + CHUNK_ROWS]
        hidden = _chunk_hidden(tile, start, qc.shape[1], k.shape[1], q.device)
        s = _scores(qc, k, scale, hidden)
        lse = torch.logsumexp(s, dim=-1)
        outs.append(torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - lse.unsqueeze(-1)), v))
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=2)


def _matmul_backward(
    g: _Grads,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    tile: Tile,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gq = torch.empty_like(q)
    gk = torch.zeros_like(k)
    gv = torch.zeros_like(v)
    for start in range(0, q.shape[1], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        qc, dout = q[:, rows], g.dout[:, rows]
        hidden = _chunk_hidden(tile, start, qc.shape[1], k.shape[1], q.device)
        p = torch.exp(_scores(qc, k, scale, hidden) - g.lse[:, :, rows].unsqueeze(-1))
        delta = (dout * g.out[:, rows]).sum(-1).transpose(1, 2).unsqueeze(-1)  # (B,H,rows,1)
        ds = p * (torch.einsum("bqhd,bkhd->bhqk", dout, v) - delta) * scale
        gq[:, rows] = torch.einsum("bhqk,bkhd->bqhd", ds, k)
        gk += torch.einsum("bhqk,bqhd->bkhd", ds, qc)
        gv += torch.einsum("bhqk,bqhd->bkhd", p, dout)
    return gq, gk, gv
