"""The one attention mask: a function of global token positions and document boundaries.

Query token i sees key token j iff both lie in the same document of ``cu_seqlens`` (tokens
from the last boundary on are padding: they see nothing and nobody sees them), ``j <= i``
when causal, and ``i - j <= left``, ``j - i <= right`` for ``window = (left, right)``
(flash-attn's convention, -1 = unbounded). No documents: one document over everything.

Every layout keeps a shard's global positions ascending, so the keys a query row sees in a
block form one contiguous range ``[lo, hi)`` of the block's keys, and ``lo``, ``hi`` never
decrease down the rows: ``MaskSpec.ranges`` is the whole mask of a block in two int vectors.
The block compute (torch tiles, Triton kernels) works from these ranges only.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ringctl.documents import check_cu_seqlens, check_window

__all__ = ["MaskSpec", "as_cu_seqlens"]

_NO_END = 2**62  # "after every position": the end of the one document when there are none


def as_cu_seqlens(
    value: Any,
    seq_len: int | None = None,
    *,
    argument: str = "cu_seqlens",
    device: torch.device | None = None,
) -> tuple[int, ...] | None:
    """Document boundaries given as a 1-D integer tensor or a list, as a tuple of ints (None
    stays None). Checked: integer dtype, on the CPU or ``device``, starts at 0, strictly
    increasing, last <= ``seq_len``; ValueError naming ``argument`` otherwise."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 1:
            raise ValueError(
                f"{argument} must be a 1-D tensor [0, l1, l1+l2, ..., total]; got shape "
                f"{tuple(value.shape)}"
            )
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(
                f"{argument}.dtype={value.dtype}; allowed: an integer dtype (int32, int64)"
            )
        if value.device.type != "cpu" and (device is None or value.device != device):
            where = f"the CPU or {device}" if device is not None else "the CPU"
            raise ValueError(f"{argument} is on {value.device}; allowed: {where} (q's device)")
        value = value.tolist()
    return check_cu_seqlens(value, seq_len, argument)


@dataclass(frozen=True)
class MaskSpec:
    """Documents (``cu_seqlens``, None: one document), causal, and a window (left, right)."""

    cu_seqlens: tuple[int, ...] | None = None
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    _cu: list[torch.Tensor] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal={self.causal!r} must be a bool")
        object.__setattr__(self, "window", check_window(self.window))
        if self.cu_seqlens is not None:
            object.__setattr__(self, "cu_seqlens", check_cu_seqlens(self.cu_seqlens))

    @property
    def is_full(self) -> bool:
        """Every query sees every key: no positions needed at all."""
        return not self.causal and self.cu_seqlens is None and self.window == (-1, -1)

    @property
    def total(self) -> int | None:
        """Tokens in documents (positions from here on are padding); None without documents."""
        return None if self.cu_seqlens is None else self.cu_seqlens[-1]

    def digest(self) -> int:
        """A 62-bit fingerprint of the documents (0 without), the same in every process: the
        ring checks that every rank was given the same boundaries."""
        if self.cu_seqlens is None:
            return 0
        data = ",".join(map(str, self.cu_seqlens)).encode()
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 2

    def _boundaries(self) -> torch.Tensor:
        if not self._cu:
            self._cu.append(torch.tensor(self.cu_seqlens, dtype=torch.int64))
        return self._cu[0]

    def key_bounds(self, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global positions ``[a, b)`` each query may see (on q_pos's device); rows outside
        every document get the empty range at ``total``. Non-decreasing when q_pos is."""
        q = q_pos.to(torch.int64)
        if self.cu_seqlens is None:
            a = torch.zeros_like(q)
            b = torch.full_like(q, _NO_END)
            inside = None
        else:
            cu = self._boundaries().to(q.device)
            docs = cu.numel() - 1
            total = self.cu_seqlens[-1]
            d = (torch.searchsorted(cu, q, right=True) - 1).clamp_(0, max(docs - 1, 0))
            inside = (q >= 0) & (q < total)
            a = cu[d] if docs else torch.zeros_like(q)
            b = cu[d + 1] if docs else torch.zeros_like(q)
        left, right = self.window
        if self.causal:
            b = torch.minimum(b, q + 1)
        if right >= 0:
            b = torch.minimum(b, q + right + 1)
        if left >= 0:
            a = torch.maximum(a, q - left)
        if inside is not None:
            end = torch.full_like(q, self.cu_seqlens[-1])  # type: ignore[index]
            a = torch.where(inside, a, end)
            b = torch.where(inside, b, end)
        return a, b

    def ranges(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lo, hi)``, int64 like q_pos: query row i sees keys ``lo[i] <= j < hi[i]`` of the
        block whose ascending global positions are ``k_pos``; both never decrease."""
        if self.is_full:
            n = q_pos.shape[0]
            zeros = torch.zeros(n, dtype=torch.int64, device=q_pos.device)
            return zeros, torch.full_like(zeros, k_pos.shape[0])
        a, b = self.key_bounds(q_pos)
        k = k_pos.to(device=q_pos.device, dtype=torch.int64)
        lo = torch.searchsorted(k, a)
        hi = torch.maximum(torch.searchsorted(k, b), lo)
        return lo, hi
