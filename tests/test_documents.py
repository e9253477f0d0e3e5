"""Packed documents: length distributions, the layouts' token sets (the ``docs`` layout in
particular), and the cost model's visible-pair counts against counting pair by pair."""

from __future__ import annotations

import bisect
import itertools
import random

import pytest
import torch

from ringctl.documents import (
    DocumentSpec,
    check_cu_seqlens,
    cu_seqlens_of,
    imbalance,
    layout_padding,
    parse_documents,
    rank_pairs,
    ring_sources,
    shard_len,
    shard_runs,
    step_pairs,
    visible_pairs,
)
from ringctl.errors import ConfigError
from ringctl.plan import LAYOUTS, check_seq_len, seq_len_divisor
from ringctl.ring import shard_sequence, unshard_sequence
from ringctl.ring.layouts import (
    document_ids,
    document_positions,
    mask_positions,
    token_positions,
)
from ringctl.ring.layouts import layout_padding as torch_layout_padding


def _tokens(layout: str, seq: int, world: int, cu: tuple[int, ...] | None) -> list[list[int]]:
    runs = shard_runs(layout, seq, world, cu)
    return [[r.start + i * r.stride for r in rs for i in range(r.count)] for rs in runs]


def _counted(layout: str, seq: int, world: int, cu: tuple[int, ...], causal: bool,
             window: tuple[int, int]) -> list[list[int]]:
    """Visible pairs between every two shards, pair by pair from the mask's definition."""
    tokens = _tokens(layout, seq, world, cu)

    def doc(x: int) -> int:
        return bisect.bisect_right(cu, x) - 1 if x < cu[-1] else -1

    left, right = window

    def sees(i: int, j: int) -> bool:
        return (
            doc(i) >= 0 and doc(i) == doc(j) and not (causal and j > i)
            and (left < 0 or i - j <= left) and (right < 0 or j - i <= right)
        )  # fmt: skip

    return [[sum(sees(i, j) for i in tq for j in tk) for tk in tokens] for tq in tokens]


