"""The inference cost model: pass-KV vs pass-Q for T new tokens over P cached ones
(no torch import, like ringctl.plan; everything here is integers and floats).

One call is one attention layer over a KV cache sharded on the ring (ringctl.placement):

- pass-KV: every position's whole cache (cached + new K/V), padded to the turn's
  ``max_held`` rows, walks the ring as in the training forward; position p computes its
  new queries against the keys of the block it holds.
- pass-Q: every position's new queries, padded to ``max_new`` rows, walk the ring as K/V do
  in the training backward, an accumulator (partial out and log-sum-exp, in float32, or
  float64 for float64 inputs) one hop behind that makes one more hop, home; position p
  computes the queries it holds against its own keys.

Both compute the same query-key pairs; what differs is what travels: pass-KV moves
2 x Hkv x (P + T) / W rows per hop, pass-Q Hq x T / W rows (plus the accumulator), so a
full prefill favours pass-KV and a few new tokens over a long cache favour pass-Q (arXiv
2411.01783, sec. 3). Inference runs one lane always: a bidirectional plan's direction is
ignored. A ring step lasts as long as its busiest position's pairs or the hop it hides,
whichever is longer (``ringctl.plan._ring_time``); links and their sharing are the
training model's (``_link_factors``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from ringctl.errors import ConfigError, check_positive_int
from ringctl.placement import CACHE_LAYOUTS, Run, Turn, placement_after
from ringctl.plan import (
    DTYPE_BYTES,
    MAX_HEAD_DIM,
    RingPlan,
    _acc_bytes,
    _kv_bytes,
    _link_factors,
    _Path,
    _path,
    _ring_time,
    _slowest,
    _topology_of,
    step_compute,
)
from ringctl.topology import LINKS, setting

#: how an inference call moves data round the ring
INFER_MODES = ("pass_kv", "pass_q")
#: what workload.mode may say: a mode, or `auto` (the cost model's faster one)
INFER_MODE_CHOICES = ("auto", *INFER_MODES)


def check_mode(mode: object, key: str = "workload.mode") -> str:
    """`mode` if it is one of INFER_MODE_CHOICES, else ConfigError naming `key`."""
    if not isinstance(mode, str) or mode not in INFER_MODE_CHOICES:
        raise ConfigError(key, mode, " | ".join(INFER_MODE_CHOICES))
    return mode


def _check_forced(mode: object, key: str = "mode") -> str:
    if not isinstance(mode, str) or mode not in INFER_MODES:
        raise ConfigError(key, mode, " | ".join(INFER_MODES))
    return mode


@dataclass(frozen=True)
class InferWorkload:
    """One inference call's sizes: ``new_tokens`` (T) queries appended to a context whose
    cache holds ``cached_tokens`` (P), per sequence of the batch; ``heads`` query heads,
    ``kv_heads`` the cached (and, in pass-KV, travelling) K/V heads; ``layout`` the cache
    placement (ringctl.placement.CACHE_LAYOUTS)."""

    batch: int = 1
    new_tokens: int = 1
    cached_tokens: int = 0
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype: str = "bfloat16"
    layout: str = "zigzag"

    def __post_init__(self) -> None:
        for key in ("batch", "heads", "kv_heads", "head_dim"):
            check_positive_int(f"workload.{key}", getattr(self, key))
        check_positive_int("new_tokens", self.new_tokens)
        if isinstance(self.cached_tokens, bool) or not isinstance(self.cached_tokens, int) or self.cached_tokens < 0:
            raise ConfigError("cached_tokens", self.cached_tokens, "an integer >= 0")
        if self.head_dim > MAX_HEAD_DIM:
            raise ConfigError("workload.head_dim", self.head_dim, f"an integer in 1..{MAX_HEAD_DIM} (the attention kernels' limit)")
        if self.heads % self.kv_heads:
            raise ConfigError("workload.kv_heads", self.kv_heads, f"a divisor of workload.heads={self.heads}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError("workload.dtype", self.dtype, " | ".join(DTYPE_BYTES))
        if self.layout not in CACHE_LAYOUTS:
            raise ConfigError("workload.layout", self.layout, " | ".join(CACHE_LAYOUTS))

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def context(self) -> int:
        """T + P: the context length after the call."""
        return self.new_tokens + self.cached_tokens

    @property
    def fraction(self) -> float:
        """T / (T + P), the axis the crossover lives on."""
        return self.new_tokens / self.context

    @classmethod
    def from_config(cls, cfg: Any) -> InferWorkload:
        """From the infer workload node: the first chat turn after the prompt (P = prompt,
        T = turns[0]), the call the runtime's choice matters most for; with no turns, the
        prompt's own prefill (T = prompt, P = 0). `ringctl plan workload=infer` prices
        other points through workload.prompt / workload.turns."""
        prompt = setting(cfg, "prompt", None)
        check_positive_int("workload.prompt", prompt)
        turns = list(setting(cfg, "turns", None) or [])
        if turns:
            check_positive_int("workload.turns[0]", turns[0])
            new, cached = turns[0], prompt
        else:
            new, cached = prompt, 0
        kwargs = {k: setting(cfg, k, None) for k in ("batch", "heads", "kv_heads", "head_dim", "dtype", "layout")}
        return cls(new_tokens=new, cached_tokens=cached, **{k: v for k, v in kwargs.items() if v is not None})


@dataclass(frozen=True)
class InferCost:
    """Predicted cost of one attention call in one mode under a plan.

    ``bytes_per_rank``: what each global rank sends per link class (what the runtime's
    comm_stats count under phase "forward"); ``bytes_per_step``: all ranks together per link
    class in one steady ring step (every hop carrying its block and the accumulator behind
    it; hierarchical: the outer step's inter bytes / L, as RingPlan.bytes_per_step).
    ``step_compute_s[s]``: ring step s's slowest position's compute (ringctl.plan.step_compute)."""

    mode: str
    new_tokens: int
    cached_tokens: int
    block_rows: int
    moving_bytes: int
    home_bytes: int
    bytes_per_rank: dict[str, list[int]]
    bytes_total: dict[str, int]
    bytes_per_step: dict[str, int]
    busiest_pairs_per_step: list[int]
    step_compute_s: list[float]
    transfer_s: dict[str, float]
    predicted_s: float
    visible_pairs: int = field(default=0)

    @property
    def compute_s(self) -> float:
        """Sum of the ring steps' busiest compute (what a link-free ring would take)."""
        return sum(self.step_compute_s)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "new_tokens": self.new_tokens,
            "cached_tokens": self.cached_tokens,
            "fraction_new": self.new_tokens / (self.new_tokens + self.cached_tokens),
            "block_rows": self.block_rows,
            "moving_bytes_per_hop": self.moving_bytes,
            "home_bytes_per_hop": self.home_bytes,
            "bytes_per_rank": {k: list(v) for k, v in self.bytes_per_rank.items()},
            "bytes_total": dict(self.bytes_total),
            "bytes_per_step": dict(self.bytes_per_step),
            "visible_pairs": self.visible_pairs,
            "busiest_pairs_per_step": list(self.busiest_pairs_per_step),
            "compute_s": self.compute_s,
            "step_compute_s": list(self.step_compute_s),
            "transfer_time_per_hop_s": dict(self.transfer_s),
            "predicted_s": self.predicted_s,
        }


