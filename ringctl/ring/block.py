"""Attention of one query block against one K/V block, with log-sum-exp (docs/internals.md).

``block_forward`` / ``block_backward`` are the one place the ring computes; they dispatch to
the Triton kernels (``ringctl_kernels``, same signatures) for CUDA tensors, or to the torch
implementation here. ``RINGCTL_BLOCK_IMPL=torch|triton`` forces one. The ring itself calls
the ``_into`` forms, which fold a block straight into the running result (forward: merge
into out/lse; backward: add into dq/dk/dv), so no block-sized result is ever allocated
beside the accumulators.

The torch implementation first reduces the mask to *tiles*: global positions are ascending
in every shard, so the keys a query row sees are a prefix of the block, rows that see
nothing are a prefix of the rows, and a block is either hidden, fully visible, top-left
causal (diagonal blocks of every layout, striped off-diagonals) or, rarely, needs an
explicit mask, which is then built per chunk of rows so memory stays bounded. Each tile is
computed one *head chunk* at a time (about 1/8 of the query heads, whole K/V head
groups or part of one), so the temporaries of a call (inputs cast to the accumulation
dtype, GQA heads expanded, kernel outputs) are a fraction of a shard, not a shard. On CPU
each tile runs ATen's fused flash kernel (``_scaled_dot_product_flash_attention_for_cpu``
and its backward, which takes the ring's final out/lse like the contract asks); elsewhere, a
chunked matmul version. Inputs are computed in the accumulation dtype (float32, or float64
for float64), so block results carry no bf16/fp16 rounding into the merge; on a CPU without
bf16 arithmetic ATen's bf16 kernel is also several times slower than casting a head chunk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out (B,Sq,Hq,D), lse (B,Hq,Sq))`` in the accumulation dtype; hidden rows: 0, -inf."""
    _check_positions(q, k, q_pos, k_pos)
    kernels = _triton_for(q)
    if kernels is not None:
        return kernels.block_forward(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos)
    return _torch_forward(q, k, v, scale, q_pos, k_pos)


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
) -> None:
    """Merge this block's attention into the running ``out`` (B,Sq,Hq,D) and ``lse`` (B,Hq,Sq),
    both in the accumulation dtype, in place. Starting from ``out = 0, lse = -inf`` the first
    merge gives the block's own result exactly."""
    _check_positions(q, k, q_pos, k_pos)
    kernels = _triton_for(q)
    if kernels is not None:
        block_out, block_lse = kernels.block_forward(
            q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos
        )
        merge_block(out, lse, block_out, block_lse)
        return
    _torch_forward_into(out, lse, q, k, v, scale, q_pos, k_pos)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` in the accumulation dtype, given the ring's final merged out and lse."""
    _check_positions(q, k, q_pos, k_pos)
    kernels = _triton_for(q)
    if kernels is not None:
        return kernels.block_backward(
            dout, q, k, v, out, lse, scale=scale, q_pos=q_pos, k_pos=k_pos
        )
    return _torch_backward(dout, q, k, v, out, lse, scale, q_pos, k_pos)


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
) -> None:
    """Add this block's gradients into ``dq`` (like q) and ``dk``/``dv`` (like k), all in the
    accumulation dtype; ``out`` (any float dtype) and ``lse`` are the ring's final ones."""
    _check_positions(q, k, q_pos, k_pos)
    kernels = _triton_for(q)
    if kernels is not None:
        gq, gk, gv = kernels.block_backward(
            dout, q, k, v, out, lse, scale=scale, q_pos=q_pos, k_pos=k_pos
        )
        dq.add_(gq)
        dk.add_(gk)
        dv.add_(gv)
        return
    _torch_backward_into(dq, dk, dv, dout, q, k, v, out, lse, scale, q_pos, k_pos)


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


# ---------------------------------------------------------------- mask -> tiles


@dataclass(frozen=True)
class Tile:
    """Rows x keys of a block with one mask mode: none, top-left causal, or explicit."""

    rows: slice
    keys: slice
    causal: bool = False
    visible: torch.Tensor | None = None  # bool (rows, keys) when neither none nor causal


def tiles(
    sq: int,
    sk: int,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    max_rows: int | None = None,
) -> list[Tile]:
    """The visible part of a block as tiles; [] if no query sees any key.

    Row i sees the first ``n_i`` keys, ``n`` non-decreasing. The rows that see something
    split into runs: a *plateau* (equal ``n = m``) is one unmasked tile over keys ``0..m``; a
    *diagonal* (``n`` grows by one per row, from ``m``) is a top-left causal tile over keys
    ``m-1..`` plus, when ``m > 1``, an unmasked tile over keys ``0..m-1`` for the same rows
    (tiles of one row range merge by log-sum-exp like blocks). Every block the layouts give
    is one run (a shard's own block a diagonal from 1, a zigzag off-diagonal block a
    plateau); runs shorter than MIN_RUN_ROWS (irregular masks) go to explicit-mask tiles of
    up to CHUNK_ROWS rows. With ``max_rows``, a run is cut into tiles of at most that many
    rows, so a call's query-side temporaries (casts, dq, the kernel's own copy) stay that
    small while every row is still computed once per block; a diagonal's later pieces start
    at m > 1.
    """
    cap = max_rows or max(sq, 1)
    if q_pos is None or k_pos is None:
        return [Tile(slice(r, min(r + cap, sq)), slice(0, sk)) for r in range(0, sq, cap)]
    counts = torch.searchsorted(k_pos.cpu(), q_pos.cpu(), right=True)  # keys seen, per row
    first = int((counts == 0).sum())  # rows that see nothing come first
    runs = _runs(counts[first:], first)
    n = counts.tolist()
    whole = len(runs) == 1
    out: list[Tile] = []
    loose: list[int] = []  # rows of short runs, waiting for explicit-mask tiles
    for run_start, run_stop, kind in runs:
        if run_stop - run_start < MIN_RUN_ROWS and not whole:
            loose.extend(range(run_start, run_stop))
            continue
        out += _explicit(loose, n, q_pos.device)
        loose = []
        for start in range(run_start, run_stop, cap):
            stop = min(start + cap, run_stop)
            rows, m = slice(start, stop), n[start]
            if kind == "plateau":
                out.append(Tile(rows, slice(0, m)))
                continue
            if m > 1:
                out.append(Tile(rows, slice(0, m - 1)))
            out.append(Tile(rows, slice(m - 1, m - 1 + stop - start), causal=True))
    return out + _explicit(loose, n, q_pos.device)


def _runs(counts: torch.Tensor, offset: int) -> list[tuple[int, int, str]]:
    """Rows ``offset + i`` split into (start, stop, "plateau" | "diagonal") runs, greedily from
    the top: a run takes the longest stretch of equal (plateau) or one-apart (diagonal)
    counts from its first row; a row that fits neither is a plateau of one. Walks the
    stretches of equal differences, not the rows, so a structured mask costs a few steps."""
    m = counts.shape[0]
    if m == 0:
        return []
    values, lengths = torch.unique_consecutive(counts[1:] - counts[:-1], return_counts=True)
    values_l, lengths_l = values.tolist(), lengths.tolist()
    runs = []
    i, seg, seg_start = 0, 0, 0  # current row; the stretch of differences holding diff i
    while i < m:
        if i == m - 1:
            runs.append((offset + i, offset + m, "plateau"))
            break
        while seg_start + lengths_l[seg] <= i:
            seg_start += lengths_l[seg]
            seg += 1
        value = values_l[seg]
        if value in (0, 1):
            length = seg_start + lengths_l[seg] - i  # differences i.. equal to value
            kind = "plateau" if value == 0 else "diagonal"
            runs.append((offset + i, offset + i + length + 1, kind))
            i += length + 1
        else:
            runs.append((offset + i, offset + i + 1, "plateau"))
            i += 1
    return runs


def _explicit(rows: list[int], n: list[int], device: torch.device) -> list[Tile]:
    """Explicit-mask tiles over ``rows`` (consecutive), CHUNK_ROWS rows at a time."""
    out = []
    for at in range(0, len(rows), CHUNK_ROWS):
        part = rows[at : at + CHUNK_ROWS]
        counts = torch.tensor([n[r] for r in part])
        keys = int(counts.max())
        visible = torch.arange(keys) < counts[:, None]
        out.append(Tile(slice(part[0], part[-1] + 1), slice(0, keys), visible=visible.to(device)))
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


def _kv_inputs(
    heads: tuple[slice, slice], k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v of one head chunk (all keys) in ``dtype``, kv heads expanded to the chunk's
    query heads: cast once per chunk, then sliced by every tile of the block."""
    qh, kh = heads
    n = qh.stop - qh.start
    return (
        _expand_heads(_dense(k[:, :, kh], dtype), n),
        _expand_heads(_dense(v[:, :, kh], dtype), n),
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
) -> tuple[torch.Tensor, torch.Tensor]:
    acc = acc_dtype(q.dtype)
    b, sq, hq, d = q.shape
    out = torch.zeros((b, sq, hq, d), dtype=acc, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=acc, device=q.device)
    _torch_forward_into(out, lse, q, k, v, scale, q_pos, k_pos, path)
    return out, lse


def _torch_forward_into(
    out: torch.Tensor,
    lse: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    path: str | None = None,
) -> None:
    tile_forward = _tile_path(q, path)[0]
    found = tiles(q.shape[1], k.shape[1], q_pos, k_pos, _max_rows(q, out.dtype))
    for heads in head_chunks(q.shape[2], k.shape[2]) if found else ():
        kc, vc = _kv_inputs(heads, k, v, out.dtype)
        for tile in found:
            qt = _dense(q[:, tile.rows, heads[0]], out.dtype)
            mask = _mask_of(tile, out.dtype, q.device)
            o, l = tile_forward(qt, kc[:, tile.keys], vc[:, tile.keys], scale, tile, mask)
            merge_block(out[:, tile.rows, heads[0]], lse[:, heads[0], tile.rows], o, l)
            del qt, o, l  # before the next tile's: only one tile's temporaries live
        del kc, vc


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    _torch_backward_into(dq, dk, dv, dout, q, k, v, out, lse, scale, q_pos, k_pos, path)
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
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    path: str | None = None,
) -> None:
    acc = dq.dtype
    tile_backward = _tile_path(q, path)[1]
    found = tiles(q.shape[1], k.shape[1], q_pos, k_pos, _max_rows(q, acc))
    for heads in head_chunks(q.shape[2], k.shape[2]) if found else ():
        qh, kh = heads
        n_kv = kh.stop - kh.start
        kc, vc = _kv_inputs(heads, k, v, acc)
        for tile in found:
            rows = tile.rows
            grads = _Grads(
                _dense(dout[:, rows, qh], acc), _dense(out[:, rows, qh], acc),
                lse[:, qh, rows].to(acc),
            )  # fmt: skip
            qt = _dense(q[:, rows, qh], acc)
            mask = _mask_of(tile, acc, q.device)
            gq, gk, gv = tile_backward(grads, qt, kc[:, tile.keys], vc[:, tile.keys], scale, tile, mask)
            del qt, grads
            dq[:, rows, qh] += gq
            dk[:, tile.keys, kh] += _sum_heads(gk, n_kv)
            dv[:, tile.keys, kh] += _sum_heads(gv, n_kv)
            del gq, gk, gv  # before the next tile's: only one tile's temporaries live
        del kc, vc


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
