"""infer: a multi-turn inference session over the ring, with a sharded KV cache.

The model is the train workload's (TinyLM: learned absolute positions, so a token embeds
the same on whichever rank holds it), built from the seed or loaded from a train job's
checkpoint. The session: a prompt of `prompt` tokens prefilled across the ring, then for
each entry of `turns` that many new tokens (after the last generated token, which joins
the context with them), and after the prompt and after every turn `decode` greedy tokens.
Every turn places its tokens on the ring (ringctl.placement), every layer appends its K/V
to the cache and attends with ringctl.ring.cached_attention in the turn's strategy: the
cost model's choice (`mode=auto`) or the forced one. A generated token's logits live on
the rank that holds the last position; it broadcasts them, so every rank feeds the same
token next.

Recorded (results.json and W&B): time to first token, prefill tokens/s, decode latency per
token, per turn the strategy with its predicted and measured attention time, bytes sent per
link class measured vs predicted (every rank), the cache's memory per rank, and
`tokens_match_reference`: rank 0 generates again in one process with SDPA over the whole
sequence and no cache, and compares every token.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from ringctl.infer_plan import InferWorkload, estimate_infer, predicted_infer_bytes
from ringctl.ring import comm_stats, reset_comm_stats
from ringctl.ring.inference import cached_attention, resolve_mode
from ringctl.ring.kv_cache import RingKVCache
from ringctl.topology import LINKS
from ringctl.workloads.train import Block, TinyLM, markov_table, sdpa_attention


def session_length(w: Any) -> int:
    """Tokens the session puts in the context: the prompt, every turn, and every generated
    token but the last (which is never fed back)."""
    turns = [int(t) for t in w.turns]
    return int(w.prompt) + sum(turns) + int(w.decode) * (1 + len(turns)) - 1


def session_tokens(w: Any) -> list[torch.Tensor]:
    """The prompt and each turn's new tokens, (B, n) each, from the seed (a Markov chain
    over the vocabulary, as the train workload's data)."""
    table = markov_table(w)
    gen = torch.Generator().manual_seed(int(w.seed) * 7919 + 17)
    out = []
    for count in [int(w.prompt), *(int(t) for t in w.turns)]:
        tokens = torch.empty(int(w.batch), count, dtype=torch.long)
        tokens[:, 0] = torch.randint(int(w.vocab), (int(w.batch),), generator=gen)
        for i in range(1, count):
            tokens[:, i] = torch.multinomial(table[tokens[:, i - 1]], 1, generator=gen).squeeze(1)
        out.append(tokens)
    return out


