"""Triton block kernels on the CPU, under triton's interpreter, against a float64 reference.

TRITON_INTERPRET=1 must hold when triton and the kernels are *imported* (triton.jit picks
interpreter or compiler at decoration time, triton's own tl.* helpers included), so it is
set here, before this module imports triton; pytest imports test modules before running any
test, and no other module imports triton at import time. Should one ever do so first, this
module fails at collection with the fix (TRITON_INTERPRET=1 in the environment, or this
line moved to a conftest.py) rather than run half-interpreted kernels. Leaving the variable
set for the rest of the process is harmless: nothing else runs triton on the CPU, and the
gloo workers of the ring test inherit it, as they must.

The reference is plain matmul-softmax in float64 with the position mask, written here
independently of the kernels; gradients come from autograd through it. Shapes are small and
the interpreter's tiles are 32x16 (forward, dq) and 16x32 (dk/dv), so every case spans
several unequal q and kv tiles, ragged edges included. The last test runs ring_attention on
2 gloo processes with RINGCTL_BLOCK_IMPL=triton against SDPA on the whole sequence.
"""

from __future__ import annotations

import os
import sys

_TRITON_COMPILED_MODE = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import ringctl_kernels  # noqa: E402

if _TRITON_COMPILED_MODE or not ringctl_kernels.interpreting():
    raise RuntimeError(
        "triton was imported before tests/test_kernels.py set TRITON_INTERPRET=1, so its kernels "
        "cannot run on the CPU in this process; run pytest with TRITON_INTERPRET=1 in the "
        "environment (or set it in tests/conftest.py)"
    )

from ringctl_kernels import block_backward, block_forward  # noqa: E402

