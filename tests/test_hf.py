"""Hugging Face models on the ring: a tiny random-init Llama (GQA, RoPE, 2 layers, float64)
with attn_implementation="ringctl", trained a few SGD steps on 2 and 3 gloo ranks with
sequence-sharded inputs, matches the same model run whole in one process with
attn_implementation="sdpa": loss, logits and every parameter gradient within 1e-9, at
every step.

Sharded loss: labels are shifted on the FULL sequence, then sharded like the inputs; each
rank sums the cross-entropy of its tokens and divides by the total count; the losses and
the parameter gradients are summed over the ranks (all_reduce).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from _dist import run_workers

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, LlamaConfig

import ringctl
import ringctl.hf  # registers attn_implementation="ringctl"

B, S, VOCAB, STEPS, LR = 2, 24, 96, 3, 0.5
ATOL = 1e-9


def _config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_cache=False, tie_word_embeddings=False,
    )


def _model(attn: str) -> torch.nn.Module:
    torch.manual_seed(0)  # the same random init in every process and for both models
    return AutoModelForCausalLM.from_config(copy.deepcopy(_config()), attn_implementation=attn, dtype=torch.float64)


def _batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, S), generator=torch.Generator().manual_seed(1000 + step))


def _reference_step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The whole sequence in one process, SDPA, the mean next-token loss in float64
    (transformers' own loss upcasts logits to float32, too coarse for a 1e-9 comparison)."""
    model.zero_grad()
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), logits.detach(), {n: _grad(p).clone() for n, p in model.named_parameters()}