def build_model(w: Any, device: torch.device) -> TinyLM:
    """The train workload's model, from the seed or `workload.checkpoint`."""
    torch.manual_seed(int(w.seed))
    model = TinyLM(w, sdpa_attention).to(device=device, dtype=getattr(torch, w.dtype))
    if w.get("checkpoint"):
        state = torch.load(str(w.checkpoint), map_location=device, weights_only=True)
        weights = state.get("model", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(
                f"workload.checkpoint={str(w.checkpoint)!r} does not fit this model "
                f"(vocab={w.vocab}, layers={w.layers}, heads={w.heads}, kv_heads={w.kv_heads}, "
                f"head_dim={w.head_dim}, seq_len={w.seq_len}); allowed: a checkpoint of a train job "
                f"with the same shape keys. {str(err).splitlines()[0]}"
            ) from err
    model.eval()
    return model


class _CachedLayer:
    """Layer ``layer``'s attention: append the turn's K/V to the cache, then attend over
    the ring in the session's strategy, timing the call."""

    def __init__(self, cache: RingKVCache, layer: int, session: _Session) -> None:
        self.cache, self.layer, self.session = cache, layer, session

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.cache.append(self.layer, k, v)
        started = time.perf_counter()
        out = cached_attention(q, self.cache, self.layer, mode=self.session.mode)
        self.session.attention_s += time.perf_counter() - started
        return out


class _Session:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.attention_s = 0.0


def _greedy(logits: torch.Tensor | None, owner: int, ctx: Any, w: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of every sequence from the last position's logits, which only rank
    ``owner`` has: it broadcasts them (float64 for the comparison), every rank argmaxes."""
    row = torch.empty(int(w.batch), int(w.vocab), dtype=torch.float64, device=ctx.device)
    if logits is not None:
        row.copy_(logits)
    dist.broadcast(row, src=owner, group=ctx.group)
    return row.argmax(-1), row


def run(cfg: Any, ctx: Any) -> dict[str, Any]:
    w = cfg.workload
    total = session_length(w)
    if total > int(w.seq_len):
        raise ValueError(
            f"workload.seq_len={w.seq_len} cannot hold the session: prompt {w.prompt} + turns "
            f"{list(w.turns)} + {w.decode} generated tokens after each = {total} tokens; allowed: "
            f"workload.seq_len >= {total}"
        )
    dtype = getattr(torch, w.dtype)
    model = build_model(w, ctx.device)
    cache = RingKVCache(
        layers=int(w.layers), batch=int(w.batch), kv_heads=int(w.kv_heads), head_dim=int(w.head_dim),
        capacity=int(w.seq_len), dtype=dtype, device=ctx.device, layout=str(w.layout), plan=ctx.plan,
        group=ctx.group,
    )  # fmt: skip
    session = _Session(str(w.mode))
    for i, block in enumerate(model.blocks):
        assert isinstance(block, Block)
        block.attention = _CachedLayer(cache, i, session)
    segments = session_tokens(w)
    reset_comm_stats()
    predicted_bytes = {link: [0] * ctx.world_size for link in LINKS}
    turns: list[dict[str, Any]] = []
    generated: list[list[list[int]]] = []  # per segment: (B, decode) tokens
    logits_seen: list[torch.Tensor] = []
    started = time.perf_counter()
    ttft = 0.0
    decode_s: list[float] = []

    def step(tokens: torch.Tensor, kind: str) -> tuple[torch.Tensor, float]:
        """One turn: place, forward on this rank's tokens, greedy next token."""
        t0 = time.perf_counter()
        turn = cache.begin_turn(int(tokens.shape[1]))
        if ctx.world_size > 1:
            chosen = resolve_mode(session.mode, cache, int(w.heads))
        else:  # nothing travels: cached_attention computes one local block
            chosen = "pass_kv" if session.mode == "auto" else session.mode
        shape = InferWorkload(
            batch=int(w.batch), new_tokens=turn.count, cached_tokens=turn.cached, heads=int(w.heads),
            kv_heads=int(w.kv_heads), head_dim=int(w.head_dim), dtype=str(w.dtype), layout=str(w.layout),
        )  # fmt: skip
        predicted = {m: c.predicted_s * int(w.layers) for m, c in estimate_infer(ctx.plan, shape, turn.turn).items()}
        for link, per_rank in predicted_infer_bytes(ctx.plan, shape, chosen, turn.turn).items():
            for r, sent in enumerate(per_rank):
                predicted_bytes[link][r] += sent * int(w.layers)
        session.attention_s = 0.0
        pos = turn.positions
        with torch.no_grad():  # every rank runs every layer (the ring is collective), with 0 rows too
            logits = model(tokens[:, pos - turn.cached].to(ctx.device), pos.to(ctx.device))
        last = turn.cached + turn.count - 1
        owner_position = next(p for p, new in enumerate(turn.new_by_position) if new.numel() and int(new[-1]) == last)
        owner = ctx.plan.ring_order[owner_position]
        mine = logits[:, -1] if ctx.position == owner_position else None
        token, row = _greedy(mine, owner, ctx, w)
        elapsed = time.perf_counter() - t0
        turns.append({
            "turn": turn.index, "kind": kind, "new_tokens": turn.count, "cached_tokens": turn.cached,
            "strategy": chosen, "predicted_attention_s": predicted, "measured_attention_s": session.attention_s,
            "turn_s": elapsed, "max_new_per_rank": turn.turn.max_new, "max_held_per_rank": turn.turn.max_held,
        })  # fmt: skip
        ctx.metrics.log({
            "infer/new_tokens": turn.count, "infer/cached_tokens": turn.cached,
            "infer/pass_q": int(chosen == "pass_q"), "infer/measured_attention_s": session.attention_s,
            "infer/predicted_attention_s": predicted[chosen], "infer/turn_s": elapsed,
        }, step=turn.index + 1)  # fmt: skip
        logits_seen.append(row.cpu())
        return token, elapsed

    carry: torch.Tensor | None = None  # the last generated token, fed with the next turn
    prefill_tokens = 0
    prefill_s = 0.0
    for s, tokens in enumerate(segments):
        if carry is not None:
            tokens = torch.cat([carry[:, None], tokens], dim=1)
        token, elapsed = step(tokens, "prompt" if s == 0 else "turn")
        prefill_tokens += int(tokens.shape[1])
        prefill_s += elapsed
        if s == 0:
            ttft = time.perf_counter() - started
        out = [token]
        for _ in range(int(w.decode) - 1):
            token, elapsed = step(token[:, None], "decode")
            decode_s.append(elapsed)
            out.append(token)
        carry = token
        generated.append(torch.stack(out, dim=1).tolist())
        ctx.progress.update(generated=generated)
    session_s = time.perf_counter() - started

    measured = comm_stats()["forward"]
    mine = torch.tensor([measured.get(link, 0) for link in LINKS], dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(every, mine, group=ctx.group)
    traffic: dict[str, Any] = {"forward": {}}  # the schema of the attention workload's
    for i, link in enumerate(LINKS):
        measured_link = [int(t[i]) for t in every]
        traffic["forward"][link] = {
            "measured": measured_link, "predicted": predicted_bytes[link],
            "measured_total": sum(measured_link), "predicted_total": sum(predicted_bytes[link]),
        }  # fmt: skip
    traffic["match"] = all(v["measured"] == v["predicted"] for v in traffic["forward"].values())
    memory = cache.memory_bytes()
    results: dict[str, Any] = {
        "generated": generated,
        "turns": turns,
        "strategies": [t["strategy"] for t in turns],
        "times": {
            "time_to_first_token_s": ttft,
            "decode_per_token_s": sum(decode_s) / len(decode_s) if decode_s else 0.0,
            "prefill_s": prefill_s,
            "session_s": session_s,
        },
        "prefill_tokens_per_s": prefill_tokens / prefill_s if prefill_s else 0.0,
        "bytes": traffic,
        "cache": {
            "tokens": cache.length,
            "tokens_per_rank": list(cache.placement.counts()),
            "imbalance": cache.placement.imbalance(),
            "memory_bytes_per_rank": memory,
        },
    }
    if bool(w.get("check", True)):
        check: list[Any] = [None]
        if ctx.rank == 0:
            check[0] = reference_check(w, generated, logits_seen)
        dist.broadcast_object_list(check, src=0, group=ctx.group)
        results.update(check[0])
    return results


def reference_generate(w: Any, device: torch.device | None = None) -> tuple[list[list[list[int]]], list[torch.Tensor]]:
    """The same session in one process: SDPA over the whole sequence at every step, no
    cache. Returns the generated tokens per segment and the logits of every step."""
    device = device or torch.device("cpu")
    model = build_model(w, device)
    context = torch.zeros(int(w.batch), 0, dtype=torch.long)
    generated: list[list[list[int]]] = []
    logits_seen: list[torch.Tensor] = []
    carry: torch.Tensor | None = None

    def next_token(context: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = model(context.to(device), torch.arange(context.shape[1], device=device))[:, -1]
        row = logits.to(torch.float64).cpu()
        logits_seen.append(row)
        return row.argmax(-1)

    for tokens in session_tokens(w):
        if carry is not None:
            tokens = torch.cat([carry[:, None], tokens], dim=1)
        context = torch.cat([context, tokens], dim=1)
        token = next_token(context)
        out = [token]
        for _ in range(int(w.decode) - 1):
            context = torch.cat([context, token[:, None]], dim=1)
            token = next_token(context)
            out.append(token)
        carry = token
        generated.append(torch.stack(out, dim=1).tolist())
    return generated, logits_seen


def reference_check(w: Any, generated: list[list[list[int]]], logits: list[torch.Tensor]) -> dict[str, Any]:
    """tokens_match_reference, and the largest logit difference over every step."""
    want, want_logits = reference_generate(w)
    error = max(float((a - b).abs().max()) for a, b in zip(logits, want_logits, strict=True))
    return {"tokens_match_reference": generated == want, "reference": {"generated": want, "max_logit_error": error}}
