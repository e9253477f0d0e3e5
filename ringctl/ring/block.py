"""Attention of one query block against one K/V block, with log-sum-exp (docs/internals.md).

``block_forward`` / ``block_backward`` are the one place the ring computes; they dispatch to
the Triton kernels (``ringctl_kernels``, same signatures) for CUDA tensors, or to the torch
implementation here. ``RINGCTL_BLOCK_IMPL=torch|triton`` forces one.

The torch implementation first reduces the mask to *tiles*: global positions are ascending
in every shard, so the keys a query row sees are a prefix of the block, rows that see
nothing are a prefix of the rows, and a block is either hidden, fully visible, top-left
causal (diagonal blocks of every layout, striped off-diagonals) or, rarely, needs an
explicit mask, which is then built per chunk of rows so memory stays bounded. On CPU each
tile runs ATen's fused flash kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its
backward, which takes the ring's final out/lse like the contract asks); elsewhere, a
chunked matmul version. Inputs are computed in the accumulation dtype (float32, or
float64 for float64), so block results carry no bf16/fp16 rounding into the merge.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

import torch

from .merge import acc_dtype

IMPL_ENV = "RINGCTL_BLOCK_IMPL"
IMPLS = ("torch", "triton")
# rows per chunk when a tile needs an explicit mask (or on the matmul path)
CHUNK_ROWS = 256
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


# ---------------------------------------------------------------- dispatch


@cache
def _kernels_module() -> ModuleType | None:
    try:
        import ringctl_kernels
    except ImportError:
        return None
    return ringctl_kernels


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


def tiles(sq: int, sk: int, q_pos: torch.Tensor | None, k_pos: torch.Tensor | None) -> list[Tile]:
    """The visible part of a block as tiles; [] if no query sees any key."""
    if q_pos is None or k_pos is None:
        return [Tile(slice(0, sq), slice(0, sk))]
    n_vis = torch.searchsorted(k_pos.cpu(), q_pos.cpu(), right=True)  # keys seen, per row
    first = int((n_vis == 0).sum())  # rows that see nothing come first
    if first == sq:
        return []
    n_vis = n_vis[first:]
    least, most = int(n_vis[0]), int(n_vis[-1])
    if least == most:
        return [Tile(slice(first, sq), slice(0, most))]
    if torch.equal(n_vis, torch.arange(1, sq - first + 1)):
        return [Tile(slice(first, sq), slice(0, most), causal=True)]
    out = []
    for start in range(0, sq - first, CHUNK_ROWS):
        counts = n_vis[start : start + CHUNK_ROWS]
        keys = int(counts[-1])
        visible = torch.arange(keys) < counts[:, None]
        rows = slice(first + start, first + start + counts.shape[0])
        out.append(Tile(rows, slice(0, keys), visible=visible.to(q_pos.device)))
    return out


# ---------------------------------------------------------------- torch implementation


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B,S,Hkv,D) -> (B,S,heads,D); query head h uses kv head h // (heads // Hkv)."""
    b, s, hkv, d = x.shape
    if hkv == heads:
        return x
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


def _tile_inputs(
    tile: Tile, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads = q.shape[2]
    return (
        _dense(q[:, tile.rows], dtype),
        _expand_heads(_dense(k[:, tile.keys], dtype), heads),
        _expand_heads(_dense(v[:, tile.keys], dtype), heads),
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
    tile_forward = _tile_path(q, path)[0]
    found = tiles(sq, k.shape[1], q_pos, k_pos)
    if len(found) == 1 and found[0].rows == slice(0, sq):  # all rows: no copy into zeros
        return tile_forward(*_tile_inputs(found[0], q, k, v, acc), scale, found[0])
    out = torch.zeros((b, sq, hq, d), dtype=acc, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=acc, device=q.device)
    for tile in found:
        qt, kt, vt = _tile_inputs(tile, q, k, v, acc)
        o, l = tile_forward(qt, kt, vt, scale, tile)
        out[:, tile.rows] = o
        lse[:, :, tile.rows] = l
    return out, lse


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
    hkv = k.shape[2]
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    tile_backward = _tile_path(q, path)[1]
    for tile in tiles(q.shape[1], k.shape[1], q_pos, k_pos):
        qt, kt, vt = _tile_inputs(tile, q, k, v, acc)
        rows = tile.rows
        dout_t, out_t = _dense(dout[:, rows], acc), _dense(out[:, rows], acc)
        grads = _Grads(dout_t, out_t, lse[:, :, rows].to(acc))
        gq, gk, gv = tile_backward(grads, qt, kt, vt, scale, tile)
        dq[:, rows] += gq
        dk[:, tile.keys] += _sum_heads(gk, hkv)
        dv[:, tile.keys] += _sum_heads(gv, hkv)
    return dq, dk, dv


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


# Tile functions take (B,S,H,D) inputs already in the acc dtype with expanded heads.


def _flash_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tile: Tile
) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, tile.causal,
        attn_mask=_mask_of(tile, q.dtype, q.device), scale=scale,
    )  # fmt: skip
    return o.transpose(1, 2), lse


def _flash_backward(
    g: _Grads, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tile: Tile
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    t = [x.transpose(1, 2) for x in (g.dout, q, k, v, g.out)]
    gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        *t, g.lse.contiguous(), 0.0, tile.causal,
        attn_mask=_mask_of(tile, q.dtype, q.device), scale=scale,
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tile: Tile
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
    g: _Grads, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tile: Tile
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