def _random_documents(rng: random.Random, layout: str, world: int) -> tuple[int, tuple[int, ...]]:
    div = 1 if layout == "docs" else seq_len_divisor(layout, world)
    seq = div * rng.randint(1, max(1, 40 // div))
    cuts = sorted(rng.sample(range(1, seq + 1), rng.randint(0, min(6, seq))))
    return seq, (0, *cuts)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_visible_pairs_match_counting(layout: str) -> None:
    rng = random.Random(layout)
    for _ in range(40):
        world = rng.randint(1, 5)
        seq, cu = _random_documents(rng, layout, world)
        causal = rng.random() < 0.5
        window = (rng.choice([-1, 0, 1, 3, 7]), rng.choice([-1, 0, 2, 5]))
        got = visible_pairs(layout, seq, world, cu_seqlens=cu, causal=causal, window=window)
        assert got == _counted(layout, seq, world, cu, causal, window), (seq, world, cu)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_token_once_ascending(layout: str) -> None:
    rng = random.Random(f"cover-{layout}")
    for _ in range(40):
        world = rng.randint(1, 6)
        seq, cu = _random_documents(rng, layout, world)
        tokens = _tokens(layout, seq, world, cu)
        assert sorted(t for shard in tokens for t in shard) == list(range(seq))
        for shard in tokens:
            assert shard == sorted(shard) and len(shard) <= shard_len(layout, seq, world)
        if layout != "docs":
            assert {len(shard) for shard in tokens} == {seq // world}


def test_docs_layout_cuts_every_document_head_and_tail() -> None:
    """Document d's 2W chunks differ by at most one token, position p holds chunks p and
    2W-1-p, and shards' document token counts differ by at most one."""
    rng = random.Random(7)
    for _ in range(30):
        world = rng.randint(1, 6)
        lengths = [rng.choice([1, 2, 3, 2 * world, 2 * world + 1, rng.randint(1, 50)]) for _ in range(8)]
        cu = cu_seqlens_of(lengths)
        tokens = _tokens("docs", cu[-1], world, cu)
        owner = {t: p for p, shard in enumerate(tokens) for t in shard}
        for d, n in enumerate(lengths):
            owners = [owner[t] for t in range(cu[d], cu[d + 1])]
            base, extra = divmod(n, 2 * world)
            chunk_owner = [min(k, 2 * world - 1 - k) for k in range(2 * world)]
            cuts = [
                [base + (k in bigger) for k in range(2 * world)]
                for bigger in itertools.combinations(range(2 * world), extra)
            ]
            assert any(
                owners == [chunk_owner[k] for k in range(2 * world) for _ in range(size[k])]
                for size in cuts
            ), (world, n, owners)
        counts = [len(s) for s in tokens]
        assert max(counts) - min(counts) <= 1


def test_docs_layout_balances_causal_work() -> None:
    """Lognormal documents (mean 2K) over 32K tokens and 4 ranks: the per-document layout's
    work imbalance is near 1 where global zigzag's is not."""
    spec = parse_documents("lognormal:mean=2048")
    assert spec is not None
    for seed in range(4):
        cu = cu_seqlens_of(spec.sample(32768, seed))
        docs = imbalance(rank_pairs(visible_pairs("docs", 32768, 4, cu_seqlens=cu)))
        zigzag = imbalance(rank_pairs(visible_pairs("zigzag", 32768, 4, cu_seqlens=cu)))
        assert docs <= 1.01 < 1.1 < zigzag, (seed, docs, zigzag)


def test_padding_is_fewer_than_world() -> None:
    for seq in range(1, 40):
        for world in range(1, 7):
            pad = layout_padding(seq, world)
            assert 0 <= pad < world and shard_len("docs", seq, world) * world == seq + pad
    assert check_seq_len(10, "docs", 4) == 3 and seq_len_divisor("docs", 4) == 1


def test_ring_sources_visit_every_block_once() -> None:
    flat = ring_sources(((5, 1),), 5)
    assert flat[2] == [(p - 2) % 5 for p in range(5)]
    hier = ring_sources(((2, 3), (3, 1)), 6)
    assert len(hier) == 6
    for p in range(6):
        assert sorted(step[p] for step in hier) == list(range(6))
    matrix = [[10 * p + q for q in range(5)] for p in range(5)]
    assert step_pairs(matrix, flat)[1] == [matrix[p][(p - 1) % 5] for p in range(5)]


# ---------------------------------------------------------------- document length specs


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("lognormal", DocumentSpec("lognormal", 2048, 1.0)),
        ("lognormal:mean=512,sigma=0.5", DocumentSpec("lognormal", 512, 0.5)),
        ({"dist": "lognormal", "mean": 300}, DocumentSpec("lognormal", 300, 1.0)),
        ("fixed:mean=64", DocumentSpec("fixed", 64)),
        ([5, 1, 7], DocumentSpec("lengths", lengths=(5, 1, 7))),
        (None, None),
        ("none", None),
    ],
)
def test_parse_documents(value: object, expected: DocumentSpec | None) -> None:
    assert parse_documents(value) == expected


@pytest.mark.parametrize(
    "value",
    ["gamma", "lognormal:mean=0", "lognormal:mean=x", "lognormal:scale=2", "fixed:mean=4,sigma=1",
     [3, 0], [True], 3.5, "lognormal:mean"],
)
def test_bad_documents_spec_names_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as info:
        parse_documents(value, key="workload.documents")
    assert "workload.documents=" in str(info.value) and "lognormal" in str(info.value)


def test_sampled_lengths_fill_the_sequence() -> None:
    spec = DocumentSpec("lognormal", mean=1000)
    lengths = spec.sample(2_000_000, seed=3)
    assert sum(lengths) == 2_000_000 and min(lengths) >= 1
    assert spec.sample(2_000_000, seed=3) == lengths != spec.sample(2_000_000, seed=4)
    mean = sum(lengths[:-1]) / len(lengths[:-1])
    assert 900 < mean < 1100  # E[length] = mean by construction (mu = ln mean - sigma^2 / 2)
    assert max(lengths) > 5 * 1000  # long-tailed
    assert DocumentSpec("fixed", mean=300).sample(1000) == (300, 300, 300, 100)
    assert DocumentSpec("lengths", lengths=(4, 4)).sample(10) == (4, 4)
    with pytest.raises(ValueError, match="more than seq_len=7"):
        DocumentSpec("lengths", lengths=(4, 4)).sample(7)


def test_check_cu_seqlens() -> None:
    assert check_cu_seqlens([0]) == (0,)  # no documents: everything is padding
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\]=9 exceeds the sequence length 8"):
        check_cu_seqlens([0, 9], 8)


