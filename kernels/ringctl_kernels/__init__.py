"""Triton block kernels for ring attention (contract: docs/internals.md, "Block compute").

``block_forward`` / ``block_backward`` have the signatures of ``ringctl.ring.block``'s torch
reference; the runtime's dispatcher calls them on CUDA tensors (or everywhere with
``RINGCTL_BLOCK_IMPL=triton``; on CPU that needs ``TRITON_INTERPRET=1`` set before triton
is imported).
"""

from __future__ import annotations

from ._common import HEAD_DIMS, interpreting
from .attention_bwd import block_backward
from .attention_fwd import block_forward

__all__ = ["HEAD_DIMS", "block_backward", "block_forward", "interpreting"]
