"""Sequence layouts: which global tokens each ring position holds.

Layouts differ only here (their token sets are defined once, torch-free, in
ringctl.documents.shard_runs). A layout maps ring position p of W to global token indices
in ascending order; sharding gathers them and unsharding scatters them back, so the two are
exact inverses by construction. The ring runtime uses the same indices as mask positions.

- ``contiguous``: chunk p of W equal chunks.
- ``zigzag``: 2W chunks; position p holds chunks p and 2W-1-p (equal causal work).
- ``striped``: tokens p, p+W, p+2W, ... (Brandon et al., arXiv 2311.09431).
- ``docs``: every document of ``cu_seqlens`` cut in 2W chunks, position p holding chunks p
  and 2W-1-p of each (equal causal work per document, documents of any length). Shards hold
  ``ceil(S / W)`` rows: fewer than W internal pad rows in all (``layout_padding``), zeros
  after ``shard_sequence``, dropped by ``unshard_sequence``; their token position is -1 and
  their document -1 (they see nothing and nobody sees them). Without ``cu_seqlens`` the
  sequence is one document and S must be a multiple of W (then nothing is padded).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

from ringctl.documents import DOCS_LAYOUT, Run, shard_len, shard_runs
from ringctl.documents import layout_padding as _layout_padding
from ringctl.plan import LAYOUTS, seq_len_divisor

from .mask import as_cu_seqlens

__all__ = [
    "LAYOUTS",
    "check_layout",
    "document_ids",
    "document_positions",
    "layout_padding",
    "mask_positions",
    "seq_len_divisor",
    "shard_sequence",
    "token_positions",
    "unshard_sequence",
]


def check_layout(layout: object, argument: str = "layout") -> str:
    """Return ``layout`` if it is a known layout name, else raise ValueError naming it."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{argument}={layout!r} is not a layout; allowed: {', '.join(LAYOUTS)}")
    return layout


def check_world_size(world_size: object, argument: str = "world_size") -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{argument}={world_size!r} must be an int >= 1")
    return world_size


def _check_split(seq_len: int, layout: str, world_size: int, what: str, docs: bool) -> None:
    """ValueError when ``layout`` cannot split ``seq_len`` tokens over ``world_size``."""
    if layout == DOCS_LAYOUT:
        if not docs and seq_len % world_size:
            raise ValueError(
                f"{what}={seq_len} is not a multiple of world_size={world_size}: layout='docs' "
                f"pads it internally, so pass cu_seqlens (e.g. [0, {seq_len}] for one document) "
                "here and to ring_attention, which cannot tell the length otherwise"
            )
        return
    divisor = seq_len_divisor(layout, world_size)
    if seq_len % divisor:
        raise ValueError(
            f"{what}={seq_len} cannot be split by layout={layout!r} over "
            f"world_size={world_size}: it must be a multiple of {divisor}"
        )


@lru_cache(maxsize=64)
def _runs(
    layout: str, seq_len: int, world: int, cu: tuple[int, ...] | None
) -> tuple[tuple[Run, ...], ...]:
    return shard_runs(layout, seq_len, world, cu)


def _indices(runs: Sequence[Run], rows: int, device: Any) -> torch.Tensor:
    """The runs' tokens as one int64 vector of ``rows`` entries, -1 after them."""
    starts = torch.tensor([r.start for r in runs], dtype=torch.int64)
    counts = torch.tensor([r.count for r in runs], dtype=torch.int64)
    steps = torch.tensor([r.stride for r in runs], dtype=torch.int64)
    out = torch.full((rows,), -1, dtype=torch.int64)
    n = int(counts.sum())
    if n:
        offsets = torch.cumsum(counts, 0) - counts  # row of each run's first token
        at = torch.arange(n) - torch.repeat_interleave(offsets, counts)
        out[:n] = torch.repeat_interleave(starts, counts) + at * torch.repeat_interleave(steps, counts)
    return out.to(device)


