"""The torch block implementation (both tile paths) against naive float64 attention.

The reference builds the score matrix with an explicit mask from the global positions
(query i sees key j iff k_pos[j] <= q_pos[i]) and uses autograd; nothing is shared with
ringctl.ring.block except the contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from ringctl.ring import block
from ringctl.ring.merge import merge_block

B, HQ, HKV, D = 2, 4, 2, 16
PATHS = ("flash", "matmul")


def _naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) by definition; rows that see no key give out 0, lse -inf."""
    groups = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(groups, dim=2)
    vv = v.repeat_interleave(groups, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    if q_pos is not None:
        assert k_pos is not None, "q_pos and k_pos come together"
        s = s.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


# (name, q positions, k positions): the block shapes the layouts produce, plus a general one
CASES: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {
    "no-mask": (None, None),
    "diagonal": (torch.arange(12), torch.arange(12)),
    "zigzag-below": (torch.tensor([4, 5, 6, 7, 8, 9]), torch.tensor([0, 1, 10, 11])),
    "zigzag-above": (torch.tensor([0, 1, 10, 11]), torch.tensor([4, 5, 6, 7])),
    "striped-strict": (torch.arange(0, 24, 3), torch.arange(1, 24, 3)),
    "hidden": (torch.arange(0, 4), torch.arange(10, 14)),
    "general": (torch.tensor([0, 2, 3, 3, 9, 15, 16]), torch.tensor([1, 2, 4, 5, 9, 10, 20])),
}


def _inputs(
    case: str, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    q_pos, k_pos = CASES[case]
    sq = 10 if q_pos is None else q_pos.numel()
    sk = 7 if k_pos is None else k_pos.numel()
    gen = torch.Generator().manual_seed(sq * 100 + sk)
    q = torch.randn(B, sq, HQ, D, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(B, sk, HKV, D, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(B, sk, HKV, D, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v, q_pos, k_pos


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_definition(path: str, case: str) -> None:
    q, k, v, q_pos, k_pos = _inputs(case)
    scale = 1 / math.sqrt(D)
    out, lse = block._torch_forward(q, k, v, scale, q_pos, k_pos, path=path)
    ref_out, ref_lse = _naive(q, k, v, scale, q_pos, k_pos)
    assert out.dtype == lse.dtype == torch.float64
    assert lse.shape == (B, HQ, q.shape[1])
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-12)
    assert not out.isnan().any()


def _prefixed(label: str) -> Callable[[str], str]:
    """assert_close's message with `label` in front (bound now, not when it is called)."""
    return lambda message: f"{label}: {message}"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["no-mask", "zigzag-below", "striped-strict", "general"])
def test_backward_sums_to_full_gradient(path: str, case: str) -> None:
    """Two key blocks, backward of each with the *merged* out/lse, sum to autograd's grads."""
    q, k1, v1, q_pos, k1_pos = _inputs(case)
    gen = torch.Generator().manual_seed(7)
    k2 = torch.randn(k1.shape, generator=gen, dtype=torch.float64)
    v2 = torch.randn(v1.shape, generator=gen, dtype=torch.float64)
    k2_pos = None if q_pos is None else torch.arange(k1.shape[1]) - 100  # always visible
    scale = 0.3
    out, lse = block._torch_forward(q, k1, v1, scale, q_pos, k1_pos, path=path)
    out2, lse2 = block._torch_forward(q, k2, v2, scale, q_pos, k2_pos, path=path)
    merge_block(out, lse, out2, lse2)

    leaves = [x.clone().requires_grad_() for x in (q, k1, v1, k2, v2)]
    qr, k1r, v1r, k2r, v2r = leaves
    k_all, v_all = torch.cat([k2r, k1r], 1), torch.cat([v2r, v1r], 1)
    k_pos_all = None if k2_pos is None or k1_pos is None else torch.cat([k2_pos, k1_pos])
    ref, ref_lse = _naive(qr, k_all, v_all, scale, q_pos, k_pos_all)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=0, atol=1e-12)
    dout = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad(ref, leaves, dout)

    bwd = block._torch_backward
    dq1, dk1, dv1 = bwd(dout, q, k1, v1, out, lse, scale, q_pos, k1_pos, path=path)
    dq2, dk2, dv2 = bwd(dout, q, k2, v2, out, lse, scale, q_pos, k2_pos, path=path)
    for name, got, want in zip(
        ("dq", "dk1", "dv1", "dk2", "dv2"), (dq1 + dq2, dk1, dv1, dk2, dv2), expected, strict=True
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-11, msg=_prefixed(name))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_returns_float32(dtype: torch.dtype) -> None:
    q, k, v, q_pos, k_pos = _inputs("general", dtype)
    out, lse = block.block_forward(q, k, v, scale=0.25, q_pos=q_pos, k_pos=k_pos)
    assert out.dtype == lse.dtype == torch.float32
    ref_out, ref_lse = _naive(q.double(), k.double(), v.double(), 0.25, q_pos, k_pos)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)
    dq, dk, dv = block.block_backward(
        out.to(dtype), q, k, v, out, lse, scale=0.25, q_pos=q_pos, k_pos=k_pos
    )
    assert dq.dtype == dk.dtype == dv.dtype == torch.float32
    assert dk.shape == k.shape and not dk.isnan().any()


def test_hidden_rows_are_zero_and_minus_inf() -> None:
    q, k, v, q_pos, k_pos = _inputs("striped-strict")
    out, lse = block.block_forward(q, k, v, scale=0.25, q_pos=q_pos, k_pos=k_pos)
    assert torch.equal(out[:, 0], torch.zeros_like(out[:, 0]))  # query 0 sees no key 1, 4, ...
    assert bool((lse[:, :, 0] == float("-inf")).all())
    assert bool(torch.isfinite(lse[:, :, 1:]).all())


def test_merge_keeps_empty_rows_and_never_nans() -> None:
    out = torch.zeros(1, 3, 1, 2)
    lse = torch.tensor([[[float("-inf"), float("-inf"), 0.0]]])
    block_out = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]], [[3.0, 3.0]]]])
    block_lse = torch.tensor([[[0.5, float("-inf"), float("-inf")]]])
    merge_block(out, lse, block_out, block_lse)
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    assert lse.tolist() == [[[0.5, float("-inf"), 0.0]]]


