"""Packed documents without torch: length distributions, which tokens each ring position
holds under every layout, and how many query-key pairs each rank's blocks really compute.

The planner imports this (``ringctl plan`` runs anywhere, fast) and the runtime's layouts
build their index tensors from ``shard_runs``, so a layout is defined once, here.

Documents are flash-attn varlen boundaries ``cu_seqlens = (0, l1, l1+l2, ..., total)`` of
the global packed sequence of ``seq_len`` tokens; tokens from ``total`` on are padding.
Query token i sees key j iff both are in the same document, ``j <= i`` when causal, and
``i - j <= left``, ``j - i <= right`` for ``window = (left, right)`` (-1: unbounded).

The ``docs`` layout cuts every document in 2W chunks (sizes differ by at most one token) and
gives ring position p chunks p and 2W-1-p of every document, so each rank gets an equal share
of every document's causal work, whatever the lengths. The remainder tokens of a document go
to the positions round-robin, continuing where the previous document stopped, so positions'
token counts never differ by more than one; each shard then holds ``ceil(seq_len / W)`` rows:
its documents' tokens, then padding tokens after ``total`` (filling shards 0, 1, ... in turn)
and, last, fewer than W internal pad rows in all (``layout_padding``).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ringctl.errors import ConfigError

#: the distributions a `documents` spec may name (besides an explicit list of lengths)
DISTRIBUTIONS = ("lognormal", "fixed")
#: default sigma of the lognormal distribution (of log-lengths): long-tailed, like real corpora
LOGNORMAL_SIGMA = 1.0
DEFAULT_MEAN = 2048
DOCS_LAYOUT = "docs"


# ---------------------------------------------------------------- checks


def check_cu_seqlens(
    values: Sequence[Any], seq_len: int | None = None, argument: str = "cu_seqlens"
) -> tuple[int, ...]:
    """``values`` as a tuple of ints if they are document boundaries: start at 0, strictly
    increasing, last <= ``seq_len`` (when given). ValueError naming ``argument`` otherwise."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"{argument}={values!r} must be a sequence of ints [0, l1, l1+l2, ..., total]"
        )
    out = []
    for i, x in enumerate(values):
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(
                f"{argument}[{i}]={x!r} is not an int; {argument} holds integer document "
                "boundaries [0, l1, l1+l2, ..., total]"
            )
        out.append(int(x))
    if not out or out[0] != 0:
        shown = out[:8]
        raise ValueError(f"{argument}={shown}{'...' if len(out) > 8 else ''} must start at 0")
    for i in range(1, len(out)):
        if out[i] <= out[i - 1]:
            raise ValueError(
                f"{argument} must be strictly increasing (every document has >= 1 token); "
                f"{argument}[{i - 1}]={out[i - 1]}, {argument}[{i}]={out[i]}"
            )
    if seq_len is not None and out[-1] > seq_len:
        raise ValueError(
            f"{argument}[-1]={out[-1]} exceeds the sequence length {seq_len}; allowed: "
            f"boundaries <= {seq_len} (tokens after the last boundary are padding)"
        )
    return tuple(out)


def check_window(window: Any, argument: str = "window_size") -> tuple[int, int]:
    """``(left, right)`` as ints >= -1 (-1: unbounded), else ValueError naming ``argument``."""
    ok = (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= -1 for x in window)
    )
    if not ok:
        raise ValueError(
            f"{argument}={window!r} must be two ints (left, right), each >= 0 or -1 for unbounded"
        )
    return int(window[0]), int(window[1])


# ---------------------------------------------------------------- length distributions


