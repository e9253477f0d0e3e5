"""Sequence layouts: which global tokens each ring position holds.

Layouts differ only here. A layout maps ring position p of W to a sorted list of global
token indices; sharding is an index_select with those indices and unsharding scatters
them back, so both are exact inverses by construction. The ring runtime uses the same
indices as causal-mask positions (query i sees key j iff k_pos[j] <= q_pos[i]).

- ``contiguous``: chunk p of W equal chunks.
- ``zigzag``: 2W chunks; position p holds chunks p and 2W-1-p (equal causal work).
- ``striped``: tokens p, p+W, p+2W, ... (Brandon et al., arXiv 2311.09431).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ringctl.plan import LAYOUTS, seq_len_divisor

__all__ = ["LAYOUTS", "check_layout", "seq_len_divisor", "shard_sequence", "token_positions", "unshard_sequence"]


def check_layout(layout: object, argument: str = "layout") -> str:
    """Return ``layout`` if it is a known layout name, else raise ValueError naming it."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"{argument}={layout!r} is not a layout; allowed: {', '.join(LAYOUTS)}")
    return layout


def check_world_size(world_size: object, argument: str = "world_size") -> int:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"{argument}={world_size!r} must be an int >= 1")
    return world_size


def token_positions(
    seq_len: int,
    position: int,
    world_size: int,
    layout: str,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Global token indices (int64, ascending) held by ring ``position`` of ``world_size``."""
    check_layout(layout)
    divisor = seq_len_divisor(layout, world_size)
    if seq_len % divisor:
        raise ValueError(
            f"sequence length {seq_len} cannot be split by layout {layout!r} over "
            f"{world_size} positions: it must be a multiple of {divisor}"
        )
    if layout == "striped":
        return torch.arange(position, seq_len, world_size, device=device)
    chunk = seq_len // divisor
    first = torch.arange(position * chunk, (position + 1) * chunk, device=device)
    if layout == "contiguous":
        return first
    last = 2 * world_size - 1 - position
    return torch.cat([first, torch.arange(last * chunk, (last + 1) * chunk, device=device)])


def _check_dim(x: torch.Tensor, dim: object, argument: str) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim!r} is out of range for {argument} with shape {tuple(x.shape)}")
    return dim % x.dim()


def shard_sequence(
    x: torch.Tensor, position: int, world_size: int, *, layout: str = "zigzag", dim: int = 1
) -> torch.Tensor:
    """The part of ``x`` (split along ``dim``) that ring ``position`` holds; contiguous."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_layout(layout)
    check_world_size(world_size)
    is_int = isinstance(position, int) and not isinstance(position, bool)
    if not is_int or not 0 <= position < world_size:
        raise ValueError(f"position={position!r} must be an int in [0, {world_size})")
    dim = _check_dim(x, dim, "x")
    seq_len = x.shape[dim]
    divisor = seq_len_divisor(layout, world_size)
    if seq_len % divisor:
        raise ValueError(
            f"x.shape[{dim}]={seq_len} cannot be split by layout={layout!r} over "
            f"world_size={world_size}: it must be a multiple of {divisor}"
        )
    index = token_positions(seq_len, position, world_size, layout, device=x.device)
    return x.index_select(dim, index)


def unshard_sequence(
    shards: Sequence[torch.Tensor], *, layout: str = "zigzag", dim: int = 1
) -> torch.Tensor:
    """Reassemble the full sequence from ``shards`` listed in ring-position order."""
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
    shape = list(first.shape)
    shape[dim] = local * world_size
    full = first.new_empty(shape)
    for position, shard in enumerate(shards):
        index = token_positions(shape[dim], position, world_size, layout, device=first.device)
        full.index_copy_(dim, index, shard)
    return full