# ---------------------------------------------------------------- the docs layout on tensors


CU = (0, 5, 6, 23)  # documents of 5, 1 and 17 tokens


@pytest.mark.parametrize(("seq", "world"), [(23, 4), (30, 4), (23, 3), (24, 8), (23, 1)])
def test_docs_shard_unshard_exact_inverse(seq: int, world: int) -> None:
    x = torch.randn(2, seq, 3, dtype=torch.float64)
    shards = [shard_sequence(x, p, world, layout="docs", cu_seqlens=torch.tensor(CU))
              for p in range(world)]
    rows = -(-seq // world)
    for p, shard in enumerate(shards):
        pos = token_positions(seq, p, world, "docs", cu_seqlens=CU)
        assert shard.shape == (2, rows, 3) and shard.is_contiguous()
        real = pos >= 0
        torch.testing.assert_close(shard[:, real], x[:, pos[real]], rtol=0, atol=0)
        assert (shard[:, ~real] == 0).all()  # internal pad rows are zeros
    kwargs = {"seq_len": seq} if seq != CU[-1] else {}
    back = unshard_sequence(shards, layout="docs", cu_seqlens=list(CU), **kwargs)
    torch.testing.assert_close(back, x, rtol=0, atol=0)
    assert torch_layout_padding(CU, world, seq) == world * rows - seq


def test_docs_positions_ids_and_mask_positions() -> None:
    seq, world = 30, 4
    for p in range(world):
        pos = token_positions(seq, p, world, "docs", cu_seqlens=CU)
        ids = document_ids(seq, p, world, "docs", cu_seqlens=CU)
        local = document_positions(seq, p, world, "docs", cu_seqlens=CU)
        for x, d, n in zip(pos.tolist(), ids.tolist(), local.tolist(), strict=True):
            if 0 <= x < CU[-1]:
                assert CU[d] <= x < CU[d + 1] and n == x - CU[d]
            else:  # the user's padding after the last boundary, or an internal pad row
                assert d == -1 and n == 0
        # the ring's mask positions: the documents' tokens where they are; the rest after them
        ring = mask_positions(pos.shape[0], p, world, "docs", cu_seqlens=CU)
        inside = (pos >= 0) & (pos < CU[-1])
        assert torch.equal(ring[inside], pos[inside]) and bool((ring[~inside] >= CU[-1]).all())
        assert bool((ring[1:] > ring[:-1]).all())


def test_docs_layout_whole_shard_padding() -> None:
    """One token of one document over 4 positions: positions 1-3 hold only pad rows."""
    x = torch.arange(1.0).reshape(1, 1, 1)
    shards = [shard_sequence(x, p, 4, layout="docs", cu_seqlens=[0, 1]) for p in range(4)]
    assert [s.flatten().tolist() for s in shards] == [[0.0], [0.0], [0.0], [0.0]]
    assert [document_ids(1, p, 4, "docs", cu_seqlens=[0, 1]).tolist() for p in range(4)] == [
        [0], [-1], [-1], [-1]]  # fmt: skip
    assert torch.equal(unshard_sequence(shards, layout="docs", cu_seqlens=[0, 1]), x)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda x: shard_sequence(x, 0, 4, layout="docs"), "pass cu_seqlens (e.g. [0, 10]"),
        (lambda x: shard_sequence(x, 0, 4, layout="docs", cu_seqlens=[0, 11]),
         "cu_seqlens[-1]=11 exceeds the sequence length 10"),
        (lambda x: shard_sequence(x, 0, 2, layout="zigzag", cu_seqlens=[1, 4]), "start at 0"),
        (lambda x: unshard_sequence([x[:, :3]] * 4, layout="docs", cu_seqlens=[0, 6]),
         "pass seq_len"),
        (lambda x: unshard_sequence([x[:, :3]] * 4, layout="docs", seq_len=20), "allowed: 9..12"),
    ],
)
def test_docs_layout_bad_input(call: object, fragment: str) -> None:
    x = torch.zeros(1, 10, 2)
    with pytest.raises(ValueError) as info:
        call(x)  # type: ignore[operator]
    assert fragment in str(info.value)


