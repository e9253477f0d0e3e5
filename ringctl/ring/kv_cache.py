"""A KV cache sharded over the ring: this rank's share of a context's keys and values.

The context grows in *turns* (a prompt, a chat turn's new tokens, one decode step): each
turn's tokens are placed on the ring positions by ringctl.placement (zigzag head-and-tail
chunks per turn, the remainder round-robin), so tokens held and causal work stay balanced
after every append. Every rank applies the same turns to the same ``Placement``, so each
knows every position's token positions without communicating; only the keys and values
themselves are local.

Storage is allocated once for ``capacity`` tokens of the whole context, like a serving
engine's cache: per layer one ``(capacity_per_rank, 2, B, Hkv, D)`` tensor, zeroed. Token
rows are the outer dimension so that a position's first ``n`` tokens are one contiguous
block (what pass-KV sends) and appending a turn writes rows ``held .. held + n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ringctl.placement import CACHE_LAYOUTS, Placement, Run, Turn

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CacheError(ValueError):
    """A cache used with arguments it cannot take; the text names the argument."""


def _positions(runs: list[Run] | tuple[Run, ...]) -> torch.Tensor:
    """Global token positions of ``runs``, ascending, int64 on CPU."""
    if not runs:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(start, start + length, dtype=torch.int64) for start, length in runs])


@dataclass(frozen=True)
class CacheTurn:
    """The turn being computed: its placement, and on this rank the global positions of
    its new tokens (``positions``: the rows the model embeds, queries and appends)."""

    index: int
    turn: Turn
    positions: torch.Tensor
    #: the query positions of every ring position's new tokens (ascending, CPU)
    new_by_position: tuple[torch.Tensor, ...]
    #: every ring position's key positions after the turn (ascending, CPU)
    keys_by_position: tuple[torch.Tensor, ...]
    #: mode="auto"'s choice per query-head count, made once per turn for every layer
    #: (ringctl.ring.inference.resolve_mode): the cost model is Python, a decode step is not
    auto_modes: dict[int, str] = field(default_factory=dict, compare=False)

    @property
    def count(self) -> int:
        return self.turn.count

    @property
    def cached(self) -> int:
        """Tokens in the context before this turn (P)."""
        return self.turn.start


class RingKVCache:
    """This rank's keys and values of one context, every layer (see the module docstring).

    ``begin_turn(T)`` places the next T tokens (a collective: every rank of ``group`` calls
    it with the same T) and returns their positions on this rank; each layer then
    ``append``s its K/V for those tokens and calls ``ringctl.ring.cached_attention``.
    ``plan`` (a RingPlan; None: the rank-order ring) gives this rank's ring position.
    """

    def __init__(
        self,
        *,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        layout: str = "zigzag",
        plan: Any = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        for name, value in (("layers", layers), ("batch", batch), ("kv_heads", kv_heads),
                            ("head_dim", head_dim), ("capacity", capacity)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CacheError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
        if dtype not in _DTYPES:
            raise CacheError(f"dtype={dtype} is invalid; allowed: {', '.join(map(str, _DTYPES))}")
        if layout not in CACHE_LAYOUTS:
            raise CacheError(f"layout={layout!r} is invalid; allowed: {' | '.join(CACHE_LAYOUTS)}")
        if group is None and not dist.is_initialized():
            world, rank = 1, 0
        else:
            world, rank = dist.get_world_size(group), dist.get_rank(group)
        if plan is None:
            from ringctl.plan import RingPlan

            plan = RingPlan.rank_order(world, layout)
        if plan.world_size != world:
            raise CacheError(
                f"plan.world_size={plan.world_size} but the group has {world} ranks; make the plan for this group"
            )
        if plan.layout != layout:
            raise CacheError(f"layout={layout!r} but plan.layout={plan.layout!r}; build the cache with the plan's layout")
        self.layers, self.batch, self.kv_heads, self.head_dim = layers, batch, kv_heads, head_dim
        self.capacity, self.dtype, self.layout = capacity, dtype, layout
        self.group, self.plan, self.world_size, self.rank = group, plan, world, rank
        self.position = plan.position(rank)
        self.placement = Placement(world, layout)
        # the most any position can hold: placement keeps positions within one token of each
        # other, so ceil(capacity / W) (+1 of slack for the round-robin remainder)
        self.capacity_per_rank = math.ceil(capacity / world) + (1 if world > 1 else 0)
        self._store = [
            torch.zeros((self.capacity_per_rank, 2, batch, kv_heads, head_dim), dtype=dtype, device=device)
            for _ in range(layers)
        ]
        self._filled = [0] * layers  # rows of each layer written so far
        # every position's key positions so far, filled turn by turn (a turn costs its own
        # tokens, not the context's: decode steps stay cheap on a long context)
        self._key_pos = torch.empty((world, self.capacity_per_rank), dtype=torch.int64)
        self.turn: CacheTurn | None = None
        self._turns = 0

    # ---- placement --------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Tokens in the context (every rank's, the current turn's included once begun)."""
        return self.placement.length

    @property
    def held(self) -> int:
        """Tokens this rank holds."""
        return self.placement.counts()[self.position]

    def begin_turn(self, count: int) -> CacheTurn:
        """Place the next ``count`` tokens: returns the turn, whose ``positions`` are this
        rank's share (possibly none). Collective: all ranks, same ``count``, checked before
        anything is placed."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise CacheError(f"count={count!r} is invalid; allowed: an integer >= 1 (new tokens of this turn)")
        room = self.capacity - self.length
        if count > room:
            raise CacheError(
                f"count={count} new tokens do not fit: the cache holds {self.length} of "
                f"capacity={self.capacity} tokens; allowed: count <= {room} (build the cache "
                "with a larger capacity)"
            )
        for layer, filled in enumerate(self._filled):
            if self.turn is not None and filled != self.held:
                raise CacheError(
                    f"layer {layer} did not append its K/V for turn {self.turn.index} "
                    f"({filled} of {self.held} rows); append every layer before the next turn"
                )
        self._check_same_on_every_rank(count)
        turn = self.placement.extend(count)
        new = tuple(_positions(r) for r in turn.new)
        for p, (before, after) in enumerate(zip(turn.held_before, turn.held_after, strict=True)):
            self._key_pos[p, before:after] = new[p]
        self.turn = CacheTurn(
            index=self._turns,
            turn=turn,
            positions=new[self.position],
            new_by_position=new,
            keys_by_position=tuple(self._key_pos[p, :n] for p, n in enumerate(turn.held_after)),
        )
        self._turns += 1
        return self.turn

    def _check_same_on_every_rank(self, count: int) -> None:
        """One small all_gather: every rank must begin the same turn of the same context,
        with caches of the same shape (else ring hops would not match and hang)."""
        if self.world_size == 1:
            return
        fields = ("count", "context length", "layers", "batch", "kv_heads", "head_dim", "dtype", "layout", "capacity")
        mine = [count, self.length, self.layers, self.batch, self.kv_heads, self.head_dim,
                _DTYPES.index(self.dtype), CACHE_LAYOUTS.index(self.layout), self.capacity]  # fmt: skip
        device = self._store[0].device if self._store[0].is_cuda else torch.device("cpu")
        local = torch.tensor(mine, dtype=torch.int64, device=device)
        gathered = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(gathered, local, group=self.group)
        table = torch.stack(gathered).cpu().tolist()
        for i, name in enumerate(fields):
            values = [row[i] for row in table]
            if len(set(values)) > 1:
                raise CacheError(
                    f"{name} differs between ranks: {values} (by rank); every rank must "
                    "begin the same turn on caches built with the same arguments"
                )

    # ---- storage ----------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store layer ``layer``'s K and V ``(B, n, Hkv, D)`` of this rank's new tokens of
        the current turn (n = ``len(turn.positions)``, possibly 0)."""
        if self.turn is None:
            raise CacheError("append before begin_turn: place the turn's tokens first")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.layers:
            raise CacheError(f"layer={layer!r} is invalid; allowed: 0..{self.layers - 1}")
        n = int(self.turn.positions.numel())
        want = (self.batch, n, self.kv_heads, self.head_dim)
        for name, x in (("k", k), ("v", v)):
            if tuple(x.shape) != want:
                raise CacheError(
                    f"{name}.shape={tuple(x.shape)} is invalid; allowed: {want} (B, this rank's "
                    f"{n} new tokens of the turn, kv_heads, head_dim)"
                )
            if x.dtype != self.dtype:
                raise CacheError(f"{name}.dtype={x.dtype} but the cache holds {self.dtype}")
        before = self.turn.turn.held_before[self.position]
        if self._filled[layer] != before:
            raise CacheError(
                f"layer {layer} already appended turn {self.turn.index}; append once per layer and turn"
            )
        rows = self._store[layer][before : before + n]
        rows[:, 0] = k.transpose(0, 1)
        rows[:, 1] = v.transpose(0, 1)
        self._filled[layer] = before + n

    def block(self, layer: int, rows: int | None = None) -> torch.Tensor:
        """Layer ``layer``'s first ``rows`` tokens (default: all held) as ``(rows, 2, B, Hkv,
        D)``, contiguous (a view of the store; rows past ``held`` are zeros)."""
        n = self.held if rows is None else rows
        return self._store[layer][:n]

    def filled(self, layer: int) -> int:
        return self._filled[layer]

    def memory_bytes(self) -> dict[str, int]:
        """This rank's cache memory: allocated (every layer's store) and used (rows held)."""
        row = 2 * self.batch * self.kv_heads * self.head_dim * self._store[0].element_size()
        return {
            "allocated": self.layers * self.capacity_per_rank * row,
            "used": self.layers * self.held * row,
        }