@dataclass(frozen=True)
class DocumentSpec:
    """How packed documents are drawn: ``lognormal`` (mean length, sigma of the log),
    ``fixed`` (every document ``mean`` tokens), or explicit ``lengths``."""

    kind: str = "lognormal"
    mean: int = DEFAULT_MEAN
    sigma: float = LOGNORMAL_SIGMA
    lengths: tuple[int, ...] = ()

    def sample(self, seq_len: int, seed: int = 0) -> tuple[int, ...]:
        """Document lengths packing ``seq_len`` tokens. Drawn lengths fill it exactly (the
        last document is cut); explicit lengths are used as given (the rest is padding)."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len={seq_len!r} must be an int >= 1")
        if self.kind == "lengths":
            if sum(self.lengths) > seq_len:
                raise ValueError(
                    f"documents={list(self.lengths)[:8]}... sum to {sum(self.lengths)} tokens, "
                    f"more than seq_len={seq_len}; allowed: lengths summing to <= seq_len"
                )
            return self.lengths
        rng = random.Random(seed)
        mu = math.log(self.mean) - self.sigma**2 / 2  # so that E[length] = mean
        out: list[int] = []
        left = seq_len
        while left > 0:
            if self.kind == "fixed":
                n = self.mean
            else:
                n = max(1, round(rng.lognormvariate(mu, self.sigma)))
            out.append(min(n, left))
            left -= out[-1]
        return tuple(out)

    def describe(self) -> str:
        if self.kind == "lengths":
            return f"{len(self.lengths)} documents"
        if self.kind == "fixed":
            return f"fixed:mean={self.mean}"
        return f"lognormal:mean={self.mean},sigma={self.sigma:g}"


def parse_documents(value: Any, key: str = "workload.documents") -> DocumentSpec | None:
    """A documents spec from config: None / "" / "none" (no documents: one sequence),
    "lognormal" or "fixed" optionally with options ("lognormal:mean=2048,sigma=1.0"), a mapping
    ({"dist": "lognormal", "mean": 2048}), or an explicit list of lengths. ValueError naming
    ``key`` for anything else."""
    allowed = (
        "none | lognormal[:mean=N,sigma=X] | fixed:mean=N | a list of document lengths "
        "(ints >= 1)"
    )
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        lengths = list(value)
        if not lengths or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths
        ):
            raise ConfigError(key, value, allowed)
        return DocumentSpec(kind="lengths", lengths=tuple(lengths))
    options: dict[str, Any]
    if isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "get")):
        options = {str(k): v for k, v in value.items()}
        kind = options.pop("dist", options.pop("kind", "lognormal"))
    elif isinstance(value, str):
        kind, _, rest = value.strip().partition(":")
        options = {}
        for item in filter(None, (s.strip() for s in rest.split(","))):
            name, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(key, value, allowed)
            options[name.strip()] = text.strip()
    else:
        raise ConfigError(key, value, allowed)
    if kind not in DISTRIBUTIONS or not set(options) <= {"mean", "sigma"}:
        raise ConfigError(key, value, allowed)
    try:
        mean = int(options.get("mean", DEFAULT_MEAN))
        sigma = float(options.get("sigma", LOGNORMAL_SIGMA))
    except (TypeError, ValueError):
        raise ConfigError(key, value, allowed) from None
    if mean < 1 or not 0 <= sigma < 10 or (kind == "fixed" and "sigma" in options):
        raise ConfigError(key, value, allowed + "; mean >= 1, 0 <= sigma < 10")
    return DocumentSpec(kind=kind, mean=mean, sigma=sigma)


def cu_seqlens_of(lengths: Sequence[int]) -> tuple[int, ...]:
    """Boundaries ``(0, l1, l1+l2, ...)`` of documents of ``lengths``."""
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return tuple(out)


# ---------------------------------------------------------------- layouts as token runs


@dataclass(frozen=True)
class Run:
    """Tokens ``start, start+stride, ..., start+(count-1)*stride`` of the global sequence."""

    start: int
    count: int
    stride: int = 1

    @property
    def stop(self) -> int:
        """One past the last token."""
        return self.start + (self.count - 1) * self.stride + 1 if self.count else self.start


def shard_len(layout: str, seq_len: int, world: int) -> int:
    """Rows of every shard: ``ceil(seq_len / W)`` for ``docs`` (it pads), else ``seq_len / W``."""
    if layout == DOCS_LAYOUT:
        return -(-seq_len // world)
    return seq_len // world


def layout_padding(seq_len: int, world: int) -> int:
    """Internal pad rows the ``docs`` layout adds over all shards (fewer than ``world``):
    ``W * ceil(seq_len / W) - seq_len``, whatever the documents."""
    return world * -(-seq_len // world) - seq_len


def shard_runs(
    layout: str, seq_len: int, world: int, cu_seqlens: Sequence[int] | None = None
) -> tuple[tuple[Run, ...], ...]:
    """For each ring position, the global tokens its shard holds as runs in row order
    (ascending). ``seq_len`` must split under ``layout`` (see plan.seq_len_divisor); the
    ``docs`` layout follows ``cu_seqlens`` (default: one document of ``seq_len`` tokens) and
    leaves its last ``shard_len - sum(counts)`` rows of a shard as internal padding."""
    w2 = 2 * world
    if layout == "striped":
        return tuple((Run(p, seq_len // world, world),) for p in range(world))
    if layout == "contiguous":
        n = seq_len // world
        return tuple((Run(p * n, n),) for p in range(world))
    if layout == "zigzag":
        n = seq_len // w2
        return tuple(_joined([Run(p * n, n), Run((w2 - 1 - p) * n, n)]) for p in range(world))
    if layout != DOCS_LAYOUT:
        raise ValueError(f"layout={layout!r} is not a layout")
    cu = tuple(cu_seqlens) if cu_seqlens is not None else (0, seq_len)
    runs: list[list[Run]] = [[] for _ in range(world)]
    load = [0] * world
    turn = 0  # position that gets the next remainder token
    for d in range(len(cu) - 1):
        start, n = cu[d], cu[d + 1] - cu[d]
        base, extra = divmod(n, w2)
        more = [0] * world  # remainder tokens of this document per position (0, 1 or 2)
        for i in range(extra):
            more[(turn + i) % world] += 1
        turn = (turn + extra) % world
        sizes = [0] * w2
        for p in range(world):
            sizes[p] = base + (more[p] >= 1)
            sizes[w2 - 1 - p] = base + (more[p] >= 2)
        starts = [start]
        for size in sizes[:-1]:
            starts.append(starts[-1] + size)
        for p in range(world):
            head, tail = Run(starts[p], sizes[p]), Run(starts[w2 - 1 - p], sizes[w2 - 1 - p])
            runs[p] += [r for r in (head, tail) if r.count]
            load[p] += head.count + tail.count
    rows = shard_len(layout, seq_len, world)
    pad_from = cu[-1]  # padding tokens after the last boundary fill the shards' free rows in turn
    for p in range(world):
        take = min(rows - load[p], seq_len - pad_from)
        if take > 0:
            runs[p].append(Run(pad_from, take))
            pad_from += take
    return tuple(_joined(r) for r in runs)


def _joined(runs: list[Run]) -> tuple[Run, ...]:
    """Adjacent unit-stride runs merged (fewer, longer index ranges)."""
    out: list[Run] = []
    for run in runs:
        if not run.count:
            continue
        last = out[-1] if out else None
        if last is not None and last.stride == run.stride == 1 and last.stop == run.start:
            out[-1] = Run(last.start, last.count + run.count)
        else:
            out.append(run)
    return tuple(out)


# ---------------------------------------------------------------- visible query-key pairs


def visible_pairs(
    layout: str,
    seq_len: int,
    world: int,
    *,
    cu_seqlens: Sequence[int] | None = None,
    causal: bool = True,
    window: tuple[int, int] = (-1, -1),
) -> list[list[int]]:
    """``M[p][q]``: query-key pairs that position p's queries see among position q's keys
    (the work of that block; a block with 0 is skipped). No documents: one of ``seq_len``."""
    cu = tuple(cu_seqlens) if cu_seqlens is not None else (0, seq_len)
    left, right = window
    lo_diff = 0 if causal else -math.inf  # bounds on i - j
    if right >= 0:
        lo_diff = max(lo_diff, -right)
    hi_diff = left if left >= 0 else math.inf
    per_doc = [_split_by_document(runs, cu) for runs in shard_runs(layout, seq_len, world, cu)]
    out = [[0] * world for _ in range(world)]
    docs = len(cu) - 1
    for d in range(docs):
        holders = [(p, per_doc[p].get(d, ())) for p in range(world)]
        holders = [(p, runs) for p, runs in holders if runs]
        for p, q_runs in holders:
            row = out[p]
            for q, k_runs in holders:
                row[q] += sum(_pairs(a, b, lo_diff, hi_diff) for a in q_runs for b in k_runs)
    return out


def _split_by_document(runs: Sequence[Run], cu: Sequence[int]) -> dict[int, list[Run]]:
    """Each run cut at the document boundaries; tokens after the last boundary dropped."""
    out: dict[int, list[Run]] = {}
    total = cu[-1]
    for run in runs:
        if not run.count or run.start >= total:
            continue
        d = bisect.bisect_right(cu, run.start) - 1
        while d < len(cu) - 1 and cu[d] < run.stop:
            lo, hi = max(cu[d], run.start), min(cu[d + 1], run.stop)
            first = run.start + -(-(lo - run.start) // run.stride) * run.stride
            if first < hi:
                count = (hi - 1 - first) // run.stride + 1
                out.setdefault(d, []).append(Run(first, count, run.stride))
            d += 1
    return out


def _pairs(a: Run, b: Run, lo_diff: float, hi_diff: float) -> int:
    """#{(i in a, j in b) : lo_diff <= i - j <= hi_diff}, in O(1) for equal strides."""
    if a.stride != b.stride and a.count > 1 and b.count > 1:
        return sum(
            lo_diff <= (a.start + u * a.stride) - (b.start + v * b.stride) <= hi_diff
            for u in range(a.count)
            for v in range(b.count)
        )
    stride = a.stride if a.count > 1 else b.stride
    offset = a.start - b.start  # i - j = offset + stride * (u - v)
    c_lo = -math.inf if lo_diff == -math.inf else math.ceil((lo_diff - offset) / stride)
    c_hi = math.inf if hi_diff == math.inf else math.floor((hi_diff - offset) / stride)
    if c_lo > c_hi:
        return 0
    below = 0 if c_lo == -math.inf else _pairs_upto(a.count, b.count, int(c_lo) - 1)
    upto = a.count * b.count if c_hi == math.inf else _pairs_upto(a.count, b.count, int(c_hi))
    return upto - below


