"""ring_attention with packed documents, padding and sliding windows on real gloo process
groups, against float64 SDPA given the whole sequence and the mask written out as a bool
matrix (math backend).

Each world size is spawned once (``_results``); its workers run every case and report the
first failure per case. Cases cover every layout (the per-document ``docs`` one included),
causal and not, windows, GQA and plain multi-head, documents of one token and documents
longer than a shard, a padded tail, ranks whose whole shard is padding, the hierarchical
schedule (W=4 as 2 nodes x 2), and bf16 at W=8 against W=1.
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
from ringctl.plan import LAYOUTS, make_plan
from ringctl.ring import ring_attention, shard_sequence
from ringctl.topology import Topology, place_ranks

WORLD_SIZES = (1, 2, 3, 4)
B, D, S_LOCAL = 2, 16, 12
FWD_ATOL, GRAD_ATOL = 1e-10, 1e-9
BF16_SEQ = 96
# document lengths that packed sequences repeat: single tokens, and 13 > S_LOCAL tokens
PATTERN = (1, 13, 1, 4, 2, 9, 1, 17, 3)


@dataclass(frozen=True)
class Case:
    layout: str
    causal: bool
    docs: str = "mixed"  # mixed | none | padded-shards | one-token
    window: tuple[int, int] = (-1, -1)
    heads: int = 4
    kv_heads: int = 2
    hierarchical: bool = False

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        window = "" if self.window == (-1, -1) else f"-w{self.window[0]}_{self.window[1]}"
        hier = "-hier" if self.hierarchical else ""
        return f"{self.layout}-{mask}-{self.docs}{window}-h{self.heads}kv{self.kv_heads}{hier}"

    def sequence(self, world: int) -> tuple[int, list[int] | None]:
        """(global length, cu_seqlens) of this case at ``world`` ranks."""
        if self.docs == "one-token":  # one document of one token: positions 1.. all padding
            return world, [0, 1]
        # docs pads internally when given the documents (one token short here); without
        # them its S must split evenly (the ring cannot tell the length otherwise)
        short = self.layout == "docs" and world > 1 and self.docs != "none"
        seq = S_LOCAL * world - short
        if self.docs == "none":
            return seq, None
        if self.docs == "padded-shards":  # documents only in the first 7 tokens
            return seq, [0, 2, 7]
        total, cu, i = seq - 5, [0], 0  # the last 5 tokens are padding
        while cu[-1] < total:
            cu.append(min(total, cu[-1] + PATTERN[i % len(PATTERN)]))
            i += 1
        return seq, cu


CASES = [Case(layout, causal) for layout in LAYOUTS for causal in (False, True)]
CASES += [
    Case("docs", True, heads=4, kv_heads=4),
    Case("zigzag", True, docs="none", window=(5, -1)),
    Case("docs", True, window=(4, 0)),
    Case("striped", False, window=(2, 3)),
    Case("contiguous", False, window=(5, 5), heads=2, kv_heads=1),
    Case("docs", False, docs="none", window=(3, 2)),
    Case("contiguous", True, docs="padded-shards"),
    Case("zigzag", False, docs="padded-shards"),
    Case("docs", True, docs="one-token"),
    Case("docs", True, hierarchical=True),
    Case("zigzag", True, window=(6, -1), hierarchical=True),
]
BF16_CASES = [Case("docs", True, heads=8, kv_heads=2), Case("zigzag", True, heads=8, kv_heads=2)]


def written_out(seq: int, cu: list[int] | None, causal: bool, window: tuple[int, int]) -> torch.Tensor:
    """(S, S) bool: query i sees key j (the mask's definition, element by element)."""
    doc = torch.full((seq,), -1)
    for d, (a, b) in enumerate(zip((cu or [0, seq])[:-1], (cu or [0, seq])[1:], strict=True)):
        doc[a:b] = d
    i, j = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    sees = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    if causal:
        sees &= j <= i
    if window[0] >= 0:
        sees &= i - j <= window[0]
    if window[1] >= 0:
        sees &= j - i <= window[1]
    return sees


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, sees: torch.Tensor
) -> list[torch.Tensor]:
    """out, dq, dk, dv of float64 SDPA with the bool mask. Rows that see nothing are given
    one harmless key (SDPA makes NaN of an empty row), then their output and cotangent are
    zeroed: the true function is constant 0 there, so it gets and gives no gradient."""
    empty = ~sees.any(1)
    safe = sees | (empty[:, None] & (torch.arange(sees.shape[1]) == 0)[None, :])
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    qt, kt, vt = (x.transpose(1, 2) for x in leaves)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=safe, enable_gqa=True)
    out = out.transpose(1, 2).masked_fill(empty[None, :, None, None], 0.0)
    grads = torch.autograd.grad(out, leaves, dout.double().masked_fill(empty[None, :, None, None], 0.0))
    return [out.detach(), *grads]