TOL = {  # (atol, rtol) against float64; low precision: P is rounded to the input dtype
    torch.float32: (3e-5, 1e-4),
    torch.float16: (4e-3, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B,Sq,Hq,D), lse (B,Hq,Sq) of softmax attention in the dtype given (float64 here)."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if q_pos is not None:
        assert k_pos is not None, "q_pos and k_pos come together"
        visible = k_pos[None, :] <= q_pos[:, None]
        s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)  # rows with nothing visible: 0
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The ring's merge of per-block (out, lse); -inf rows stay 0 / -inf."""
    lse = parts[0][1]
    for _, lse_b in parts[1:]:
        lse = torch.logaddexp(lse, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    # safe is finite, so -inf rows give weight 0
    weighted = [torch.exp(lse_b - safe).transpose(1, 2)[..., None] * out_b for out_b, lse_b in parts]
    out = weighted[0]
    for part in weighted[1:]:
        out = out + part
    return out, lse


@dataclass(frozen=True)
class Case:
    """Query block and the kv blocks of a small 'ring'; positions None = no mask."""

    name: str
    batch: int
    hq: int
    hkv: int
    head_dim: int
    q_pos: list[int] | int  # positions, or the length when unmasked
    k_pos: list[list[int]] | list[int]  # one entry per kv block: positions or lengths

    @property
    def masked(self) -> bool:
        return isinstance(self.q_pos, list)

    @property
    def sq(self) -> int:
        return len(self.q_pos) if isinstance(self.q_pos, list) else self.q_pos

    def sk(self, i: int) -> int:
        kp = self.k_pos[i]
        return len(kp) if isinstance(kp, list) else kp


def _r(a: int, b: int, step: int = 1) -> list[int]:
    return list(range(a, b, step))


CASES = [
    # no mask, ragged Sq/Sk, GQA 2:1
    Case("none-gqa", 2, 4, 2, 16, 45, [37, 26]),
    # contiguous causal: q is chunk 1 of 2; kv chunk 0 (all visible) and chunk 1 (diagonal)
    Case("causal-contiguous", 1, 2, 2, 16, _r(40, 80), [_r(0, 40), _r(40, 80)]),
    # zigzag, W=2, chunks of 12: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2
    Case("zigzag", 1, 4, 1, 16, _r(0, 12) + _r(36, 48), [_r(0, 12) + _r(36, 48), _r(12, 36)]),
    # striped, W=2: q on rank 0 (even tokens); its first row sees nothing of rank 1's block
    Case("striped-gqa", 1, 4, 2, 16, _r(0, 80, 2), [_r(0, 80, 2), _r(1, 80, 2)]),
    # rows 0..9 see no key at all: out 0, lse -inf, zero gradients, no NaN
    Case("fully-masked-rows", 1, 2, 1, 16, _r(0, 40), [_r(10, 30), _r(30, 50)]),
]


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    # q as a strided view (B,H,S,D) -> (B,S,H,D): the kernels take strides, not copies
    q = rnd(case.batch, case.hq, case.sq, case.head_dim).transpose(1, 2)
    ks = [rnd(case.batch, case.sk(i), case.hkv, case.head_dim) for i in range(len(case.k_pos))]
    vs = [rnd(case.batch, case.sk(i), case.hkv, case.head_dim) for i in range(len(case.k_pos))]
    dout = rnd(case.batch, case.sq, case.hq, case.head_dim)
    if case.masked:
        q_pos: torch.Tensor | None = torch.tensor(case.q_pos)
        k_pos: list[torch.Tensor | None] = [torch.tensor(p) for p in case.k_pos]
    else:
        q_pos, k_pos = None, [None] * len(case.k_pos)
    return q, ks, vs, dout, q_pos, k_pos


def check_ring(case: Case, dtype: torch.dtype) -> None:
    """Forward per block + merge, then backward per block with the FINAL out/lse."""
    q, ks, vs, dout, q_pos, k_pos = make_inputs(case, dtype)
    scale = case.head_dim ** -0.5
    atol, rtol = TOL[dtype]

    parts = []
    for k, v, kp in zip(ks, vs, k_pos):
        out_b, lse_b = block_forward(q, k, v, scale=scale, q_pos=q_pos, k_pos=kp)
        assert out_b.dtype == torch.float32 and lse_b.dtype == torch.float32
        ref_out_b, ref_lse_b = reference(q.double(), k.double(), v.double(), scale, q_pos, kp)
        torch.testing.assert_close(out_b.double(), ref_out_b, atol=atol, rtol=rtol)
        torch.testing.assert_close(lse_b.double(), ref_lse_b, atol=atol, rtol=rtol)
        parts.append((out_b, lse_b))
    out, lse = merge(parts)

    # reference over the whole key set, float64, with autograd for the gradients
    qd = q.double().requires_grad_()
    kd = [k.double().requires_grad_() for k in ks]
    vd = [v.double().requires_grad_() for v in vs]
    kp_all = torch.cat(k_pos) if case.masked else None
    ref_out, ref_lse = reference(qd, torch.cat(kd, 1), torch.cat(vd, 1), scale, q_pos, kp_all)
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=atol, rtol=rtol)
    ref_out.backward(dout.double())

    dq = torch.zeros_like(out)
    for i, (k, v, kp) in enumerate(zip(ks, vs, k_pos)):
        dq_b, dk_b, dv_b = block_backward(dout, q, k, v, out, lse, scale=scale, q_pos=q_pos, k_pos=kp)
        assert dk_b.shape == k.shape and dv_b.shape == v.shape
        dq += dq_b
        torch.testing.assert_close(dk_b.double(), kd[i].grad, atol=atol, rtol=rtol)
        torch.testing.assert_close(dv_b.double(), vd[i].grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(dq.double(), qd.grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_ring_blocks_float32(case: Case) -> None:
    check_ring(case, torch.float32)


def test_fully_masked_rows_are_zero_not_nan() -> None:
    case = CASES[-1]
    q, ks, vs, dout, q_pos, k_pos = make_inputs(case, torch.float32)
    out, lse = block_forward(q, ks[0], vs[0], scale=0.25, q_pos=q_pos, k_pos=k_pos[0])
    hidden = q_pos < 10  # rows before every key of block 0
    assert torch.isneginf(lse[:, :, hidden]).all() and torch.isfinite(lse[:, :, ~hidden]).all()
    assert (out[:, hidden] == 0).all()
    dq, dk, dv = block_backward(dout, q, ks[0], vs[0], out, lse, scale=0.25, q_pos=q_pos, k_pos=k_pos[0])
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert (dq[:, hidden] == 0).all()


# ---------------------------------------------------------------- masks given as key ranges


def visible_matrix(
    q_pos: list[int], k_pos: list[int], cu: list[int], causal: bool, window: tuple[int, int]
) -> torch.Tensor:
    """(Sq, Sk) bool: the mask written out element by element (the definition, not ranges)."""
    def doc(x: int) -> int:
        return next((d for d in range(len(cu) - 1) if cu[d] <= x < cu[d + 1]), -1)

    left, right = window
    out = torch.zeros(len(q_pos), len(k_pos), dtype=torch.bool)
    for r, i in enumerate(q_pos):
        for c, j in enumerate(k_pos):
            out[r, c] = (
                doc(i) >= 0 and doc(i) == doc(j) and not (causal and j > i)
                and (left < 0 or i - j <= left) and (right < 0 or j - i <= right)
            )  # fmt: skip
    return out


def ranges_of(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row [lo, hi) of a mask whose rows are contiguous and ascending; a row that sees
    nothing gets the empty range where the previous row's ended."""
    lo, hi, end = [], [], 0
    for row in visible:
        cols = row.nonzero().flatten().tolist()
        if cols:
            assert cols == list(range(cols[0], cols[-1] + 1)), "rows must be contiguous"
            lo.append(cols[0])
            end = cols[-1] + 1
        else:
            lo.append(end)
        hi.append(end)
    return torch.tensor(lo), torch.tensor(hi)


def reference_masked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), lse


@dataclass(frozen=True)
class MaskCase:
    """Two kv blocks of a packed sequence (documents ``cu``; positions from cu[-1] on are
    padding) seen by one query block; ranges derived from the written-out mask."""

    name: str
    q_pos: list[int]
    k_pos: list[list[int]]
    cu: list[int]
    causal: bool
    window: tuple[int, int] = (-1, -1)
    hq: int = 4
    hkv: int = 2


# docs-layout-like shards of W=2 (documents of 21, 1, 30 and 18 tokens; 10 padding tokens)
_DOC_Q = _r(0, 6) + _r(15, 21) + [21] + _r(22, 30) + _r(44, 52) + _r(52, 57) + _r(66, 70) + _r(70, 80)
_DOC_K = [x for x in range(80) if x not in _DOC_Q]
MASK_CASES = [
    MaskCase("docs-causal", _r(0, 45), [_r(0, 45), _r(45, 90)], [0, 7, 8, 30, 45, 70], True),
    MaskCase("docs-full", _r(20, 60), [_r(0, 40), _r(40, 80)], [0, 25, 26, 64], False),
    MaskCase("window-causal", _r(0, 70), [_r(0, 35), _r(35, 70)], [0, 70], True, (9, -1)),
    MaskCase("window-both", _r(10, 50), [_r(0, 40), _r(40, 80)], [0, 33, 80], False, (4, 6), 2, 1),
    MaskCase("docs-layout", _DOC_Q, [_DOC_Q, _DOC_K], [0, 21, 22, 52, 70], True),
    MaskCase("docs-layout-window", _DOC_K, [_DOC_Q, _DOC_K], [0, 21, 22, 52, 70], True, (5, 0)),
]


@pytest.mark.parametrize("case", MASK_CASES, ids=lambda c: c.name)
def test_masks_as_ranges_float32(case: MaskCase) -> None:
    """Forward per block + merge, backward per block, against the float64 reference with the
    mask written out; every case has rows that see nothing in some block (skipped tiles)."""
    gen = torch.Generator().manual_seed(len(case.q_pos))
    d, sq = 16, len(case.q_pos)
    q = torch.randn(1, case.hq, sq, d, generator=gen).transpose(1, 2)
    ks = [torch.randn(1, len(kp), case.hkv, d, generator=gen) for kp in case.k_pos]
    vs = [torch.randn(1, len(kp), case.hkv, d, generator=gen) for kp in case.k_pos]
    dout = torch.randn(1, sq, case.hq, d, generator=gen)
    masks = [visible_matrix(case.q_pos, kp, case.cu, case.causal, case.window) for kp in case.k_pos]
    scale, (atol, rtol) = d**-0.5, TOL[torch.float32]
    parts = []
    for k, v, visible in zip(ks, vs, masks):
        out_b, lse_b = block_forward(q, k, v, scale=scale, ranges=ranges_of(visible))
        ref_out_b, ref_lse_b = reference_masked(q.double(), k.double(), v.double(), scale, visible)
        torch.testing.assert_close(out_b.double(), ref_out_b, atol=atol, rtol=rtol)
        torch.testing.assert_close(lse_b.double(), ref_lse_b, atol=atol, rtol=rtol)
        parts.append((out_b, lse_b))
    out, lse = merge(parts)
    qd = q.double().requires_grad_()
    kd = [k.double().requires_grad_() for k in ks]
    vd = [v.double().requires_grad_() for v in vs]
    ref_out, _ = reference_masked(qd, torch.cat(kd, 1), torch.cat(vd, 1), scale, torch.cat(masks, 1))
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=atol, rtol=rtol)
    ref_out.backward(dout.double())
    dq = torch.zeros_like(out)
    for i, (k, v, visible) in enumerate(zip(ks, vs, masks)):
        dq_b, dk_b, dv_b = block_backward(
            dout, q, k, v, out, lse, scale=scale, ranges=ranges_of(visible)
        )
        dq += dq_b
        torch.testing.assert_close(dk_b.double(), kd[i].grad, atol=atol, rtol=rtol)
        torch.testing.assert_close(dv_b.double(), vd[i].grad, atol=atol, rtol=rtol)
    torch.testing.assert_close(dq.double(), qd.grad, atol=atol, rtol=rtol)
    hidden = ~torch.cat(masks, 1).any(1)  # padding rows: zeros, never NaN
    assert hidden.any() == (max(case.q_pos) >= case.cu[-1])
    assert (out[:, hidden] == 0).all() and (dq[:, hidden] == 0).all()


@pytest.mark.parametrize(
    "ranges, match",
    [
        ((torch.tensor([0, 2, 1, 3, 3, 3, 3, 3]), torch.full((8,), 4)), "lo must not decrease"),
        ((torch.zeros(8, dtype=torch.int64), torch.tensor([1, 2, 3, 2, 4, 4, 4, 4])),
         "hi must not decrease"),
        ((torch.full((8,), 3), torch.full((8,), 2)), "lo <= hi"),
        ((torch.zeros(8, dtype=torch.int64), torch.full((8,), 9)), "hi <= 8"),
        ((torch.zeros(7, dtype=torch.int64), torch.full((7,), 8)), "length 8"),
        ((torch.zeros(8), torch.full((8,), 8.0)), "integer"),
    ],
    ids=["lo-order", "hi-order", "lo-gt-hi", "hi-past-keys", "length", "float"],
)
def test_bad_ranges_raise(ranges: tuple[torch.Tensor, torch.Tensor], match: str) -> None:
    q, kv = _qkv()
    with pytest.raises(ValueError, match=match):
        block_forward(q, kv, kv, scale=0.25, ranges=ranges)


def test_ranges_and_positions_are_exclusive() -> None:
    q, kv = _qkv()
    with pytest.raises(ValueError, match="not both"):
        block_forward(q, kv, kv, scale=0.25, q_pos=torch.arange(8), k_pos=torch.arange(8),
                      ranges=(torch.zeros(8, dtype=torch.int64), torch.full((8,), 8)))


@pytest.mark.parametrize(
    "dtype, head_dim",
    [(torch.float16, 64), (torch.bfloat16, 128), (torch.float32, 32)],
    ids=["fp16-d64", "bf16-d128", "fp32-d32"],
)
def test_dtypes_and_head_dims(dtype: torch.dtype, head_dim: int) -> None:
    case = Case(f"causal-d{head_dim}", 1, 2, 1, head_dim, _r(0, 33), [_r(0, 33)])
    check_ring(case, dtype)


def test_empty_kv_block_gives_empty_rows() -> None:
    q = torch.randn(1, 5, 2, 16)
    kv = torch.randn(1, 0, 1, 16)
    out, lse = block_forward(q, kv, kv, scale=0.25)
    assert (out == 0).all() and torch.isneginf(lse).all() and lse.shape == (1, 2, 5)


def _qkv(
    d: int = 16, dtype: torch.dtype = torch.float32, hq: int = 2, hkv: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 8, hq, d, dtype=dtype), torch.randn(1, 8, hkv, d, dtype=dtype)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d": 48}, r"head_dim 48 .*allowed: \(16, 32, 64, 128\)"),
        ({"dtype": torch.float64}, r"float64 .*torch path"),
        ({"hq": 3, "hkv": 2}, r"Hq \(3\) must be a multiple of Hkv \(2\)"),
    ],
    ids=["head_dim", "float64", "gqa"],
)
def test_bad_inputs_raise(kwargs: dict, match: str) -> None:
    q, kv = _qkv(**kwargs)
    with pytest.raises(ValueError, match=match):
        block_forward(q, kv, kv, scale=0.25)


