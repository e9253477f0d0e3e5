"""A RingPlan turned into ring *levels*, the only thing the ring loop needs to know.

Ring position p is a mixed-radix number; each level is one digit. A level of ``size`` m and
``stride`` t moves K/V between positions that differ by t in that digit (mod m). The loop
runs level 0's ring, and at every step of it the whole ring of level 1, and so on:

- flat: one level (W, 1): the pass-KV ring over all positions in plan order.
- hierarchical: levels (N, L) and (L, 1): the outer ring across nodes (peer (n+1, l)),
  and inside each outer step the inner ring over the node (peer (n, l+1)).

So the hierarchical schedule is the flat loop nested, not a second copy of it.

A bidirectional plan (``plan.direction``) runs two *lanes* in lock-step: lane 0 on these
levels, lane 1 on ``Schedule.reversed()``, every level walked the other way (send to the
previous peer, receive from the next), so each level's two neighbours both carry half.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ringctl.plan import ALGORITHMS


@dataclass(frozen=True)
class Level:
    """One ring of the schedule as seen by one rank; peers are ranks within the group."""

    size: int
    stride: int
    send_to: int
    recv_from: int
    #: +1: blocks move to higher digits (the held block comes from digit - step); -1: the
    #: reverse walk of a bidirectional plan's second lane (from digit + step)
    sign: int = 1

    def reversed(self) -> Level:
        return Level(self.size, self.stride, self.recv_from, self.send_to, -self.sign)


@dataclass(frozen=True)
class Schedule:
    """Where this rank sits and which levels it runs; ``link_class`` comes from the plan."""

    rank: int
    position: int
    world_size: int
    levels: tuple[Level, ...]
    link_class: Callable[[int, int], str]
    #: "one_way", "bidirectional" or "tokenring" (ringctl.plan.DIRECTIONS): what travels
    #: and how many lanes the loop runs
    direction: str = "one_way"
    #: the plan's ring order (ring position -> rank within the group): where partial results
    #: go back to their owner (TokenRing)
    ring_order: tuple[int, ...] = ()

    @property
    def lanes(self) -> int:
        """Lanes the ring loop runs: 2 for a bidirectional plan on more than one rank."""
        return 2 if self.direction == "bidirectional" and self.world_size > 1 else 1

    def reversed(self) -> Schedule:
        """The same levels walked the other way (a bidirectional plan's second lane)."""
        return replace(self, levels=tuple(level.reversed() for level in self.levels))

    def holder(self, steps: Sequence[int]) -> int:
        """Ring position that holds this rank's own block after ``steps[i]`` hops on level i
        (the inverse of ``source``)."""
        dst = 0
        for level, step in zip(self.levels, steps, strict=True):
            digit = (self.position // level.stride) % level.size
            dst += ((digit + level.sign * step) % level.size) * level.stride
        return dst

    def source(self, steps: Sequence[int]) -> int:
        """Ring position whose K/V this rank holds after ``steps[i]`` hops on level i."""
        src = 0
        for level, step in zip(self.levels, steps, strict=True):
            digit = (self.position // level.stride) % level.size
            src += ((digit - level.sign * step) % level.size) * level.stride
        return src


def level_sizes(plan: Any) -> tuple[tuple[int, int], ...]:
    """(size, stride) of each level for ``plan``; ValueError if the plan cannot be run."""
    world = plan.world_size
    if plan.algorithm == "flat":
        return ((world, 1),)
    if plan.algorithm == "hierarchical":
        nodes, inner = plan.nodes, plan.inner_size
        if nodes * inner != world:
            raise ValueError(
                f"plan has nodes={nodes} x inner_size={inner} != world_size={world}; a "
                "hierarchical plan needs the same number of ranks on every node"
            )
        return ((nodes, inner), (inner, 1))
    raise ValueError(f"plan.algorithm={plan.algorithm!r}; allowed: {', '.join(ALGORITHMS)}")


def make_schedule(plan: Any, rank: int) -> Schedule:
    """The levels ``rank`` (a rank within the plan's group) runs under ``plan``."""
    order = tuple(plan.ring_order)
    world = plan.world_size
    if sorted(order) != list(range(world)):
        raise ValueError(f"plan.ring_order={order} is not a permutation of 0..{world - 1}")
    position = order.index(rank)
    levels = []
    for size, stride in level_sizes(plan):
        digit = (position // stride) % size
        base = position - digit * stride
        levels.append(
            Level(
                size=size,
                stride=stride,
                send_to=order[base + (digit + 1) % size * stride],
                recv_from=order[base + (digit - 1) % size * stride],
            )
        )
    direction = getattr(plan, "direction", "one_way")
    return Schedule(rank, position, world, tuple(levels), plan.link_class, direction, order)
