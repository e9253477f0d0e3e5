"""train: a small causal transformer LM whose attention layers call ring_attention.

Every rank holds the same model (same seed) and the shard of its ring position of each
sequence (tokens, targets and their global positions, all with the workload's layout).
The loss is the global mean over all tokens; each rank backpropagates its part (the
ring's backward sends dK/dV home), gradients are summed over ranks, and every rank takes
the same optimizer step. So the run is the one-process model with SDPA, step for step:
`reference_losses` runs exactly that, and tests compare the two.

Data: token sequences sampled from a fixed random Markov chain (seeded), so there is
something to learn and nothing to download.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Whole-sequence causal attention, (B, S, H, D) in and out: the reference."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    )
    return out.transpose(1, 2)


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
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).unbind(2)
        attn = self.attention(q.contiguous(), k.contiguous(), v.contiguous())
        x = x + self.out(attn.reshape(b, s, -1))
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
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")


def reference_losses(w: Any, steps: int, device: torch.device | None = None) -> list[float]:
    """The same model, data and seed in one process with SDPA on the whole sequence."""
    device = device or torch.device("cpu")
    model, opt = build(w, sdpa_attention, device)
    table, positions = markov_table(w), torch.arange(w.seq_len, device=device)
    losses = []
    for step in range(steps):
        seq = batch_at(w, step, table).to(device)
        loss = _loss_sum(model, seq[:, :-1], seq[:, 1:], positions) / (w.batch * w.seq_len)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _save_checkpoint(folder: Path, step: int, model: TinyLM, opt: torch.optim.Optimizer) -> Path:
    path = folder / "checkpoints" / f"step_{step:06d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    return path


def run(cfg: Any, ctx: Any) -> dict[str, Any]:
    from ringctl.ring import shard_sequence

    w = cfg.workload
    model, opt = build(w, ctx.ring_attention, ctx.device)
    table = markov_table(w)

    def shard(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, ctx.position, ctx.world_size, layout=w.layout, dim=1).contiguous().to(ctx.device)

    positions = shard(torch.arange(w.seq_len).unsqueeze(0)).squeeze(0)
    losses, checkpoints = [], []
    started = time.perf_counter()
    for step in range(int(w.steps)):
        seq = batch_at(w, step, table)
        loss = _loss_sum(model, shard(seq[:, :-1]), shard(seq[:, 1:]), positions) / (w.batch * w.seq_len)
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
        if ctx.rank == 0 and (done % int(w.checkpoint_every) == 0 or done == w.steps):
            checkpoints.append(str(_save_checkpoint(ctx.folder, done, model, opt)))
    elapsed = time.perf_counter() - started
    return {
        "losses": losses, "final_loss": losses[-1], "checkpoints": checkpoints,
        "times": {"train_s": elapsed, "step_s": elapsed / len(losses)},
        "tokens_per_s": w.steps * w.batch * w.seq_len / elapsed,
    }