@pytest.mark.parametrize(
    "q_pos, k_pos, match",
    [
        (torch.arange(8), None, "both be given or both be None"),
        (torch.arange(8), torch.arange(8).flip(0), "k_pos must be sorted ascending"),
        (torch.arange(8).float(), torch.arange(8), "integer token positions"),
        (torch.arange(7), torch.arange(8), "q_pos must be a 1-D tensor of length 8"),
    ],
    ids=["one-missing", "unsorted", "float", "length"],
)
def test_bad_positions_raise(q_pos: torch.Tensor, k_pos: torch.Tensor | None, match: str) -> None:
    q, kv = _qkv()
    with pytest.raises(ValueError, match=match):
        block_forward(q, kv, kv, scale=0.25, q_pos=q_pos, k_pos=k_pos)


def test_backward_checks_lse_shape() -> None:
    q, kv = _qkv()
    with pytest.raises(ValueError, match=r"lse must have shape \(1, 2, 8\)"):
        block_backward(q, q, kv, kv, q.float(), torch.zeros(1, 8, 2), scale=0.25)


def test_int32_extent_is_checked() -> None:
    q = torch.zeros(1, 1, 1, 16).expand(1, 2**27 + 1, 1, 16)  # no memory: stride 0 view
    with pytest.raises(ValueError, match=r"spans >= 2\*\*31 elements per batch entry"):
        block_forward(q, q[:, :4], q[:, :4], scale=0.25)


