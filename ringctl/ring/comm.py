"""Point-to-point ring hops with byte counters per (phase, link class).

A hop sends one tensor to a peer and receives one of the same shape from another, posted
together with ``batch_isend_irecv`` so the transfer runs while the caller computes;
``Hop.wait()`` returns the received tensor. Each channel (K/V or dK/dV accumulator, at each
ring level) has its own tag, so gloo never pairs a K/V message with an accumulator one.

Counters record bytes *sent* by this process, classified by the plan's ``link_class``;
tests compare them with ``RingPlan.predicted_bytes``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
import torch.distributed as dist

from ringctl.plan import PHASES
from ringctl.topology import LINKS as LINK_CLASSES

_SENT: defaultdict[tuple[str, str], int] = defaultdict(int)


def comm_stats() -> dict[str, dict[str, int]]:
    """Bytes this process sent since the last reset: ``{phase: {link_class: bytes}}``."""
    stats = {phase: dict.fromkeys(LINK_CLASSES, 0) for phase in PHASES}
    for (phase, link), sent in _SENT.items():
        stats.setdefault(phase, {})[link] = sent
    return stats


def reset_comm_stats() -> None:
    _SENT.clear()


class Hop:
    """One posted send/recv pair; ``wait()`` once, then the received tensor is ready."""

    def __init__(self, works: list[dist.Work], received: torch.Tensor) -> None:
        self._works: list[dist.Work] | None = works
        self._received = received

    def wait(self) -> torch.Tensor:
        if self._works is None:
            raise RuntimeError("Hop.wait() called twice")
        for work in self._works:
            work.wait()
        self._works = None
        return self._received


class RingComm:
    """Posts hops for one rank of ``group`` in one phase and counts what it sends.

    Peers are ranks *within* ``group`` (the plan's numbering); ``link_class(src, dst)``
    classifies each send.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        rank: int,
        phase: str,
        link_class: Callable[[int, int], str],
    ) -> None:
        if phase not in PHASES:
            raise ValueError(f"phase={phase!r}; allowed: {PHASES}")
        self.group = group
        self.rank = rank
        self.phase = phase
        self._link_class = link_class

    def hop(
        self,
        tensor: torch.Tensor,
        send_to: int,
        recv_from: int,
        tag: int,
        into: torch.Tensor | None = None,
    ) -> Hop:
        """Send ``tensor`` to ``send_to``; receive its successor from ``recv_from`` into
        ``into`` (a buffer like ``tensor``, not in flight; a new one if None)."""
        received = torch.empty_like(tensor) if into is None else into
        if not (tensor.is_contiguous() and received.is_contiguous()):
            raise RuntimeError("ring hops need contiguous tensors (gloo refuses others)")
        if received.shape != tensor.shape or received.dtype != tensor.dtype:
            raise RuntimeError("a hop receives into a buffer of the sent tensor's shape and dtype")
        # irecv before isend: a gloo send starts only once the peer's "receive ready"
        # notice arrives, and that notice travels on the same TCP stream as the peer's own
        # data. Posting the send first lets a peer queue its notice behind a whole block it
        # is already sending, so the two directions of a pair (the 2-node outer ring) run one
        # after the other: measured 6.1 vs 12.0 MB/s per direction on the 100 Mbit/s fabric.
        ops = [
            dist.P2POp(dist.irecv, received, group=self.group, group_peer=recv_from, tag=tag),
            dist.P2POp(dist.isend, tensor, group=self.group, group_peer=send_to, tag=tag),
        ]
        works = dist.batch_isend_irecv(ops)
        link = self._link_class(self.rank, send_to)
        _SENT[(self.phase, link)] += tensor.numel() * tensor.element_size()
        return Hop(works, received)
