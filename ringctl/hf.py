"""Hugging Face `transformers` models on the ring: `import ringctl.hf` registers
`attn_implementation="ringctl"` through transformers' public AttentionInterface (no model
file is patched), so any model that dispatches attention through it (Llama, Mistral, Qwen,
...) runs ring attention on sequence-sharded inputs.

    import ringctl, ringctl.hf
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="ringctl")
    ids = ringctl.shard_sequence(input_ids, rank, world)              # zigzag, dim 1
    pos = ringctl.shard_sequence(torch.arange(S)[None], rank, world)  # global position ids
    logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits

With no set-up the default process group and the zigzag layout on the rank-order ring are
used (what `shard_sequence(x, rank, world)` gives). To choose another group, layout or
plan, give a RingContext: `ringctl.hf.use(ctx)` for every call from now on, or
`model(..., ring_context=ctx)` for one call; shard with `ctx.shard` and position with
`ctx.positions`. The position ids are checked once per forward: a model given none (it would
number the shard's tokens 0..S_local-1 and rotate them wrongly) fails with a ValueError.

Supported: causal and bidirectional attention, GQA (K/V travel with their own heads, never
repeated), the module's `scaling`. Not supported (a ValueError says so): attention masks
(padding, packed documents), dropout, sliding windows, softcapping, a growing KV cache.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ringctl.context import RingContext
from ringctl.ring import ring_attention
from ringctl.ring.layouts import token_positions

#: the attn_implementation name this module registers
NAME = "ringctl"
#: the layout of the set-up-free default (that of `ringctl.shard_sequence`)
DEFAULT_LAYOUT = "zigzag"

_used: list[RingContext | None] = [None]
# the position_ids tensor last checked and what it was checked for: every layer of one
# forward gets the same tensor, so the check (which waits for the device) runs once a forward
_checked: list[tuple[Any, ...]] = [()]


def use(ctx: RingContext | None) -> None:
    """Attend with `ctx`'s group, layout and plan from now on; None: back to the default
    (default process group, zigzag, rank order)."""
    if ctx is not None and not isinstance(ctx, RingContext):
        raise ValueError(f"ctx must be a ringctl.RingContext or None, got {type(ctx).__name__}")
    _used[0] = ctx


def current() -> RingContext | None:
    """The context `use` set, or None (the default)."""
    return _used[0]


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    ring_context: RingContext | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query (B, Hq, S_local, D), key/value
    (B, Hkv, S_local, D) of this rank's shard; returns ((B, S_local, Hq, D), None)."""
    if attention_mask is not None:
        raise ValueError(
            f"attn_implementation={NAME!r} takes no attention_mask (got shape "
            f"{tuple(attention_mask.shape)}): the ring masks by global token position; call the "
            "model without attention_mask (padding and packed documents are not supported)"
        )
    if dropout:
        raise ValueError(f"attention dropout={dropout} is not supported by {NAME!r}; set attention_dropout=0")
    for option in ("sliding_window", "softcap"):
        if kwargs.get(option) is not None:
            raise ValueError(f"{option}={kwargs[option]!r} is not supported by {NAME!r}")
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"keys hold {key.shape[2]} tokens, queries {query.shape[2]}: a growing KV cache "
            f"(generation) is not supported by {NAME!r}; call the model with use_cache=False"
        )
    ctx = ring_context if ring_context is not None else _used[0]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # ringctl's (B, S, H, D)
    position_ids = kwargs.get("position_ids")
    if ctx is None:
        _check_positions(position_ids, q.shape[1], None, DEFAULT_LAYOUT)
        out = ring_attention(q, k, v, causal=causal, softmax_scale=scaling, layout=DEFAULT_LAYOUT)
    else:
        _check_positions(position_ids, q.shape[1], ctx, ctx.layout)
        out = ctx.attention(q, k, v, causal=causal, softmax_scale=scaling)
    return out.contiguous(), None


def _check_positions(position_ids: Any, local_len: int, ctx: RingContext | None, layout: str) -> None:
    """Position ids must be the global positions of this rank's tokens; checked once per
    position_ids tensor (once per forward, not per layer: the comparison waits for the device)."""
    if not isinstance(position_ids, torch.Tensor):
        return
    if ctx is None:
        world, position = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    else:
        world, position = ctx.world_size, ctx.position
    key = (position_ids, ctx, layout, world, position)
    last = _checked[0]
    if last and last[0] is position_ids and last[1:] == key[1:]:
        return
    expected = token_positions(local_len * world, position, world, layout, device=position_ids.device)
    if position_ids.shape[-1] != local_len or not torch.equal(position_ids, expected.expand_as(position_ids)):
        how = "ctx.positions(S)[None]" if ctx is not None else "ringctl.shard_sequence(torch.arange(S)[None], rank, world)"
        raise ValueError(
            f"position_ids {_preview(position_ids)} are not the global positions of this rank's "
            f"tokens under layout {layout!r} (expected {_preview(expected)}); pass position_ids={how}"
        )
    _checked[0] = key


def mask_forward(attention_mask: torch.Tensor | None = None, **kwargs: Any) -> None:
    """The mask transformers builds for "ringctl": none (the ring masks by global position).
    Registered so that a padding mask is refused rather than dropped: transformers drops the
    2D mask of an implementation without a mask function. An all-ones mask is accepted."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(
            f"attention_mask with padding (zeros) is not supported by attn_implementation={NAME!r}: "
            "the ring masks causally by global position only; pass unpadded sequences"
        )


def _preview(ids: torch.Tensor, n: int = 8) -> str:
    row = ids.reshape(-1, ids.shape[-1])[0].tolist()
    return str(row[:n])[:-1] + (", ...]" if len(row) > n else "]")


AttentionInterface.register(NAME, attention_forward)
AttentionMaskInterface.register(NAME, mask_forward)