# ---------------------------------------------------------------- the ring through the kernels

RING_WORLD = 2
RING_CASES = [("zigzag", True, 4, 2), ("striped", True, 2, 2), ("contiguous", False, 4, 1)]
# (layout, causal, Hq, Hkv, cu_seqlens, window): packed documents with a padded tail, windows
MASK_RING_CASES = [
    ("docs", True, 4, 2, [0, 1, 14, 15, 30, 41], (-1, -1)),
    ("zigzag", False, 2, 1, [0, 20, 21, 44], (5, 3)),
    ("striped", True, 4, 4, [0, 9, 10, 36], (7, -1)),
]


def _ring_worker(rank: int, world: int) -> list[dict]:
    """On each gloo rank: ring_attention with RINGCTL_BLOCK_IMPL=triton (interpreter)."""
    os.environ["RINGCTL_BLOCK_IMPL"] = "triton"  # _dist sets only a default ("torch")
    kernels_used = []  # a spy on the real kernels: the dispatcher must route here
    real_forward = ringctl_kernels.block_forward

    def counting_forward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        kernels_used.append(1)
        return real_forward(*args, **kwargs)

    ringctl_kernels.block_forward = counting_forward
    try:  # the pool's process runs other calls next (tests/_dist.py)
        reports = _ring_reports(rank, world)
    finally:
        ringctl_kernels.block_forward = real_forward
    return [{"kernel_calls": len(kernels_used)}, *reports]