def token_positions(
    seq_len: int,
    position: int,
    world_size: int,
    layout: str,
    *,
    cu_seqlens: Any = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Global token indices (int64, ascending) held by ring ``position`` of ``world_size``
    for a sequence of ``seq_len`` tokens (RoPE positions); ``docs``: -1 on its pad rows."""
    check_layout(layout)
    cu = as_cu_seqlens(cu_seqlens, seq_len)
    _check_split(seq_len, layout, world_size, "sequence length", cu is not None)
    runs = _runs(layout, seq_len, world_size, cu if layout == DOCS_LAYOUT else None)
    return _indices(runs[position], shard_len(layout, seq_len, world_size), device)


def document_ids(
    seq_len: int,
    position: int,
    world_size: int,
    layout: str,
    *,
    cu_seqlens: Any = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Document index of each row of ``position``'s shard: -1 for padding (tokens after the
    last boundary, and ``docs``'s pad rows). No ``cu_seqlens``: one document (0)."""
    pos = token_positions(seq_len, position, world_size, layout, cu_seqlens=cu_seqlens)
    cu = as_cu_seqlens(cu_seqlens, seq_len)
    bounds = torch.tensor(cu if cu is not None else (0, seq_len), dtype=torch.int64)
    doc = torch.searchsorted(bounds, pos, right=True) - 1
    return doc.masked_fill_((pos < 0) | (pos >= bounds[-1]), -1).to(device)


def document_positions(
    seq_len: int,
    position: int,
    world_size: int,
    layout: str,
    *,
    cu_seqlens: Any = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Position of each row within its document (restarting at 0 per document, as packed
    models number them); padding rows (document -1) get 0."""
    pos = token_positions(seq_len, position, world_size, layout, cu_seqlens=cu_seqlens)
    cu = as_cu_seqlens(cu_seqlens, seq_len)
    bounds = torch.tensor(cu if cu is not None else (0, seq_len), dtype=torch.int64)
    doc = (torch.searchsorted(bounds, pos, right=True) - 1).clamp_(0, max(bounds.numel() - 2, 0))
    out = pos - bounds[doc]
    return out.masked_fill_((pos < 0) | (pos >= bounds[-1]), 0).to(device)


def mask_positions(
    local_len: int,
    position: int,
    world_size: int,
    layout: str,
    *,
    cu_seqlens: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Ascending global positions (CPU int64) of ``position``'s shard of ``local_len`` rows,
    as the ring's mask sees them: rows holding no document token (padding after the last
    boundary, ``docs``'s pad rows) get positions from ``cu_seqlens[-1]`` on, so they are in
    no document. The global length is ``local_len * world_size`` (for ``docs``, where S is
    not known from the shards, only the document tokens are placed: they need no S)."""
    if layout != DOCS_LAYOUT:
        return token_positions(local_len * world_size, position, world_size, layout)
    total = cu_seqlens[-1] if cu_seqlens is not None else local_len * world_size
    runs = _runs(layout, total, world_size, cu_seqlens)[position]
    out = _indices(runs, local_len, None)
    free = out < 0
    out[free] = total + torch.arange(int(free.sum()), dtype=torch.int64)
    return out


def layout_padding(cu_seqlens: Any, world_size: int, seq_len: int | None = None) -> int:
    """Internal pad rows the ``docs`` layout adds for these documents over ``world_size``
    positions (all shards together; fewer than ``world_size``). ``seq_len`` defaults to the
    documents' total (no padding of the user's after the last boundary)."""
    check_world_size(world_size)
    cu = as_cu_seqlens(cu_seqlens, seq_len)
    length = seq_len if seq_len is not None else (cu[-1] if cu is not None else 0)
    return _layout_padding(length, world_size)


def _check_dim(x: torch.Tensor, dim: object, argument: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is out of range for {argument} with shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_sequence(
    x: torch.Tensor,
    position: int,
    world_size: int,
    *,
    layout: str = "zigzag",
    dim: int = 1,
    cu_seqlens: Any = None,
) -> torch.Tensor:
    """The part of ``x`` (split along ``dim``) that ring ``position`` holds; contiguous.
    ``cu_seqlens`` (checked against ``x``'s length) places the ``docs`` layout's documents;
    its pad rows are zeros."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_layout(layout)
    check_world_size(world_size)
    is_int = isinstance(position, int) and not isinstance(position, bool)
    if not is_int or not 0 <= position < world_size:
        raise ValueError(f"position={position!r} must be an int in [0, {world_size})")
    dim = _check_dim(x, dim, "x")
    seq_len = x.shape[dim]
    cu = as_cu_seqlens(cu_seqlens, seq_len)
    _check_split(seq_len, layout, world_size, f"x.shape[{dim}]", cu is not None)
    index = token_positions(seq_len, position, world_size, layout, cu_seqlens=cu, device=x.device)
    real = int((index >= 0).sum())
    if real == index.shape[0]:
        return x.index_select(dim, index)
    shape = list(x.shape)
    shape[dim] = index.shape[0]
    out = x.new_zeros(shape)
    out.narrow(dim, 0, real).copy_(x.index_select(dim, index[:real]))
    return out


def unshard_sequence(
    shards: Sequence[torch.Tensor],
    *,
    layout: str = "zigzag",
    dim: int = 1,
    cu_seqlens: Any = None,
    seq_len: int | None = None,
) -> torch.Tensor:
    """Reassemble the full sequence from ``shards`` listed in ring-position order. For
    ``docs``, pass the ``cu_seqlens`` the shards were made with, and ``seq_len`` when the
    sequence was longer than ``cu_seqlens[-1]`` (default: that total; without documents,
    all rows of the shards)."""
    check_layout(layout)
    if isinstance(shards, torch.Tensor) or not isinstance(shards, Sequence) or not shards:
        raise ValueError("shards must be a non-empty list of tensors, one per ring position")
    first = shards[0]
    for i, shard in enumerate(shards):
        if not isinstance(shard, torch.Tensor):
            raise ValueError(f"shards[{i}] must be a torch.Tensor, got {type(shard).__name__}")
        if (shard.shape, shard.dtype, shard.device) != (first.shape, first.dtype, first.device):
            raise ValueError(
                f"shards[{i}] has shape {tuple(shard.shape)}, dtype {shard.dtype}, device "
                f"{shard.device}; shards[0] has {tuple(first.shape)}, {first.dtype}, "
                f"{first.device}; all shards must match"
            )
    dim = _check_dim(first, dim, "shards[0]")
    world_size = len(shards)
    local = first.shape[dim]
    if layout == "zigzag" and local % 2:
        raise ValueError(
            f"shards have length {local} along dim {dim}; layout='zigzag' needs an even length"
        )
    total = local * world_size
    cu = as_cu_seqlens(cu_seqlens, seq_len if seq_len is not None else total)
    if layout == DOCS_LAYOUT:
        if seq_len is not None:
            is_int = isinstance(seq_len, int) and not isinstance(seq_len, bool)
            if not is_int or seq_len < 1 or shard_len(layout, seq_len, world_size) != local:
                raise ValueError(
                    f"seq_len={seq_len!r} does not fit shards of {local} rows over "
                    f"{world_size} positions; allowed: {total - world_size + 1}..{total}"
                )
            total = seq_len
        elif cu is not None:
            total = cu[-1]
            if shard_len(layout, total, world_size) != local:
                raise ValueError(
                    f"shards of {local} rows were not made from cu_seqlens[-1]={total} tokens "
                    f"over {world_size} positions; pass seq_len (the length given to "
                    "shard_sequence)"
                )
    shape = list(first.shape)
    shape[dim] = total
    full = first.new_empty(shape)
    for position, shard in enumerate(shards):
        index = token_positions(total, position, world_size, layout, cu_seqlens=cu, device=first.device)
        real = int((index >= 0).sum())
        full.index_copy_(dim, index[:real], shard.narrow(dim, 0, real))
    return full