# ---- placement and pairs -------------------------------------------------------------
def _turn_of(plan: RingPlan, w: InferWorkload, turn: Turn | None) -> Turn:
    """The turn priced: `turn` as given (checked against the plan), else the T new tokens
    placed after a fresh prefill of the P cached ones."""
    if turn is None:
        return placement_after(plan.world_size, [w.cached_tokens] if w.cached_tokens else [], w.layout).peek(w.new_tokens)
    if len(turn.new) != plan.world_size or len(turn.held_before) != plan.world_size:
        raise ValueError(f"turn placed over {len(turn.new)} positions; the plan's world size is {plan.world_size}")
    if turn.count < 1:
        raise ConfigError("new_tokens", turn.count, "an integer >= 1")
    return turn


def _upto(count: int, length: int) -> int:
    """Sum over the first `count` queries at or after a key run's start of the keys of
    that run (of `length`) they see: 1, 2, ..., length, length, ..."""
    if count <= 0:
        return 0
    if count <= length:
        return count * (count + 1) // 2
    return length * (length + 1) // 2 + (count - length) * length


def run_pairs(queries: tuple[Run, ...] | list[Run], keys: tuple[Run, ...] | list[Run]) -> int:
    """Causal (key position <= query position) pairs between two sets of runs."""
    total = 0
    for qs, ql in queries:
        for ks, kl in keys:
            if ks + kl <= qs:  # every key before every query
                total += ql * kl
            elif ks < qs + ql:
                total += _upto(qs + ql - ks, kl) - _upto(qs - ks, kl)
    return total