def _inputs(seq: int, case: Case, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seq * 31 + case.heads)
    shapes = [(B, seq, case.heads, D), (B, seq, case.kv_heads, D), (B, seq, case.kv_heads, D)]
    shapes.append(shapes[0])
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _plan(case: Case, world: int) -> Any:
    if not case.hierarchical:
        return None
    topology = Topology((2, world // 2), rank_to_node=place_ranks((2, world // 2), "cyclic"))
    return make_plan(topology, layout=case.layout, algorithm="hierarchical")


def _run(rank: int, world: int, case: Case, dtype: torch.dtype, seq: int | None = None
         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(ring out, dq, dk, dv of this rank's shard), (the same from the reference, sharded)."""
    length, cu = case.sequence(world)
    if seq is not None:  # bf16: one sequence for every world size
        length, cu = seq, [0, 1, 14, 15, 40, 41, 70, 90]
    q, k, v, dout = _inputs(length, case, dtype)
    want = _reference(q, k, v, dout, written_out(length, cu, case.causal, case.window))
    plan = _plan(case, world)
    position = plan.position(rank) if plan is not None else rank

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, position, world, layout=case.layout, cu_seqlens=cu)

    local = [shard(x).requires_grad_() for x in (q, k, v)]
    cu_arg = torch.tensor(cu, dtype=torch.int32) if cu is not None and rank % 2 else cu
    out = ring_attention(
        *local, causal=case.causal, layout=case.layout, plan=plan, cu_seqlens=cu_arg,
        window_size=case.window,
    )  # fmt: skip
    grads = torch.autograd.grad(out, local, shard(dout))
    return [out, *grads], [shard(x) for x in want]


def _float64_failure(rank: int, world: int, case: Case) -> str | None:
    if case.hierarchical and world != 4:
        return None
    got, want = _run(rank, world, case, torch.float64)
    for name, g, w, atol in zip(
        ("out", "dq", "dk", "dv"), got, want, (FWD_ATOL, GRAD_ATOL, GRAD_ATOL, GRAD_ATOL)
    ):
        if not torch.isfinite(g).all():
            return f"rank {rank}, {name}: not finite"
        try:
            torch.testing.assert_close(g.detach(), w, rtol=0, atol=atol)
        except AssertionError as err:
            return f"rank {rank}, {name}: {err}"
    return None


def _bf16_errors(rank: int, world: int, case: Case) -> list[float]:
    got, want = _run(rank, world, case, torch.bfloat16, seq=BF16_SEQ)
    return [float((g.detach().double() - w).abs().max()) for g, w in zip(got, want)]


def _mismatch_errors(rank: int, world: int) -> dict[str, str]:
    """cu_seqlens or window_size that differ between ranks: every rank raises."""
    q = torch.zeros(1, 6, 2, 8, dtype=torch.float64)
    errors = {}
    for name, kwargs in (
        ("cu_seqlens", {"cu_seqlens": [0, 3, 6 * world] if rank == 0 else [0, 4, 6 * world]}),
        ("window_size", {"window_size": (2, -1) if rank == 0 else (3, -1)}),
    ):
        try:
            ring_attention(q, q, q, causal=True, **kwargs)
            errors[name] = "no error"
        except ValueError as err:
            errors[name] = str(err)
    return errors


def _worker(rank: int, world: int) -> dict[str, Any]:
    report: dict[str, Any] = {}
    if world in WORLD_SIZES:
        report.update({c.name: _float64_failure(rank, world, c) for c in CASES})
    if world in (1, 8):
        for case in BF16_CASES:
            report["bf16-" + case.name] = _bf16_errors(rank, world, case)
    if world == 2:
        report["mismatch"] = _mismatch_errors(rank, world)
    return report


@cache
def _results(world: int) -> list[dict[str, Any]]:
    return run_workers(_worker, world)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_masks_match_sdpa(world: int, case: Case) -> None:
    failures = [r[case.name] for r in _results(world) if r[case.name]]
    assert not failures, f"W={world} {case.name}: {failures[0]}"


@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16_error_at_eight_ranks(case: Case) -> None:
    def worst(world: int) -> list[float]:
        per_rank = [r["bf16-" + case.name] for r in _results(world)]
        return [max(errs) for errs in zip(*per_rank)]

    one, eight = worst(1), worst(8)
    for name, e1, e8 in zip(("out", "dq", "dk", "dv"), one, eight):
        assert e8 <= 1.5 * e1, f"{case.name} {name}: error {e8:.3g} at W=8 > 1.5 x {e1:.3g} at W=1"
        assert e1 > 0 and math.isfinite(e8)


def test_masks_that_differ_between_ranks_raise_everywhere() -> None:
    for rank, report in enumerate(_results(2)):
        errors = report["mismatch"]
        assert "cu_seqlens differs between ranks" in errors["cu_seqlens"], (rank, errors)
        assert "window_size differs between ranks" in errors["window_size"], (rank, errors)


# ---------------------------------------------------------------- bad input, one process


def _qkv(s: int = 4) -> list[torch.Tensor]:
    return [torch.zeros(1, s, 2, 8), torch.zeros(1, s, 1, 8), torch.zeros(1, s, 1, 8)]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"cu_seqlens": [1, 4]}, "cu_seqlens=[1, 4] must start at 0"),
        ({"cu_seqlens": [0, 3, 2]}, "strictly increasing"),
        ({"cu_seqlens": [0, 5]}, "cu_seqlens[-1]=5 exceeds the sequence length 4"),
        ({"cu_seqlens": torch.tensor([0.0, 4.0])}, "cu_seqlens.dtype=torch.float32"),
        ({"cu_seqlens": torch.tensor([[0, 4]])}, "1-D tensor"),
        ({"cu_seqlens": torch.tensor([0, 4], device="meta")}, "cu_seqlens is on meta"),
        ({"window_size": (-2, 0)}, "window_size=(-2, 0)"),
        ({"window_size": (1, 2, 3)}, "window_size=(1, 2, 3)"),
        ({"window_size": 4}, "window_size=4"),
        ({"layout": "docs", "cu_seqlens": [0, 5]}, "cu_seqlens[-1]=5 exceeds"),
    ],
)
def test_bad_masks_raise_value_error(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        ring_attention(*_qkv(), causal=True, **kwargs)
    assert fragment in str(info.value)