# ---------------------------------------------------------------- the planner with documents


@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
def test_plan_predicts_per_rank_work_of_packed_documents(algorithm: str) -> None:
    """`estimate` with a documents spec: per-rank pairs as counted pair by pair, each ring
    step's busiest rank, the imbalance, and less predicted compute than the full causal
    sequence (skipped blocks are not priced)."""
    from ringctl.plan import Workload, estimate, make_plan
    from ringctl.topology import Topology, place_ranks

    topology = Topology((2, 2), rank_to_node=place_ranks((2, 2), "block"))
    for layout in ("docs", "zigzag"):
        plan = make_plan(topology, layout=layout, algorithm=algorithm)
        seq = 96
        plain = Workload(batch=1, seq_len=seq, heads=2, kv_heads=1, head_dim=16, dtype="float32")
        packed = Workload(
            batch=1, seq_len=seq, heads=2, kv_heads=1, head_dim=16, dtype="float32",
            documents="lognormal:mean=12", documents_seed=3,
        )  # fmt: skip
        cu = packed.cu_seqlens()
        assert cu is not None and cu[-1] == seq and len(cu) > 3
        cost = estimate(plan, packed)
        docs = cost.documents
        assert docs is not None and estimate(plan, plain).documents is None
        counted = _counted(layout, seq, 4, cu, True, (-1, -1))
        assert docs["visible_pairs_per_rank"] == [sum(row) for row in counted]
        levels = ((2, 2), (2, 1)) if algorithm == "hierarchical" else ((4, 1),)
        busiest = [max(counted[p][src] for p, src in enumerate(row)) for row in ring_sources(levels, 4)]
        assert docs["busiest_pairs_per_step"] == busiest
        assert docs["imbalance"] == pytest.approx(imbalance(docs["visible_pairs_per_rank"]))
        assert docs["imbalance_by_layout"][layout] == pytest.approx(docs["imbalance"])
        # compute-bound here (tiny topology links aside): fewer pairs, less predicted time
        assert sum(cost.compute_s.values()) < sum(estimate(plan, plain).compute_s.values())
        assert "documents" in cost.to_dict() and "documents" not in estimate(plan, plain).to_dict()
    docs_cost = estimate(make_plan(topology, layout="docs"), packed).documents
    assert docs_cost is not None and docs_cost["imbalance"] <= 1.05


def test_workload_documents_are_checked() -> None:
    from ringctl.plan import Workload

    with pytest.raises(ConfigError, match=r"workload\.documents='zipf'"):
        Workload(documents="zipf")
    with pytest.raises(ConfigError, match=r"summing to <= workload\.seq_len=10"):
        Workload(seq_len=10, documents=[4, 8])
    assert Workload(seq_len=10, documents=[4, 5]).cu_seqlens() == (0, 4, 9)
