"""ring_attention on real gloo process groups against SDPA on the whole sequence.

Each world size is spawned once (``_results``); its workers run every case and report
failures (or errors, for the bf16 comparison) back; the parametrized tests assert per case.
The reference is SDPA's math backend in float64 on the unsharded sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _dist import run_workers
from ringctl.ring import LAYOUTS, ring_attention, shard_sequence

WORLD_SIZES = (1, 2, 3, 4, 8)
B, D, S_LOCAL = 2, 16, 12
BF16_SEQ = 96  # one sequence for every world size: the bf16 errors compare like with like
FWD_ATOL, GRAD_ATOL = 1e-10, 1e-9


@dataclass(frozen=True)
class Case:
    layout: str
    causal: bool
    heads: int
    kv_heads: int

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        return f"{self.layout}-{mask}-h{self.heads}kv{self.kv_heads}"


# GQA everywhere; plain multi-head attention on two cases, to keep the suite fast
CASES = [Case(layout, causal, 8, 2) for layout in LAYOUTS for causal in (False, True)]
CASES += [Case("zigzag", True, 4, 4), Case("striped", False, 4, 4)]
BF16_CASES = [Case("zigzag", True, 8, 2), Case("striped", False, 8, 2)]


def _full_inputs(seq: int, case: Case, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """q, k, v and the output cotangent for the whole sequence; the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, seq, case.heads, D), (B, seq, case.kv_heads, D), (B, seq, case.kv_heads, D)]
    shapes.append(shapes[0])
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=causal, enable_gqa=True,
        )  # fmt: skip
    return out.transpose(1, 2)


