"""Point-to-point ring hops with byte counters per (phase, link class).

A hop sends one tensor (or several, one message each) to a peer and receives as many of
the same shapes from another, posted together with ``batch_isend_irecv`` so the transfer
runs while the caller computes; ``Hop.wait()`` returns what was received. Every message of
a hop has its own tag (``tag + i`` for the i-th tensor) and the ring gives each channel and
chunk its own tags, so gloo never pairs a K/V message with an accumulator one.

Counters record bytes *sent* by this process, classified by the plan's ``link_class`` and
by direction: "next" (a lane walking ring order) or "prev" (a bidirectional plan's second
lane, walking it backwards); tests compare them with ``RingPlan.predicted_bytes``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ringctl.plan import HOP_DIRECTIONS, PHASES
from ringctl.topology import LINKS as LINK_CLASSES

_SENT: defaultdict[tuple[str, str, str], int] = defaultdict(int)


def comm_stats(by_direction: bool = False) -> dict[str, dict[str, Any]]:
    """Bytes this process sent since the last reset: ``{phase: {link_class: bytes}}``, or
    with ``by_direction`` ``{phase: {link_class: {"next"|"prev": bytes}}}``."""
    if by_direction:
        stats: dict[str, dict[str, Any]] = {
            phase: {link: dict.fromkeys(HOP_DIRECTIONS, 0) for link in LINK_CLASSES}
            for phase in PHASES
        }
        for (phase, link, direction), sent in _SENT.items():
            stats.setdefault(phase, {}).setdefault(link, {})[direction] = sent
        return stats
    stats = {phase: dict.fromkeys(LINK_CLASSES, 0) for phase in PHASES}
    for (phase, link, _direction), sent in _SENT.items():
        stats.setdefault(phase, {})[link] = stats[phase].get(link, 0) + sent
    return stats


def reset_comm_stats() -> None:
    _SENT.clear()


class Hop:
    """One posted send/recv pair; ``wait()`` once, then the received tensor(s) are ready."""

    def __init__(
        self, works: list[dist.Work], received: torch.Tensor | tuple[torch.Tensor, ...] | None
    ) -> None:
        self._works: list[dist.Work] | None = works
        self._received = received

    def wait(self) -> Any:
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
        tensor: torch.Tensor | Sequence[torch.Tensor],
        send_to: int,
        recv_from: int,
        tag: int,
        into: torch.Tensor | Sequence[torch.Tensor] | None = None,
        direction: str = "next",
    ) -> Hop:
        """Send ``tensor`` to ``send_to``; receive its successor from ``recv_from`` into
        ``into`` (a buffer like ``tensor``, not in flight; a new one if None). A sequence of
        tensors is sent as one message each (tags ``tag``, ``tag + 1``, ...) and received into
        a sequence of buffers; ``wait()`` then returns a tuple. ``direction`` ("next" or
        "prev": which way the lane walks the ring) only labels the byte counter."""
        return self.hops([(tensor, send_to, recv_from, tag, into, direction)])[0]

    def hops(self, specs: Sequence[tuple[Any, int | None, int | None, int, Any, str]]) -> list[Hop]:
        """Several hops (``hop``'s arguments each) posted at once: every receive of all of
        them before any send. Why: a gloo send starts only once the peer's "receive ready"
        notice arrives, and that notice travels on the same TCP stream as the peer's own
        data. A send posted first lets a peer queue its notice behind a whole block it is
        already sending, so the two directions of a pair run one after the other: measured
        6.1 vs 12.0 MB/s per direction on the 100 Mbit/s fabric (the 2-node outer ring).
        The two lanes of a bidirectional ring send both ways over every pair, so their
        receives must all be posted before either lane sends.

        One side may be left out: ``send_to=None`` posts the receive alone (``tensor`` only
        gives its shapes when ``into`` is None), ``recv_from=None`` the send alone (its
        ``wait()`` returns None). Why: a receive posted early, with the step's other hops,
        lets a peer send the moment its data is ready (TokenRing's partials)."""
        recv_ops: list[dist.P2POp] = []
        send_ops: list[dist.P2POp] = []
        posted: list[tuple[bool, list[torch.Tensor] | None, int, int, int, int]] = []
        for tensor, send_to, recv_from, tag, into, direction in specs:
            single = isinstance(tensor, torch.Tensor)
            sends: list[torch.Tensor] = [tensor] if single else list(tensor)
            recvs: list[torch.Tensor] | None = None
            if recv_from is not None:
                if into is None:
                    recvs = [torch.empty_like(t) for t in sends]
                else:
                    recvs = [into] if isinstance(into, torch.Tensor) else list(into)
                if len(recvs) != len(sends):
                    raise RuntimeError("a hop receives as many tensors as it sends")
            r0, s0 = len(recv_ops), len(send_ops)
            for i, sent in enumerate(sends):
                received = recvs[i] if recvs is not None else sent
                if not (sent.is_contiguous() and received.is_contiguous()):
                    raise RuntimeError("ring hops need contiguous tensors (gloo refuses others)")
                if received.shape != sent.shape or received.dtype != sent.dtype:
                    raise RuntimeError(
                        "a hop receives into a buffer of the sent tensor's shape and dtype"
                    )
                if recv_from is not None:
                    recv_ops.append(
                        dist.P2POp(
                            dist.irecv, received, group=self.group, group_peer=recv_from, tag=tag + i
                        )
                    )
                if send_to is not None:
                    send_ops.append(
                        dist.P2POp(dist.isend, sent, group=self.group, group_peer=send_to, tag=tag + i)
                    )
            posted.append((single, recvs, r0, len(recv_ops), s0, len(send_ops)))
            if send_to is not None:
                link = self._link_class(self.rank, send_to)
                _SENT[(self.phase, link, direction)] += sum(t.numel() * t.element_size() for t in sends)
        works = dist.batch_isend_irecv(recv_ops + send_ops) if recv_ops or send_ops else []
        n = len(recv_ops)  # gloo posts them in this order: every receive, then every send
        return [
            Hop(
                works[ra:rb] + works[n + sa : n + sb],
                None if recvs is None else recvs[0] if single else tuple(recvs),
            )
            for single, recvs, ra, rb, sa, sb in posted
        ]