def _ring_step(
    model: torch.nn.Module, ids: torch.Tensor, shard: Any, positions: torch.Tensor, gather: Any, **call: Any
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's shard through the ringctl model; loss and gradients summed over ranks."""
    model.zero_grad()
    labels = torch.cat([ids[:, 1:], torch.full((B, 1), -100)], dim=1)  # shifted on the full sequence
    logits = model(input_ids=shard(ids), position_ids=positions, **call).logits
    return _summed_over_ranks(model, logits, shard(labels), int((labels != -100).sum()), gather)


def _summed_over_ranks(
    model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor, n_tokens: int, gather: Any
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's summed cross-entropy over all ranks' token count, backward; the loss and
    every parameter gradient summed over the ranks, the logits gathered."""
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum") / n_tokens
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {}
    for name, param in model.named_parameters():
        dist.all_reduce(_grad(param))
        grads[name] = _grad(param).clone()
    return total, gather(logits.detach()), grads


def _sgd(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.sub_(LR * _grad(param))


def _grad(param: torch.Tensor) -> torch.Tensor:
    if param.grad is None:
        raise AssertionError("a parameter got no gradient")
    return param.grad


def _compare(ref: tuple[Any, ...], got: tuple[Any, ...]) -> float:
    (ref_loss, ref_logits, ref_grads), (loss, logits, grads) = ref, got
    torch.testing.assert_close(loss, ref_loss, rtol=0.0, atol=ATOL)
    torch.testing.assert_close(logits, ref_logits, rtol=0.0, atol=ATOL)
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0.0, atol=ATOL, msg=lambda m: f"gradient of {name}: {m}")  # noqa: B023 (called at once)
    return max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads)


DOCS = (5, 1, 11, 7)  # a packed row of S tokens: documents of one token and longer than a shard


def _packed_labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels inside each document (-100 at a document's last token)."""
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    for end in torch.tensor(DOCS).cumsum(0).tolist():
        labels[0, end - 1] = -100
    return labels


def _packed_reference(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Each document run alone through the one-process model (SDPA): the block-diagonal
    causal result, with positions restarting per document; logits concatenated."""
    model.zero_grad()
    logits = torch.cat([model(input_ids=doc).logits for doc in ids.split(list(DOCS), dim=1)], dim=1)
    labels = _packed_labels(ids)
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    return loss.detach(), logits.detach(), {n: _grad(p).clone() for n, p in model.named_parameters()}


def _packed_ring(
    model: torch.nn.Module, ids: torch.Tensor, shard: Any, gather: Any
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The packed row sharded, with position ids restarting per document (as transformers'
    DataCollatorWithFlattening gives them), sharded alike; no attention mask."""
    model.zero_grad()
    restart = torch.cat([torch.arange(n) for n in DOCS])[None]
    labels = _packed_labels(ids)
    logits = model(input_ids=shard(ids), position_ids=shard(restart)).logits
    return _summed_over_ranks(model, logits, shard(labels), int((labels != -100).sum()), gather)


def _worker(rank: int, world: int) -> dict[str, Any]:
    ref, ring = _model("sdpa"), _model("ringctl")
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ring.parameters()))
    seen: dict[str, Any] = {"losses": []}

    # no set-up: the default group, zigzag, inputs sharded with ringctl.shard_sequence by rank
    def shard(x: torch.Tensor) -> torch.Tensor:
        return ringctl.shard_sequence(x, rank, world)

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return ringctl.unshard_sequence(parts)

    positions = shard(torch.arange(S)[None])
    grad_error = 0.0
    ids = _batch(0)
    for _ in range(STEPS):  # one batch, learnt: the loss must fall
        expected = _reference_step(ref, ids)
        grad_error = max(grad_error, _compare(expected, _ring_step(ring, ids, shard, positions, gather)))
        seen["losses"].append(float(expected[0]))
        _sgd(ref)
        _sgd(ring)
    seen["grad_error"] = grad_error

    # a packed row: position ids restarting at every document, derived into cu_seqlens
    packed = torch.randint(0, VOCAB, (1, S), generator=torch.Generator().manual_seed(77))
    seen["packed_grad_error"] = _compare(_packed_reference(ref, packed), _packed_ring(ring, packed, shard, gather))

    # a ring context chooses another layout and plan: ranks placed cyclically on 2 nodes
    # (the ring reorders them), striped; given per call, then with ringctl.hf.use
    os.environ["SLURMD_NODENAME"] = f"node{rank % 2}"
    ctx = ringctl.RingContext(layout="striped")
    seen["order"] = list(ctx.plan.ring_order)
    ids = _batch(1)
    expected = _reference_step(ref, ids)
    ctx_positions = ctx.positions(S)[None]
    _compare(expected, _ring_step(ring, ids, ctx.shard, ctx_positions, ctx.gather, ring_context=ctx))
    ringctl.hf.use(ctx)
    try:
        _compare(expected, _ring_step(ring, ids, ctx.shard, ctx_positions, ctx.gather))
        # the default's (zigzag) positions under this (striped) context are caught, not run
        with pytest.raises(ValueError, match="position_ids"):
            ring(input_ids=ctx.shard(ids), position_ids=positions)
    finally:
        ringctl.hf.use(None)

    # mistakes that would silently give wrong numbers are refused
    with pytest.raises(ValueError, match="position_ids"):
        ring(input_ids=shard(ids))  # no position ids: the model would number the shard 0..
    padded = torch.ones_like(shard(ids))
    padded[0, 0] = 0
    with pytest.raises(ValueError, match="padding"):
        ring(input_ids=shard(ids), position_ids=positions, attention_mask=padded)
    return seen


@pytest.mark.parametrize("world", [2, 3])
def test_llama_trains_like_sdpa(world: int) -> None:
    results = run_workers(_worker, world)
    assert all(r["losses"] == results[0]["losses"] for r in results)
    assert results[0]["losses"][-1] < results[0]["losses"][0] - 0.1  # it really trains
    assert max(r["grad_error"] for r in results) <= 1e-9
    assert max(r["packed_grad_error"] for r in results) <= 1e-9
    if world == 3:  # cyclic on 2 nodes: ranks 0, 2 | 1 -> ring 0, 2, 1
        assert results[0]["order"] == [0, 2, 1]


def test_registered() -> None:
    from transformers import AttentionInterface

    assert AttentionInterface()["ringctl"] is ringctl.hf.attention_forward
    with pytest.raises(ValueError, match="RingContext"):
        ringctl.hf.use("zigzag")  # type: ignore[arg-type]