def pairs_matrix(turn: Turn) -> list[list[int]]:
    """``m[q][k]``: visible pairs between position q's new queries and position k's keys
    after the turn. Every cached key precedes every new query, so the cache adds
    new_counts[q] x held_before[k]; the new keys add their causal pairs."""
    news, before = turn.new_counts, turn.held_before
    return [
        [news[q] * before[k] + run_pairs(turn.new[q], turn.new[k]) for k in range(len(news))]
        for q in range(len(news))
    ]


@lru_cache(maxsize=64)
def _sources(plan_key: tuple[str, int, int, int]) -> tuple[tuple[int, ...], ...]:
    """``sources[step][p]``: whose block ring position p holds at each ring step."""
    from ringctl.documents import ring_sources

    algorithm, world, nodes, inner = plan_key
    levels: tuple[tuple[int, int], ...] = ((nodes, inner), (inner, 1)) if algorithm == "hierarchical" else ((world, 1),)
    return tuple(tuple(row) for row in ring_sources(levels, world))


def _steps(
    plan: RingPlan, w: InferWorkload, turn: Turn, matrix: list[list[int]], mode: str
) -> tuple[list[int], list[float]]:
    """Per ring step, the busiest position's pairs and the slowest position's compute
    (``step_compute``: FLOPs, or streaming the keys it reads, and the fixed cost). pass-KV:
    a position's own queries against the block it holds (that source's keys); pass-Q: the
    queries it holds against its own keys."""
    topo = _topology_of(plan)
    per_pair = 4 * w.batch * w.heads * w.head_dim / (topo.compute_tflops * 1e12)
    keys = turn.held_after
    sources = _sources((plan.algorithm, plan.world_size, plan.nodes, plan.inner_size))
    pairs, computes = [], []
    for row in sources:
        work = [
            (matrix[p][src], keys[src]) if mode == "pass_kv" else (matrix[src][p], keys[p]) for p, src in enumerate(row)
        ]
        pairs.append(max(n for n, _rows in work))
        computes.append(max(
            step_compute(topo, per_pair * n, _kv_bytes(w.batch, rows, w.kv_heads, w.head_dim, w.dtype_bytes))
            for n, rows in work
        ))  # fmt: skip
    return pairs, computes


# ---- bytes ---------------------------------------------------------------------------
def _blocks(w: InferWorkload, turn: Turn, mode: str) -> tuple[int, int, int]:
    """(padded rows, bytes of the block that walks the ring, bytes of the accumulator one
    hop behind it: pass-KV none)."""
    e = w.dtype_bytes
    if mode == "pass_kv":
        return turn.max_held, _kv_bytes(w.batch, turn.max_held, w.kv_heads, w.head_dim, e), 0
    q = w.batch * turn.max_new * w.heads * w.head_dim * e
    acc = w.batch * turn.max_new * w.heads * (w.head_dim + 1) * _acc_bytes(e)
    return turn.max_new, q, acc