def test_positions_must_come_in_pairs() -> None:
    q, k, v, q_pos, _ = _inputs("diagonal")
    with pytest.raises(ValueError, match="both"):
        block.block_forward(q, k, v, scale=1.0, q_pos=q_pos, k_pos=None)
    with pytest.raises(ValueError, match="k_pos must be a 1-D int64"):
        block.block_forward(q, k, v, scale=1.0, q_pos=q_pos, k_pos=torch.arange(3))  # k has 12


def test_impl_env_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(block.IMPL_ENV, "cuda-magic")
    q, k, v, _, _ = _inputs("no-mask")
    with pytest.raises(ValueError, match="RINGCTL_BLOCK_IMPL='cuda-magic'"):
        block.block_forward(q, k, v, scale=1.0)


@pytest.mark.parametrize("path", PATHS)
def test_strided_head_dim_reads_the_right_elements(path: str) -> None:
    """Views with stride != 1 along D (e.g. x[..., ::2]) must give the dense result."""
    q, k, v, q_pos, k_pos = _inputs("diagonal")
    wide = [torch.stack([x, torch.full_like(x, 7.0)], dim=-1).flatten(-2) for x in (q, k, v)]
    qs, ks, vs = (x[..., ::2] for x in wide)
    assert qs.stride(-1) == 2
    out, lse = block._torch_forward(qs, ks, vs, 0.25, q_pos, k_pos, path=path)
    ref_out, ref_lse = _naive(q, k, v, 0.25, q_pos, k_pos)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    dout = torch.stack([q, -q], dim=-1).flatten(-2)[..., ::2]
    got = block._torch_backward(dout, qs, ks, vs, out, lse, 0.25, q_pos, k_pos, path=path)
    want = block._torch_backward(q, q, k, v, ref_out, ref_lse, 0.25, q_pos, k_pos, path=path)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- tiles cut along keys