def _ring_reports(rank: int, world: int) -> list[dict]:
    from ringctl.ring import ring_attention, shard_sequence

    reports = []
    for layout, causal, hq, hkv in RING_CASES:
        q, k, v, dout = _ring_inputs(hq, hkv)
        local = [shard_sequence(x, rank, world, layout=layout).requires_grad_() for x in (q, k, v)]
        out = ring_attention(*local, causal=causal, layout=layout)
        grads = torch.autograd.grad(out, local, shard_sequence(dout, rank, world, layout=layout))
        # numpy arrays travel by value; tensors would go through shared memory owned by
        # this process, which may have exited by the time the parent reads them
        reports.append({"out": out.detach().numpy(), "grads": [g.detach().numpy() for g in grads]})
    for layout, causal, hq, hkv, cu, window in MASK_RING_CASES:
        q, k, v, dout = _ring_inputs(hq, hkv)

        def shard(x: torch.Tensor, layout: str = layout, cu: list[int] = cu) -> torch.Tensor:
            return shard_sequence(x, rank, world, layout=layout, cu_seqlens=cu)

        local = [shard(x).requires_grad_() for x in (q, k, v)]
        out = ring_attention(
            *local, causal=causal, layout=layout, cu_seqlens=cu, window_size=window
        )
        grads = torch.autograd.grad(out, local, shard(dout))
        reports.append({"out": out.detach().numpy(), "grads": [g.detach().numpy() for g in grads]})
    return reports


