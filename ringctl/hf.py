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

Packed batches, the way transformers expresses them: position ids that restart at 0 at
every document (DataCollatorWithFlattening), sharded like the input ids
(`shard_sequence(position_ids, rank, world)`), batch size 1 (or rows packed alike). The ring
gathers the position ids once per forward, finds where documents start, and attends
block-diagonally (`ring_attention(..., cu_seqlens=...)`); transformers' flash-attention
keywords `cu_seq_lens_q`/`cu_seq_lens_k` (global boundaries) are taken as they are. The
`docs` layout needs those keywords (its sharding depends on the boundaries). Under the
`contiguous` layout, position ids 0..S_local-1 on every rank are indistinguishable from
documents of one shard each: pass the global positions for one sequence.

Supported: causal and bidirectional attention, GQA (K/V travel with their own heads, never
repeated), the module's `scaling`, packed documents. Not supported (a ValueError says so):
padding masks, dropout, sliding windows, softcapping, a growing KV cache.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ringctl.context import RingContext
from ringctl.ring import ring_attention, unshard_sequence
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
    layout = DEFAULT_LAYOUT if ctx is None else ctx.layout
    cu = _given_documents(kwargs)
    if cu is None:
        cu = _documents(position_ids, q.shape[1], ctx, layout)
    if ctx is None:
        out = ring_attention(q, k, v, causal=causal, softmax_scale=scaling, layout=layout, cu_seqlens=cu)
    else:
        out = ctx.attention(q, k, v, causal=causal, softmax_scale=scaling, cu_seqlens=cu)
    return out.contiguous(), None


def _given_documents(kwargs: dict[str, Any]) -> Any:
    """transformers' flash-attention keywords for packed sequences (global boundaries)."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None or not torch.equal(torch.as_tensor(cu_q), torch.as_tensor(cu_k)):
        raise ValueError(
            f"cu_seq_lens_q={cu_q!r} and cu_seq_lens_k={cu_k!r} must be given together and be equal "
            f"for {NAME!r} (self-attention over the same packed sequence)"
        )
    return cu_q


def _documents(position_ids: Any, local_len: int, ctx: RingContext | None, layout: str) -> tuple[int, ...] | None:
    """The document boundaries `position_ids` express: None when they are the global positions
    of this rank's tokens (one sequence), the global cu_seqlens when they restart at 0 at
    every document (a packed batch: gathered over the ring, once per position_ids tensor, not
    per layer). Anything else is a ValueError: it would rotate the tokens wrongly."""
    if not isinstance(position_ids, torch.Tensor):
        return None
    if ctx is None:
        world, position = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    else:
        world, position = ctx.world_size, ctx.position
    key = (position_ids, ctx, layout, world, position)
    last = _checked[0]
    if last and last[0] is position_ids and last[1:-1] == key[1:]:
        return last[-1]
    expected = token_positions(local_len * world, position, world, layout, device=position_ids.device)
    cu: tuple[int, ...] | None = None
    if position_ids.shape[-1] != local_len:
        _refuse(position_ids, expected, ctx, layout, f"they hold {position_ids.shape[-1]} tokens, the shard {local_len}")
    if not torch.equal(position_ids, expected.expand_as(position_ids)):
        cu = _packed(position_ids, expected, ctx, layout, world)
    _checked[0] = (*key, cu)
    return cu


def _packed(
    position_ids: torch.Tensor, expected: torch.Tensor, ctx: RingContext | None, layout: str, world: int
) -> tuple[int, ...]:
    """Global boundaries from per-document position ids (all ranks' shards gathered)."""
    rows = position_ids.reshape(-1, position_ids.shape[-1])
    if not bool((rows == rows[0]).all()):
        _refuse(position_ids, expected, ctx, layout, "batch rows restart at different places: packed rows must "
                "share their document boundaries (pack everything into one row)")
    if layout == "docs":
        _refuse(position_ids, expected, ctx, layout, "the docs layout shards by the boundaries themselves: pass "
                "cu_seq_lens_q= and cu_seq_lens_k= (the global boundaries) to the model")
    row = rows[0].to(torch.int64).contiguous()
    parts = [torch.empty_like(row) for _ in range(world)]
    if world > 1:
        dist.all_gather(parts, row, group=None if ctx is None else ctx.group)
    else:
        parts = [row]
    order = range(world) if ctx is None else ctx.plan.ring_order
    full = unshard_sequence([parts[r][None] for r in order], layout=layout)[0].cpu()
    index = torch.arange(full.numel())
    starts = index[full == 0]
    if starts.numel() == 0 or int(starts[0]) != 0:
        _refuse(position_ids, expected, ctx, layout, "the sequence does not start a document at 0")
    start_of = starts[torch.searchsorted(starts, index, right=True) - 1]
    if not torch.equal(full, index - start_of):
        _refuse(position_ids, expected, ctx, layout, "they are neither global positions nor positions restarting "
                "at 0 at every document")
    return (*(int(s) for s in starts), full.numel())


def _refuse(position_ids: torch.Tensor, expected: torch.Tensor, ctx: RingContext | None, layout: str, why: str) -> None:
    how = "ctx.positions(S)[None]" if ctx is not None else "ringctl.shard_sequence(torch.arange(S)[None], rank, world)"
    raise ValueError(
        f"position_ids {_preview(position_ids)}: {why}. For one sequence they must be the global "
        f"positions of this rank's tokens under layout {layout!r} (expected {_preview(expected)}): pass "
        f"position_ids={how}; for packed documents, positions restarting at 0 at every document, "
        "sharded the same way"
    )


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
