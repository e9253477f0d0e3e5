"""Where an inference KV cache's tokens live on the ring (no torch import: the planner
prices the same placement the runtime's cache follows).

A context grows turn by turn: a long prompt, then a few new tokens per chat turn, then one
token per decode step. Each turn's tokens are placed on their own, so every turn keeps the
ranks balanced both in tokens held and in causal work (the load-balanced sharding of
arXiv 2411.01783, sec. 3.3, applied per turn):

- ``zigzag`` (the default): a turn of T tokens is cut into 2W chunks of T // 2W tokens;
  ring position p takes chunk p and chunk 2W-1-p (head and tail), so causal work within the
  turn is equal on every position, exactly as the zigzag training layout does. The last
  T mod 2W tokens (all of a decode step's single token) go one each to the positions next
  in round-robin order (a cursor carried across turns), so over a decode of many steps
  every position receives the same number of tokens, give or take one.
- ``contiguous``: the turn is cut into W consecutive runs, sizes differing by one at most
  (the longer runs on the positions next in the round-robin order). Tokens stay balanced;
  causal work does not (the last position's queries see the most keys).

Every position's tokens are in ascending global order (each turn's come after every
earlier turn's, and within a turn a position's runs ascend), which is what the runtime's
masks need. Everything here is integers: every rank computes every position's placement
without communicating.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ringctl.errors import ConfigError

#: how a cache places each turn's tokens on the ring positions
CACHE_LAYOUTS = ("zigzag", "contiguous")

#: (first global position, length) of consecutive tokens
Run = tuple[int, int]


def _merge(runs: list[Run]) -> list[Run]:
    out: list[Run] = []
    for start, length in runs:
        if length <= 0:
            continue
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


def split_turn(start: int, count: int, world: int, cursor: int, layout: str = "zigzag") -> tuple[list[list[Run]], int]:
    """Runs of a turn of ``count`` tokens at global positions ``start ..`` for each ring
    position, ascending, and the round-robin cursor the next turn starts from."""
    if layout not in CACHE_LAYOUTS:
        raise ConfigError("cache layout", layout, " | ".join(CACHE_LAYOUTS))
    runs: list[list[Run]] = [[] for _ in range(world)]
    if layout == "contiguous":
        base, extra = divmod(count, world)
        longer = {(cursor + i) % world for i in range(extra)}
        at = start
        for p in range(world):
            n = base + (p in longer)
            runs[p].append((at, n))
            at += n
        return [_merge(r) for r in runs], (cursor + extra) % world
    chunk = count // (2 * world)
    if chunk:
        for p in range(world):
            runs[p].append((start + p * chunk, chunk))
            runs[p].append((start + (2 * world - 1 - p) * chunk, chunk))
    rest = count - 2 * world * chunk
    first = start + 2 * world * chunk
    for i in range(rest):
        runs[(cursor + i) % world].append((first + i, 1))
    return [_merge(sorted(r)) for r in runs], (cursor + rest) % world


def run_tokens(runs: list[Run]) -> int:
    return sum(length for _, length in runs)


@dataclass(frozen=True)
class Turn:
    """One turn's placement: ``new[p]`` the runs ring position p receives, and how many
    tokens each position holds before (``held_before``) and after it."""

    start: int
    count: int
    new: tuple[tuple[Run, ...], ...]
    held_before: tuple[int, ...]

    @property
    def new_counts(self) -> tuple[int, ...]:
        return tuple(run_tokens(list(r)) for r in self.new)

    @property
    def held_after(self) -> tuple[int, ...]:
        return tuple(a + b for a, b in zip(self.held_before, self.new_counts, strict=True))

    @property
    def max_new(self) -> int:
        """Rows of the padded query block every position sends in pass-Q."""
        return max(self.new_counts)

    @property
    def max_held(self) -> int:
        """Rows of the padded K/V block every position sends in pass-KV."""
        return max(self.held_after)


@dataclass
class Placement:
    """The placement state of one context: every ring position's runs so far, the
    round-robin cursor and the context length. Deterministic: every rank that applies the
    same turns holds the same state."""

    world_size: int
    layout: str = "zigzag"
    length: int = 0
    cursor: int = 0
    runs: list[list[Run]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.layout not in CACHE_LAYOUTS:
            raise ConfigError("cache layout", self.layout, " | ".join(CACHE_LAYOUTS))
        if not self.runs:
            self.runs = [[] for _ in range(self.world_size)]

    def counts(self) -> tuple[int, ...]:
        return tuple(run_tokens(r) for r in self.runs)

    def peek(self, count: int) -> Turn:
        """The placement the next turn of ``count`` tokens would get (state unchanged)."""
        new, _ = split_turn(self.length, count, self.world_size, self.cursor, self.layout)
        return Turn(self.length, count, tuple(tuple(r) for r in new), self.counts())

    def extend(self, count: int) -> Turn:
        """Place a turn of ``count`` tokens at the end of the context."""
        turn = self.peek(count)
        _, self.cursor = split_turn(self.length, count, self.world_size, self.cursor, self.layout)
        for p, runs in enumerate(turn.new):
            self.runs[p] = _merge(self.runs[p] + list(runs))
        self.length += count
        return turn

    def imbalance(self) -> float:
        """max / mean tokens per position (1.0: perfectly even)."""
        counts = self.counts()
        mean = sum(counts) / len(counts)
        return max(counts) / mean if mean else 1.0


def placement_after(world_size: int, turns: list[int], layout: str = "zigzag") -> Placement:
    """The placement of a context built from ``turns`` (token counts, in order)."""
    placement = Placement(world_size, layout)
    for count in turns:
        placement.extend(count)
    return placement
