"""The one mask (ringctl.ring.mask): per-row key ranges against the mask written out element
by element, and the checks of document boundaries and windows."""

from __future__ import annotations

import random

import pytest
import torch

from ringctl.ring.mask import MaskSpec, as_cu_seqlens


def written_out(
    q_pos: list[int], k_pos: list[int], cu: list[int] | None, causal: bool, window: tuple[int, int]
) -> torch.Tensor:
    """(Sq, Sk) bool from the definition: same document (none after the last boundary),
    j <= i when causal, i - j <= left and j - i <= right (-1: unbounded)."""
    bounds = cu if cu is not None else [0, 10**9]

    def doc(x: int) -> int:
        return next((d for d in range(len(bounds) - 1) if bounds[d] <= x < bounds[d + 1]), -1)

    left, right = window
    rows = []
    for i in q_pos:
        rows.append([
            doc(i) >= 0 and doc(i) == doc(j) and not (causal and j > i)
            and (left < 0 or i - j <= left) and (right < 0 or j - i <= right)
            for j in k_pos
        ])  # fmt: skip
    return torch.tensor(rows, dtype=torch.bool).reshape(len(q_pos), len(k_pos))


def _random_case(rng: random.Random) -> tuple[list[int], list[int], list[int] | None, bool, tuple[int, int]]:
    seq = rng.randint(1, 60)
    cuts = sorted(rng.sample(range(1, seq + 1), rng.randint(1, min(6, seq))))
    cu = None if rng.random() < 0.2 else [0, *cuts]
    q_pos = sorted(rng.sample(range(seq), rng.randint(1, seq)))
    k_pos = sorted(rng.sample(range(seq), rng.randint(1, seq)))
    window = (rng.choice([-1, 0, 1, 4, 9]), rng.choice([-1, 0, 2, 7]))
    return q_pos, k_pos, cu, rng.random() < 0.5, window


@pytest.mark.parametrize("seed", range(6))
def test_ranges_are_the_mask(seed: int) -> None:
    """Visible keys of every row are exactly [lo, hi), and lo/hi never decrease."""
    rng = random.Random(seed)
    for _ in range(40):
        q_pos, k_pos, cu, causal, window = _random_case(rng)
        spec = MaskSpec(tuple(cu) if cu else None, causal, window)
        lo, hi = spec.ranges(torch.tensor(q_pos), torch.tensor(k_pos))
        cols = torch.arange(len(k_pos))
        got = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        want = written_out(q_pos, k_pos, cu, causal, window)
        assert torch.equal(got, want), (q_pos, k_pos, cu, causal, window)
        assert bool((lo[1:] >= lo[:-1]).all()) and bool((hi[1:] >= hi[:-1]).all())
        assert bool((lo <= hi).all())


def test_padding_and_single_token_documents() -> None:
    """Tokens after the last boundary see nothing and are seen by nobody; a document of one
    token sees only itself."""
    spec = MaskSpec((0, 1, 2, 5), causal=False)
    pos = torch.arange(8)
    lo, hi = spec.ranges(pos, pos)
    assert lo.tolist() == [0, 1, 2, 2, 2, 5, 5, 5]
    assert hi.tolist() == [1, 2, 5, 5, 5, 5, 5, 5]


def test_no_mask_is_every_key() -> None:
    lo, hi = MaskSpec().ranges(torch.arange(3), torch.arange(5) + 100)
    assert lo.tolist() == [0, 0, 0] and hi.tolist() == [5, 5, 5]
    assert MaskSpec().is_full and not MaskSpec(causal=True).is_full


def test_digest_tells_boundaries_apart() -> None:
    a, b = MaskSpec((0, 3, 9)), MaskSpec((0, 4, 9))
    assert a.digest() == MaskSpec((0, 3, 9), causal=True).digest() != b.digest()
    assert MaskSpec().digest() == 0 and 0 < a.digest() < 2**62


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"causal": 1}, "causal=1 must be a bool"),
        ({"window": (-2, 0)}, "window_size=(-2, 0)"),
        ({"window": (1,)}, "window_size=(1,)"),
        ({"window": (1.0, 2)}, "two ints"),
        ({"cu_seqlens": (1, 4)}, "must start at 0"),
        ({"cu_seqlens": (0, 4, 4)}, "strictly increasing"),
        ({"cu_seqlens": (0, 2.0)}, "cu_seqlens[1]=2.0 is not an int"),
    ],
)
def test_bad_mask_raises(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        MaskSpec(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (torch.tensor([0.0, 3.0]), "cu_seqlens.dtype=torch.float32"),
        (torch.tensor([[0, 3]]), "1-D tensor"),
        (torch.tensor([0, 3], device="meta"), "on meta"),
        (torch.tensor([0, 3, 20]), "cu_seqlens[-1]=20 exceeds the sequence length 16"),
        ([0, 5, 3], "strictly increasing"),
        ("0,5", "must be a sequence of ints"),
    ],
)
def test_bad_boundaries_raise(value: object, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        as_cu_seqlens(value, 16)
    assert fragment in str(info.value)


def test_boundaries_from_tensor_or_list() -> None:
    assert as_cu_seqlens(torch.tensor([0, 3, 7], dtype=torch.int32), 8) == (0, 3, 7)
    assert as_cu_seqlens([0, 8], 8) == (0, 8)
    assert as_cu_seqlens(None, 8) is None


# ---------------------------------------------------------------- block compute from ranges


def _naive_block(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, visible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) by definition with a bool mask; rows that see nothing: 0, -inf."""
    groups = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(groups, 2), v.repeat_interleave(groups, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * scale
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, vv), lse


@pytest.mark.parametrize("path", ["flash", "matmul"])
@pytest.mark.parametrize("seed", range(3))
def test_block_compute_from_ranges(path: str, seed: int) -> None:
    """The torch block path given a mask as ranges (random documents, causal, windows; rows
    cut in small tiles) gives the masked attention and its gradients; tiles never hold a
    row that sees nothing, nor keys outside what their rows see."""
    from ringctl.ring import block

    rng = random.Random(100 + seed)
    for trial in range(12):
        q_pos, k_pos, cu, causal, window = _random_case(rng)
        spec = MaskSpec(tuple(cu) if cu else None, causal, window)
        lo, hi = spec.ranges(torch.tensor(q_pos), torch.tensor(k_pos))
        visible = written_out(q_pos, k_pos, cu, causal, window)
        gen = torch.Generator().manual_seed(seed * 100 + trial)
        q = torch.randn(1, len(q_pos), 4, 8, generator=gen, dtype=torch.float64)
        k, v = (torch.randn(1, len(k_pos), 2, 8, generator=gen, dtype=torch.float64) for _ in range(2))
        mask = block.BlockMask(lo, hi)
        max_rows = rng.choice([None, 3])
        for tile in block.tiles(len(q_pos), len(k_pos), mask, max_rows):
            seen = visible[tile.rows]
            assert bool(seen.any(1).all()), "a tile holds a row that sees nothing"
            assert not seen[:, : tile.keys.start].any() and not seen[:, tile.keys.stop :].any()
        out, lse = block._torch_forward(q, k, v, 0.3, None, None, path=path, mask=mask)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        ref, ref_lse = _naive_block(leaves[0], leaves[1], leaves[2], 0.3, visible)
        torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(lse, ref_lse.detach(), rtol=0, atol=1e-12)
        dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        want = torch.autograd.grad(ref, leaves, dout)
        got = block._torch_backward(dout, q, k, v, out, lse, 0.3, None, None, path=path, mask=mask)
        for g, w in zip(got, want, strict=True):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, rtol=0, atol=1e-11)
