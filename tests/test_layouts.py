"""shard_sequence / unshard_sequence: the documented token sets, exact inverses, bad input."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ringctl.ring import LAYOUTS, shard_sequence, unshard_sequence
from ringctl.ring.layouts import token_positions


@pytest.mark.parametrize(
    ("layout", "world", "seq_len", "expected"),
    [
        ("contiguous", 3, 6, [[0, 1], [2, 3], [4, 5]]),
        ("zigzag", 2, 8, [[0, 1, 6, 7], [2, 3, 4, 5]]),
        ("zigzag", 3, 6, [[0, 5], [1, 4], [2, 3]]),
        ("striped", 3, 9, [[0, 3, 6], [1, 4, 7], [2, 5, 8]]),
        ("zigzag", 1, 4, [[0, 1, 2, 3]]),
    ],
)
def test_token_positions(layout: str, world: int, seq_len: int, expected: list[list[int]]) -> None:
    got = [token_positions(seq_len, p, world, layout).tolist() for p in range(world)]
    assert got == expected


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("dim", [1, 0, -2])
def test_shard_unshard_exact_inverse(layout: str, world: int, dim: int) -> None:
    seq_len = 2 * world * 3
    shape = [2, 3, 5]
    shape[dim] = seq_len
    x = torch.randn(shape, dtype=torch.float64)
    shards = [shard_sequence(x, p, world, layout=layout, dim=dim) for p in range(world)]
    for p, shard in enumerate(shards):
        assert shard.is_contiguous()
        index = token_positions(seq_len, p, world, layout)
        torch.testing.assert_close(shard, x.index_select(dim, index), rtol=0, atol=0)
    torch.testing.assert_close(unshard_sequence(shards, layout=layout, dim=dim), x, rtol=0, atol=0)
    # every token sits in exactly one shard, and positions ascend inside each shard
    all_positions = torch.cat([token_positions(seq_len, p, world, layout) for p in range(world)])
    assert sorted(all_positions.tolist()) == list(range(seq_len))
    for p in range(world):
        pos = token_positions(seq_len, p, world, layout)
        assert bool((pos[1:] > pos[:-1]).all())


def test_bf16_roundtrip_keeps_bits() -> None:
    x = torch.randn(2, 24, 3, 4).to(torch.bfloat16)
    shards = [shard_sequence(x, p, 4, layout="striped") for p in range(4)]
    assert torch.equal(unshard_sequence(shards, layout="striped"), x)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda x: shard_sequence(x, 0, 2, layout="diagonal"), "layout='diagonal'"),
        (lambda x: shard_sequence(x, 0, 5, layout="zigzag"), "multiple of 10"),
        (lambda x: shard_sequence(x, 0, 7, layout="striped"), "multiple of 7"),
        (lambda x: shard_sequence(x, 2, 2), "position=2"),
        (lambda x: shard_sequence(x, 0, 0), "world_size=0"),
        (lambda x: shard_sequence(x, 0, 2, dim=3), "dim=3"),
        (lambda x: shard_sequence(x.tolist(), 0, 2), "x must be a torch.Tensor"),
        (lambda x: unshard_sequence([], layout="zigzag"), "non-empty"),
        (lambda x: unshard_sequence([x, x[:, :4]]), "shards[1]"),
        (lambda x: unshard_sequence([x[:, :3], x[:, :3]], layout="zigzag"), "even length"),
        (lambda x: unshard_sequence([x, x], layout="ring"), "layout='ring'"),
    ],
)
def test_bad_input_raises_value_error(
    call: Callable[[torch.Tensor], object], fragment: str
) -> None:
    x = torch.zeros(2, 12, 3)
    with pytest.raises(ValueError) as info:
        call(x)
    assert fragment in str(info.value)