def _run_case(
    rank: int, world: int, case: Case, seq: int, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(ring out, dq, dk, dv on this rank's shard), (the same from float64 SDPA, sharded)."""
    q, k, v, dout = _full_inputs(seq, case, dtype, seed=seq + case.heads)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = _sdpa(leaves[0], leaves[1], leaves[2], case.causal)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, rank, world, layout=case.layout)

    local = [shard(x).requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, causal=case.causal, layout=case.layout)
    grads = torch.autograd.grad(out, local, shard(dout))
    return [out, *grads], [shard(x) for x in (ref, *ref_grads)]


def _float64_failure(rank: int, world: int, case: Case) -> str | None:
    got, want = _run_case(rank, world, case, S_LOCAL * world, torch.float64)
    for name, g, w, atol in zip(
        ("out", "dq", "dk", "dv"), got, want, (FWD_ATOL, GRAD_ATOL, GRAD_ATOL, GRAD_ATOL)
    ):
        try:
            torch.testing.assert_close(g.detach(), w.detach(), rtol=0, atol=atol)
        except AssertionError as err:
            return f"rank {rank}, {name}: {err}"
    return None


def _bf16_errors(rank: int, world: int, case: Case) -> list[float]:
    got, want = _run_case(rank, world, case, BF16_SEQ, torch.bfloat16)
    assert all(g.dtype == torch.bfloat16 for g in got)
    return [float((g.detach().double() - w).abs().max()) for g, w in zip(got, want)]


def _mismatch_errors(rank: int, world: int) -> dict[str, str]:
    """Arguments that differ between ranks: every rank must raise the same ValueError."""
    errors = {}
    s_local = 4 if rank == world - 1 else 6
    mismatches: tuple[tuple[str, dict[str, Any]], ...] = (
        ("seq", {"s": s_local}),
        ("dtype", {"dtype": torch.float32 if rank == 0 else torch.float64}),
        ("causal", {"causal": rank == 0}),
    )
    for name, kwargs in mismatches:
        s = kwargs.get("s", 6)
        dtype = kwargs.get("dtype", torch.float64)
        q = torch.zeros(1, s, 2, 8, dtype=dtype)
        try:
            ring_attention(q, q, q, causal=kwargs.get("causal", False))
            errors[name] = "no error"
        except ValueError as err:
            errors[name] = str(err)
    return errors


def _worker(rank: int, world: int) -> dict[str, Any]:
    report: dict[str, Any] = {c.name: _float64_failure(rank, world, c) for c in CASES}
    for case in BF16_CASES:
        report["bf16-" + case.name] = _bf16_errors(rank, world, case)
    if world > 1:
        report["mismatch"] = _mismatch_errors(rank, world)
    return report


@cache
def _results(world: int) -> list[dict[str, Any]]:
    return run_workers(_worker, world)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_float64_matches_sdpa(world: int, case: Case) -> None:
    failures = [r[case.name] for r in _results(world) if r[case.name]]
    assert not failures, f"W={world} {case.name}: {failures[0]}"


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16_error_does_not_grow_with_world_size(case: Case) -> None:
    def worst(world: int) -> list[float]:
        per_rank = [r["bf16-" + case.name] for r in _results(world)]
        return [max(errs) for errs in zip(*per_rank)]

    one, eight = worst(1), worst(8)
    for name, e1, e8 in zip(("out", "dq", "dk", "dv"), one, eight):
        assert e8 <= 1.5 * e1, f"{case.name} {name}: error {e8:.3g} at W=8 > 1.5 x {e1:.3g} at W=1"
        assert e1 > 0 and math.isfinite(e8)


@pytest.mark.parametrize("world", [2, 3])
def test_arguments_that_differ_between_ranks_raise_everywhere(world: int) -> None:
    for rank, report in enumerate(_results(world)):
        errors = report["mismatch"]
        lengths = str([6] * (world - 1) + [4])
        assert "S_local" in errors["seq"] and lengths in errors["seq"], (rank, errors["seq"])
        assert "dtype differs between ranks" in errors["dtype"], (rank, errors["dtype"])
        assert "causal differs between ranks" in errors["causal"], (rank, errors["causal"])


# ---------------------------------------------------------------- bad input, one process


def _qkv(s: int = 4, hq: int = 4, hkv: int = 2, d: int = 8, **kw: Any) -> list[torch.Tensor]:
    kv_shape = (1, s, hkv, d)
    return [torch.zeros(1, s, hq, d, **kw), torch.zeros(kv_shape, **kw), torch.zeros(kv_shape, **kw)]


@pytest.mark.parametrize(
    ("make", "kwargs", "fragment"),
    [
        (lambda: _qkv(hq=3, hkv=2), {}, "Hq=3"),
        (lambda: _qkv(s=3), {}, "q.shape[1]=3"),
        (_qkv, {"layout": "spiral"}, "layout='spiral'"),
        (lambda: [_qkv()[0], _qkv(s=2)[1], _qkv(s=2)[2]], {}, "k.shape=(1, 2, 2, 8)"),
        (lambda: [*_qkv()[:2], _qkv(d=4)[2]], {}, "v.shape"),
        (lambda: [_qkv()[0], _qkv(dtype=torch.float64)[1], _qkv()[2]], {}, "dtype torch.float64"),
        (lambda: [_qkv()[0], _qkv(device="meta")[1], _qkv()[2]], {}, "meta"),
        (lambda: _qkv(dtype=torch.int32), {}, "q.dtype=torch.int32"),
        (lambda: [torch.zeros(4, 4, 8), *_qkv()[1:]], {}, "q must have 4 dims"),
        (_qkv, {"causal": 1}, "causal=1"),
        (_qkv, {"softmax_scale": "big"}, "softmax_scale='big'"),
    ],
)
def test_bad_input_raises_value_error(make: Any, kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        ring_attention(*make(), **kwargs)
    assert fragment in str(info.value)


def test_plan_must_fit_the_group() -> None:
    from ringctl.plan import RingPlan

    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"plan\.world_size=2"):
        ring_attention(q, k, v, plan=RingPlan.rank_order(2, "zigzag"))
    with pytest.raises(ValueError, match=r"plan\.layout='striped'"):
        ring_attention(q, k, v, plan=RingPlan.rank_order(1, "striped"))