def _ranges_case(kind: str, sq: int, sk: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row key ranges [lo, hi) (both non-decreasing) of the mask kinds blocks get."""
    rows = torch.arange(sq)
    if kind == "causal":  # diagonal from row 0, then rows that see all earlier keys
        return torch.zeros(sq, dtype=torch.int64), (rows + 1).clamp(max=sk)
    if kind == "causal-offset":  # a diagonal that starts at key 13 (zigzag's later half)
        return torch.zeros(sq, dtype=torch.int64), (rows + 14).clamp(max=sk)
    if kind == "window":
        return (rows - 9).clamp(0, sk), (rows + 3).clamp(0, sk)
    if kind == "plateau":
        return torch.full((sq,), 2, dtype=torch.int64), torch.full((sq,), sk - 1, dtype=torch.int64)
    lo = torch.sort(torch.randint(0, sk + 1, (sq,), generator=gen)).values
    hi = torch.maximum(torch.sort(torch.randint(0, sk + 1, (sq,), generator=gen)).values, lo)
    return lo, hi


def _tile_cover(tile: block.Tile) -> torch.Tensor:
    """The (rows, keys) a tile computes, as bool: its explicit mask, top-left causal, or all."""
    n, m = tile.rows.stop - tile.rows.start, tile.keys.stop - tile.keys.start
    if tile.visible is not None:
        return tile.visible.cpu()
    if tile.causal:
        return torch.ones(n, m, dtype=torch.bool).tril()
    return torch.ones(n, m, dtype=torch.bool)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(("max_rows", "max_keys"), [(3, 3), (3, 2), (2, 5), (None, 4), (8, 8)])
@pytest.mark.parametrize("kind", ["causal", "causal-offset", "window", "plateau", "random", "none"])
def test_key_cut_tiles_cover_the_mask_once_and_stay_exact(
    kind: str, max_rows: int | None, max_keys: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiles cut along keys (and rows) cover every visible (row, key) exactly once, none
    wider than max_keys, none holding a row that sees none of its keys; causal flags only
    where the piece is top-left causal. Forward and gradients through such tiles equal the
    definition in float64."""
    sq, sk = 29, 41
    gen = torch.Generator().manual_seed(sq * sk + len(kind))
    mask = None if kind == "none" else block.BlockMask(*_ranges_case(kind, sq, sk, gen))
    cols = torch.arange(sk)
    visible = (
        torch.ones(sq, sk, dtype=torch.bool) if mask is None
        else (cols[None, :] >= mask.lo[:, None]) & (cols[None, :] < mask.hi[:, None])
    )  # fmt: skip
    found = block.tiles(sq, sk, mask, max_rows, max_keys=max_keys)
    count = torch.zeros(sq, sk, dtype=torch.int64)
    for tile in found:
        assert tile.keys.stop - tile.keys.start <= max_keys, tile
        assert max_rows is None or tile.rows.stop - tile.rows.start <= max_rows, tile
        cover = _tile_cover(tile)
        assert bool(cover.any(1).all()), f"{tile}: a row sees none of the tile's keys"
        count[tile.rows, tile.keys] += cover.to(torch.int64)
    assert torch.equal(count, visible.to(torch.int64)), "tiles do not cover the mask exactly once"

    monkeypatch.setattr(block, "_max_rows", lambda q, acc: max_rows)
    monkeypatch.setattr(block, "_max_keys", lambda q, acc: max_keys)
    q = torch.randn(B, sq, HQ, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, sk, HKV, D, generator=gen, dtype=torch.float64) for _ in range(2))
    out, lse = block._torch_forward(q, k, v, 0.3, None, None, path=path, mask=mask)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    groups = HQ // HKV
    kk, vv = (x.repeat_interleave(groups, 2) for x in leaves[1:])
    s = torch.einsum("bqhd,bkhd->bhqk", leaves[0], kk) * 0.3
    s = s.masked_fill(~visible, float("-inf"))
    ref_lse = torch.logsumexp(s, dim=-1)
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.exp(s - ref_lse.unsqueeze(-1)).nan_to_num(0.0), vv)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse.detach(), rtol=0, atol=1e-10)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    want = torch.autograd.grad(ref, leaves, dout)
    got = block._torch_backward(dout, q, k, v, out, lse, 0.3, None, None, path=path, mask=mask)
    for name, g, w in zip(("dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-9, msg=_prefixed(name))
