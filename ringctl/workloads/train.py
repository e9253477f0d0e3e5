"""train: a small causal transformer LM whose attention layers call ring_attention.

Every rank holds the same model (same seed) and the shard of its ring position of each
sequence (tokens, targets and their global positions, all with the workload's layout).
The loss is the global mean over all tokens; each rank backpropagates its part (the
ring's backward sends dK/dV home), gradients are summed over ranks, and every rank takes
the same optimizer step. So the run is the one-process model with SDPA, step for step:
`reference_losses` runs exactly that, and tests compare the two.

Data: token sequences sampled from a fixed random Markov chain (seeded), so there is
something to learn and nothing to download. With `workload.documents` each step's sequence
is packed documents (lengths drawn anew every step from the distribution and the seed):
attention is block-diagonal causal (`cu_seqlens`), positions restart at every document,
and tokens after the last boundary (explicit lengths shorter than seq_len) are padding,
left out of the loss; the reference is SDPA with the same block-diagonal causal mask.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ringctl.workloads.attention import PeakMemory, memory_results

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whole-sequence causal attention, (B, S, H, D) in and out: the reference."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


class PackedAttention:
    """The attention function of a model trained on packed documents: the current step's
    boundaries (``cu``, set before each step) go to ``ring_attention`` as cu_seqlens, or,
    for the one-process reference (``ring`` None), become SDPA's block-diagonal causal mask
    (rows that see nothing, padding, give 0)."""

    def __init__(self, ring: Callable[..., torch.Tensor] | None) -> None:
        self.ring = ring
        self.cu: tuple[int, ...] | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.ring is not None:
            return self.ring(q, k, v, cu_seqlens=self.cu)
        if self.cu is None:
            return sdpa_attention(q, k, v)
        from ringctl.workloads.attention import document_mask

        sees = document_mask(q.shape[1], self.cu, True, q.device)
        empty = ~sees.any(1)
        sees[:, 0] |= empty
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=sees, enable_gqa=True
        )
        return out.masked_fill(empty[None, None, :, None], 0.0).transpose(1, 2)


def step_documents(w: Any, step: int) -> tuple[int, ...] | None:
    """Boundaries of step ``step``'s packed documents, drawn anew each step from
    `workload.documents` and the seed (None without documents; the `docs` layout, which
    needs boundaries to shard any length, gets one document)."""
    from ringctl.documents import cu_seqlens_of, parse_documents

    spec = parse_documents(getattr(w, "documents", None))
    if spec is None:
        return (0, int(w.seq_len)) if w.layout == "docs" else None
    return cu_seqlens_of(spec.sample(int(w.seq_len), int(w.seed) * 1_000_003 + step))


def _positions_and_targets(
    w: Any, cu: tuple[int, ...], targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Whole sequence: positions restarting per document, targets with padding (after the
    last boundary) ignored (-100), and how many tokens the loss counts."""
    seq = int(w.seq_len)
    doc = torch.full((seq,), -1, dtype=torch.long)
    positions = torch.zeros(seq, dtype=torch.long)
    for d in range(len(cu) - 1):
        doc[cu[d] : cu[d + 1]] = d
        positions[cu[d] : cu[d + 1]] = torch.arange(cu[d + 1] - cu[d])
    return positions, targets.masked_fill(doc[None, :] < 0, -100), int(w.batch) * cu[-1]