def _bytes_per_rank(plan: RingPlan, block: int, acc: int) -> dict[str, list[int]]:
    """What each rank sends per link class when `block` walks the ring (a revolution
    less one hop) with an accumulator of `acc` bytes one hop behind (one more hop, home)."""
    world = plan.world_size
    out = {link: [0] * world for link in LINKS}
    if world == 1:
        return out
    if plan.algorithm == "flat":
        sent = (world - 1) * block + world * acc
        for p in range(world):
            src, dst = plan.ring_order[p], plan.ring_order[(p + 1) % world]
            out[plan.link_class(src, dst)][src] += sent
        return out
    N, L = plan.nodes, plan.inner_size
    inter = (N - 1) * block + (N * acc if N > 1 else 0)
    intra = N * (L - 1) * block + (N * L * acc if L > 1 else 0)
    return {"inter": [inter] * world, "intra": [intra] * world}


def _bytes_per_step(plan: RingPlan, moving: int) -> dict[str, int]:
    counts = {link: 0 for link in LINKS}
    if plan.world_size == 1:
        return counts
    if plan.algorithm == "hierarchical":
        N, L = plan.nodes, plan.inner_size
        counts["intra"] = N * (L - 1) * moving
        counts["inter"] = N * moving if N > 1 else 0
        return counts
    for _src, _dst, link, _ring in plan.edges():
        counts[link] += moving
    return counts


def predicted_infer_bytes(plan: RingPlan, w: InferWorkload, mode: str, turn: Turn | None = None) -> dict[str, list[int]]:
    """Bytes each global rank sends per link class in one call in `mode` (pass_kv |
    pass_q), byte for byte what the runtime counts under phase "forward"."""
    mode = _check_forced(mode)
    _rows, block, acc = _blocks(w, _turn_of(plan, w, turn), mode)
    return _bytes_per_rank(plan, block, acc)


# ---- time ----------------------------------------------------------------------------
def estimate_infer(plan: RingPlan, w: InferWorkload, turn: Turn | None = None) -> dict[str, InferCost]:
    """Both modes' predicted cost of one call (one attention layer) under `plan`: for
    `turn` as placed by the runtime's cache, or (None) for the T new tokens after a fresh
    prefill of P cached ones."""
    turn = _turn_of(plan, w, turn)
    topo = _topology_of(plan)
    matrix = pairs_matrix(turn)
    visible = sum(map(sum, matrix))
    W = plan.world_size
    by_link: dict[str, list[_Path]] = {link: [] for link in LINKS}
    if W > 1 and plan.algorithm == "flat":
        factors, _ = _link_factors(plan, topo, (1.0,), "flat")
        by_link = {link: [_path(topo.link(link), 1.0 / f) for f in sorted(factors[link], reverse=True)] for link in LINKS}
    elif W > 1:
        N, L = plan.nodes, plan.inner_size
        inner_f, _ = _link_factors(plan, topo, (1.0,), "inner")
        outer_f, _ = _link_factors(plan, topo, (1.0,), "outer")
        by_link["intra"] = [_path(topo.intra, 1.0 / max(inner_f["intra"]))] if L > 1 else []
        by_link["inter"] = [_path(topo.inter, 1.0 / max(outer_f["inter"]))] if N > 1 else []
    every = by_link["intra"] + by_link["inter"]
    out = {}
    for mode in INFER_MODES:
        rows, block, acc = _blocks(w, turn, mode)
        moving = block + acc  # a steady step: this hop's block and the accumulator behind it
        busy, computes = _steps(plan, w, turn, matrix, mode)
        if plan.algorithm == "flat" or W == 1:
            total = _ring_time(computes, _slowest(every, moving), _slowest(every, acc))
        else:  # each outer step: the inner ring over that step's L blocks, as for documents
            inner, outer, L = by_link["intra"], by_link["inter"], plan.inner_size
            rings = [computes[o * L : (o + 1) * L] for o in range(plan.nodes)]
            total = _ring_time(
                [_ring_time(r, _slowest(inner, moving), _slowest(inner, acc)) for r in rings],
                _slowest(outer, moving), _slowest(outer, acc),
            )  # fmt: skip
        sent = _bytes_per_rank(plan, block, acc)
        out[mode] = InferCost(
            mode=mode, new_tokens=turn.count, cached_tokens=turn.start, block_rows=rows, moving_bytes=moving,
            home_bytes=acc, bytes_per_rank=sent, bytes_total={link: sum(v) for link, v in sent.items()},
            bytes_per_step=_bytes_per_step(plan, moving), busiest_pairs_per_step=busy, step_compute_s=computes,
            transfer_s={link: _slowest(by_link[link], moving) for link in LINKS}, predicted_s=total,
            visible_pairs=visible,
        )  # fmt: skip
    return out


