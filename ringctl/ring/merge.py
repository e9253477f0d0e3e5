"""Merge of partial attention results by log-sum-exp (online softmax across blocks).

With ``lse' = logaddexp(lse, lse_b)`` the merged output is
``exp(lse - lse')*o + exp(lse_b - lse')*o_b = o + sigmoid(lse_b - lse) * (o_b - o)``,
one in-place ``lerp_``. The sigmoid form needs no exp of large numbers, and rows that have
seen no key yet (``lse = -inf``, ``o = 0``) take the block's values exactly. Only -inf on
both sides gives NaN in the weight; those rows keep (0, -inf).
"""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else merges in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_block(
    out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor
) -> None:
    """Fold one block's ``(block_out, block_lse)`` into ``(out, lse)`` in place.

    ``out``/``block_out`` are ``(B, S, H, D)``, ``lse``/``block_lse`` ``(B, H, S)``; ``out`` and
    ``lse`` must be in the accumulation dtype (they may be views of larger buffers).
    """
    weight = torch.sigmoid(block_lse - lse).nan_to_num_(nan=0.0)  # NaN only for -inf vs -inf
    torch.logaddexp(lse, block_lse, out=lse)
    out.lerp_(block_out.to(out.dtype), weight.transpose(1, 2).unsqueeze(-1).to(out.dtype))


# A *packed partial* is one block's (or a merge's) out and lse in one tensor, as pass-Q and
# TokenRing send them: ``(B, S, H, D+1)`` in the accumulation dtype, out in ``[..., :D]`` and
# lse in ``[..., D]``. One message per hop instead of two.


def empty_partial(b: int, s: int, h: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """An uninitialised packed partial for ``h`` heads of dimension ``d`` (on ``like``'s
    device, in the accumulation dtype of ``like``'s dtype)."""
    return like.new_empty((b, s, h, d + 1), dtype=acc_dtype(like.dtype))


def reset_partial(part: torch.Tensor) -> torch.Tensor:
    """Set a packed partial to what nothing seen gives (out 0, lse -inf): what the first
    merge into it takes exactly."""
    part[..., :-1].zero_()
    part[..., -1].fill_(float("-inf"))
    return part


def partial_views(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out ``(B, S, H, D)``, lse ``(B, H, S)``) views of a packed partial, to compute or
    merge into in place."""
    return part[..., :-1], part[..., -1].transpose(1, 2)


def merge_partial(out: torch.Tensor, lse: torch.Tensor, part: torch.Tensor) -> None:
    """Fold a packed partial into ``(out, lse)`` (``merge_block``)."""
    merge_block(out, lse, *partial_views(part))