class Block(nn.Module):
    """Pre-norm attention + MLP; the attention function is injected (ring or SDPA)."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, attention: Attention) -> None:
        super().__init__()
        dim = heads * head_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * head_dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attention: Attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        attn = self.attention(q.contiguous(), k.contiguous(), v.contiguous())
        x = x + self.out(attn.reshape(b, s, self.heads * self.head_dim))  # s may be 0 (inference)
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """Token + learned absolute position embeddings (indexed by GLOBAL positions, so a
    shard of any layout embeds exactly as in the whole sequence), blocks, LM head."""

    def __init__(self, w: Any, attention: Attention) -> None:
        super().__init__()
        dim = w.heads * w.head_dim
        self.embed = nn.Embedding(w.vocab, dim)
        self.pos = nn.Embedding(w.seq_len, dim)
        self.blocks = nn.ModuleList(Block(w.heads, w.kv_heads, w.head_dim, attention) for _ in range(w.layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, w.vocab, bias=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def markov_table(w: Any) -> torch.Tensor:
    """A fixed, peaked transition matrix (vocab x vocab), from the seed."""
    gen = torch.Generator().manual_seed(int(w.seed) + 1)
    logits = 4.0 * torch.randn(w.vocab, w.vocab, generator=gen, dtype=torch.float64)
    return torch.softmax(logits, dim=-1)


def batch_at(w: Any, step: int, table: torch.Tensor) -> torch.Tensor:
    """Step `step`'s token batch (B, S+1), identical wherever it is computed."""
    gen = torch.Generator().manual_seed(int(w.seed) * 100_003 + step)
    tokens = torch.empty(w.batch, w.seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(w.vocab, (w.batch,), generator=gen)
    for i in range(1, w.seq_len + 1):
        tokens[:, i] = torch.multinomial(table[tokens[:, i - 1]], 1, generator=gen).squeeze(1)
    return tokens


def build(w: Any, attention: Attention, device: torch.device) -> tuple[TinyLM, torch.optim.Optimizer]:
    torch.manual_seed(int(w.seed))
    model = TinyLM(w, attention).to(device=device, dtype=getattr(torch, w.dtype))
    return model, torch.optim.AdamW(model.parameters(), lr=float(w.lr))


def _loss_sum(model: TinyLM, tokens: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    logits = model(tokens, positions)
    # at least float32 (bf16/fp16 logits), and float64 stays float64
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    # targets of -100 (padding) are left out
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def reference_losses(w: Any, steps: int, device: torch.device | None = None) -> list[float]:
    """The same model, data and seed in one process with SDPA on the whole sequence."""
    device = device or torch.device("cpu")
    attention = PackedAttention(None)
    model, opt = build(w, attention, device)
    table, positions = markov_table(w), torch.arange(w.seq_len, device=device)
    losses = []
    for step in range(steps):
        seq = batch_at(w, step, table).to(device)
        attention.cu = cu = step_documents(w, step)
        if cu is None:
            loss = _loss_sum(model, seq[:, :-1], seq[:, 1:], positions) / (w.batch * w.seq_len)
        else:
            pos, targets, count = _positions_and_targets(w, cu, seq[:, 1:].cpu())
            loss = _loss_sum(model, seq[:, :-1], targets.to(device), pos.to(device)) / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


CHECKPOINTS = "checkpoints"
#: what every checkpoint holds; a file without all of it is not loaded
_CHECKPOINT_KEYS = ("step", "model", "optimizer", "rng", "losses", "checkpoints", "wandb_run_id")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / CHECKPOINTS / f"step_{step:06d}.pt"


def save_checkpoint(folder: Path, step: int, state: dict[str, Any]) -> Path:
    """Atomically: written to a temporary name in the same folder, fsync'ed, renamed, the
    folder fsync'ed. A reader (a resumed job) sees a whole checkpoint or none; a write cut
    short (killed, disk full) leaves only a temporary file that is never loaded."""
    path = checkpoint_path(folder, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save({**state, "step": step}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load_latest_checkpoint(folder: Path, device: torch.device | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads whole (every key, its step matching its name);
    a torn or foreign file is skipped with a note, and the one before it is used."""
    for path in sorted((folder / CHECKPOINTS).glob("step_*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location=device or "cpu", weights_only=True)
            whole = isinstance(state, dict) and all(k in state for k in _CHECKPOINT_KEYS)
            if whole and path.name == checkpoint_path(folder, int(state["step"])).name:
                return path, state
        except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
            print(f"ringctl: skipping checkpoint {path}: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"ringctl: skipping checkpoint {path}: not a whole ringctl checkpoint", flush=True)
    return None


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state.cpu(), device)
    else:
        torch.set_rng_state(state.cpu())


def _wandb_kept(folder: Path, attempt: int) -> bool:
    """Whether the attempt before this one closed its W&B run cleanly (recorded in
    attempts.jsonl); if not (killed, or SIGTERM killed W&B's service too), its logged steps
    may be lost, and the resumed run logs them again from the checkpoint."""
    from ringctl.health import read_attempts

    ends = [a for a in read_attempts(folder) if a.get("attempt") == attempt - 1 and a.get("event") in ("requeue", "stopped")]
    return bool(ends) and bool(ends[-1].get("wandb_finished"))


def run(cfg: Any, ctx: Any) -> dict[str, Any]:
    """Train; resume from the job folder's newest whole checkpoint when there is one (a
    requeued job), so the losses continue exactly where the checkpoint left them. SIGTERM
    and the warning signal stop the run at a step end with a checkpoint of that step."""
    from ringctl.ring import shard_sequence
    from ringctl.ring.layouts import document_ids

    w = cfg.workload
    attention = PackedAttention(ctx.ring_attention)
    model, opt = build(w, attention, ctx.device)
    table = markov_table(w)

    def shard(x: torch.Tensor, cu: tuple[int, ...] | None = None) -> torch.Tensor:
        return shard_sequence(
            x, ctx.position, ctx.world_size, layout=w.layout, dim=1, cu_seqlens=cu
        ).contiguous().to(ctx.device)  # fmt: skip

    losses: list[float] = []
    checkpoints: list[str] = []
    start = 0
    found: list[Any] = [None]
    if ctx.rank == 0:
        latest = load_latest_checkpoint(ctx.folder)
        found[0] = str(latest[0]) if latest is not None else None
    dist.broadcast_object_list(found, src=0, group=ctx.group)  # every rank loads the same one
    if found[0] is not None:
        state = torch.load(found[0], map_location=ctx.device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], ctx.device)
        start, losses, checkpoints = int(state["step"]), list(state["losses"]), list(state["checkpoints"])
        print(f"ringctl: resumed from {found[0]} (step {start}, attempt {ctx.attempt})", flush=True)
        if ctx.rank == 0 and not _wandb_kept(ctx.folder, ctx.attempt):
            ctx.metrics.replay([(i + 1, {"train/loss": loss}) for i, loss in enumerate(losses)])
    run_id = getattr(getattr(ctx.metrics, "run", None), "id", None) or ""
    ctx.progress.update(losses=losses, checkpoints=checkpoints, resumed_from_step=start)
    ctx.stop_at_step_ends()
    every = int(w.checkpoint_every)
    mem = PeakMemory(ctx.device)  # what the training steps add, each rank
    mem.start()
    started = time.perf_counter()
    for step in range(start, int(w.steps)):
        seq = batch_at(w, step, table)
        attention.cu = cu = step_documents(w, step)
        if cu is None:
            positions = shard(torch.arange(w.seq_len).unsqueeze(0)).squeeze(0)
            loss = _loss_sum(model, shard(seq[:, :-1]), shard(seq[:, 1:]), positions) / (w.batch * w.seq_len)
        else:
            pos, targets, count = _positions_and_targets(w, cu, seq[:, 1:])
            # padding, and the docs layout's internal pad rows (zeros), are in no document
            docs = document_ids(w.seq_len, ctx.position, ctx.world_size, w.layout, cu_seqlens=cu)
            local_targets = shard(targets, cu).masked_fill(docs.to(ctx.device)[None, :] < 0, -100)
            local_pos = shard(pos.unsqueeze(0), cu).squeeze(0)
            loss = _loss_sum(model, shard(seq[:, :-1], cu), local_targets, local_pos) / count
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():  # the global loss's gradient = sum of the ranks' parts
            dist.all_reduce(p.grad, group=ctx.group)
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total, group=ctx.group)
        losses.append(float(total))
        ctx.metrics.log({"train/loss": losses[-1], "train/elapsed_s": time.perf_counter() - started}, step=step + 1)
        done = step + 1
        ctx.progress["step"] = done
        stop = ctx.stop_requested()  # collective: SIGTERM or the warning signal on any rank
        if done % every == 0 or done == w.steps or stop:
            path = checkpoint_path(ctx.folder, done)
            checkpoints.append(str(path))
            if ctx.rank == 0:
                save_checkpoint(ctx.folder, done, {
                    "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": _rng_state(ctx.device),
                    "losses": losses, "checkpoints": checkpoints, "wandb_run_id": run_id,
                })
        if stop:
            dist.barrier(group=ctx.group)  # the checkpoint is on disk before anyone leaves
            ctx.stop(done, str(checkpoint_path(ctx.folder, done)))
    elapsed = time.perf_counter() - started
    trained = max(1, int(w.steps) - start)
    return {
        "losses": losses, "final_loss": losses[-1], "checkpoints": checkpoints, "resumed_from_step": start,
        "times": {"train_s": elapsed, "step_s": elapsed / trained},
        "tokens_per_s": trained * w.batch * w.seq_len / elapsed,
        "memory": memory_results(ctx, mem.stop(), "the training steps (model forward/backward, "
                                 "gradient all-reduce, optimizer step, checkpoints) over the level "
                                 "before the first (on CPU: RSS, with glibc's heap reuse)"),
    }