def choose_mode(plan: RingPlan, w: InferWorkload, turn: Turn | None = None, mode: str = "auto") -> str:
    """The mode a call runs: a forced mode as is; `auto`, the faster prediction (pass_kv
    on a tie, the training path)."""
    mode = check_mode(mode)
    if mode != "auto":
        return mode
    costs = estimate_infer(plan, w, turn)
    return min(INFER_MODES, key=lambda m: costs[m].predicted_s)


def _gap(plan: RingPlan, w: InferWorkload, new: int) -> float:
    """pass-KV's prediction less pass-Q's with T = `new` at the same T + P."""
    costs = estimate_infer(plan, replace(w, new_tokens=new, cached_tokens=w.context - new))
    return costs["pass_kv"].predicted_s - costs["pass_q"].predicted_s


def crossover(plan: RingPlan, w: InferWorkload) -> float | None:
    """T / (T + P) at the workload's T + P where both modes predict the same time, pass-Q
    faster below it: bisection over integer T in [1, T + P], then linear between the two
    bracketing T. None when one mode wins (or ties) at both ends (one rank, or links so fast
    that moving either block is hidden)."""
    total = w.context
    lo, hi = 1, total
    g_lo, g_hi = _gap(plan, w, lo), _gap(plan, w, hi)
    if total < 2 or (g_lo > 0) == (g_hi > 0):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        g_mid = _gap(plan, w, mid)
        if (g_mid > 0) == (g_lo > 0):
            lo, g_lo = mid, g_mid
        else:
            hi, g_hi = mid, g_mid
    t = lo + (hi - lo) * g_lo / (g_lo - g_hi) if g_lo != g_hi else float(lo)
    return t / total


def sweep(plan: RingPlan, w: InferWorkload, points: int = 24) -> list[tuple[float, float, float]]:
    """(T / (T + P), pass-KV s, pass-Q s) at log-spaced T from 1 to T + P (the workload's
    context): the curve `ringctl plan` draws."""
    total = w.context
    news = sorted({max(1, min(total, round(total ** (i / max(1, points - 1))))) for i in range(points)})
    out = []
    for new in news:
        costs = estimate_infer(plan, replace(w, new_tokens=new, cached_tokens=total - new))
        out.append((new / total, costs["pass_kv"].predicted_s, costs["pass_q"].predicted_s))
    return out


def infer_summary(plan: RingPlan, w: InferWorkload) -> dict[str, Any]:
    """What `ringctl plan --json` shows under "inference"."""
    costs = estimate_infer(plan, w)
    cross = crossover(plan, w)
    below = "pass_q" if _gap(plan, w, 1) > 0 else "pass_kv"
    return {
        "new_tokens": w.new_tokens,
        "cached_tokens": w.cached_tokens,
        "fraction_new": w.fraction,
        "batch": w.batch,
        "cache_layout": w.layout,
        "modes": {m: c.to_dict() for m, c in costs.items()},
        "choice": min(INFER_MODES, key=lambda m: costs[m].predicted_s),
        "crossover": cross,
        "faster_below_crossover": below if cross is not None else None,
        "crossover_note": f"T/(T+P) at this T+P where both modes predict the same time; {below} faster below it"
        if cross is not None else f"{below} is faster (or equal) at both ends, T=1 and T=T+P, at this T+P",
    }  # fmt: skip


__all__ = [
    "INFER_MODES",
    "INFER_MODE_CHOICES",
    "InferCost",
    "InferWorkload",
    "check_mode",
    "choose_mode",
    "crossover",
    "estimate_infer",
    "infer_summary",
    "pairs_matrix",
    "predicted_infer_bytes",
    "run_pairs",
    "sweep",
]
