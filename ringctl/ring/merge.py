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