def _pairs_upto(na: int, nb: int, c: int) -> int:
    """#{(u, v) : 0 <= u < na, 0 <= v < nb, u - v <= c}: for t = u - c, v >= t, so each u
    counts nb (t <= 0), nb - t (0 < t < nb) or 0 (t >= nb)."""
    t1, t2 = -c, na - 1 - c
    full = max(0, min(t2, 0) - t1 + 1) * nb
    a, b = max(t1, 1), min(t2, nb - 1)
    partial = (b - a + 1) * nb - (a + b) * (b - a + 1) // 2 if a <= b else 0
    return full + partial


def rank_pairs(matrix: Sequence[Sequence[int]]) -> list[int]:
    """Pairs each position's queries see over the whole ring (its total attention work)."""
    return [sum(row) for row in matrix]


def imbalance(work: Sequence[float]) -> float:
    """max / mean (1.0 = perfectly balanced; 1.0 for no work at all)."""
    mean = sum(work) / len(work) if work else 0.0
    return max(work) / mean if mean > 0 else 1.0


def ring_sources(levels: Sequence[tuple[int, int]], world: int) -> list[list[int]]:
    """``sources[step][p]``: whose K/V position p computes at each ring step, in loop order,
    for the levels (size, stride) of a schedule (flat: ((W, 1),); hierarchical: ((N, L),
    (L, 1))): the mixed-radix rule of ringctl.ring.schedule.Schedule.source."""
    steps: list[tuple[int, ...]] = [()]
    for size, _stride in levels:
        steps = [s + (t,) for s in steps for t in range(size)]
    out = []
    for step in steps:
        row = []
        for p in range(world):
            src = 0
            for (size, stride), t in zip(levels, step, strict=True):
                digit = (p // stride) % size
                src += ((digit - t) % size) * stride
            row.append(src)
        out.append(row)
    return out


def step_pairs(
    matrix: Sequence[Sequence[int]], sources: Sequence[Sequence[int]]
) -> list[list[int]]:
    """``out[step][p]``: pairs position p computes at each step (``ring_sources``); a ring
    step lasts as long as its busiest rank's block."""
    return [[matrix[p][src] for p, src in enumerate(row)] for row in sources]


def document_lengths(cu_seqlens: Sequence[int]) -> list[int]:
    return [b - a for a, b in itertools.pairwise(cu_seqlens)]