def _ring_inputs(hq: int, hkv: int, seq: int = 48, d: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    shapes = [(1, seq, hq, d), (1, seq, hkv, d), (1, seq, hkv, d), (1, seq, hq, d)]
    return [torch.randn(s, generator=gen) for s in shapes]


def _prefixed(label: str) -> Callable[[str], str]:
    """assert_close's message with `label` in front (bound now, not when it is called)."""
    return lambda message: f"{label}: {message}"


def test_ring_attention_through_kernels_matches_sdpa() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from _dist import run_workers
    from ringctl.ring import shard_sequence

    results = run_workers(_ring_worker, RING_WORLD)
    assert all(r[0]["kernel_calls"] > 0 for r in results), "dispatcher did not use ringctl_kernels"
    for i, (layout, causal, hq, hkv) in enumerate(RING_CASES):
        q, k, v, dout = (x.double() for x in _ring_inputs(hq, hkv))
        leaves = [x.requires_grad_() for x in (q, k, v)]
        qt, kt, vt = (x.transpose(1, 2) for x in leaves)
        with sdpa_kernel(SDPBackend.MATH):
            ref = torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=causal, enable_gqa=True
            ).transpose(1, 2)
        ref_grads = torch.autograd.grad(ref, leaves, dout)
        for rank, per_rank in enumerate(results):
            got = per_rank[1 + i]
            for name, g, w in zip(("out", "dq", "dk", "dv"), [got["out"], *got["grads"]],
                                  [ref, *ref_grads]):
                want = shard_sequence(w.detach(), rank, RING_WORLD, layout=layout)
                torch.testing.assert_close(
                    torch.from_numpy(g).double(), want, atol=3e-5, rtol=1e-4,
                    msg=_prefixed(f"{layout} causal={causal} rank {rank} {name}"),
                )
    for i, (layout, causal, hq, hkv, cu, window) in enumerate(MASK_RING_CASES):
        q, k, v, dout = (x.double() for x in _ring_inputs(hq, hkv))
        seq = q.shape[1]
        sees = torch.zeros(seq, seq, dtype=torch.bool)
        for d in range(len(cu) - 1):
            sees[cu[d] : cu[d + 1], cu[d] : cu[d + 1]] = True
        rows, cols = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
        if causal:
            sees &= cols <= rows
        if window[0] >= 0:
            sees &= rows - cols <= window[0]
        if window[1] >= 0:
            sees &= cols - rows <= window[1]
        empty = ~sees.any(1)  # padding rows: SDPA would give NaN; the answer is 0, no gradient
        safe = sees | (empty[:, None] & (cols == 0))
        leaves = [x.requires_grad_() for x in (q, k, v)]
        qt, kt, vt = (x.transpose(1, 2) for x in leaves)
        with sdpa_kernel(SDPBackend.MATH):
            ref = torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, attn_mask=safe, enable_gqa=True
            ).transpose(1, 2)
        ref = ref.masked_fill(empty[None, :, None, None], 0.0)
        ref_grads = torch.autograd.grad(ref, leaves, dout.masked_fill(empty[None, :, None, None], 0.0))
        for rank, per_rank in enumerate(results):
            got = per_rank[1 + len(RING_CASES) + i]
            for name, g, w in zip(("out", "dq", "dk", "dv"), [got["out"], *got["grads"]],
                                  [ref, *ref_grads]):
                want = shard_sequence(w.detach(), rank, RING_WORLD, layout=layout, cu_seqlens=cu)
                torch.testing.assert_close(
                    torch.from_numpy(g).double(), want, atol=3e-5, rtol=1e-4,
                    msg=_prefixed(f"{layout} cu={cu} window={window} rank {rank} {name}"),
                )
