"""attention: ring_attention forward+backward timing, bytes per link class, exactness.

1. Timing at the configured size: every rank holds the shard of its ring position;
   forward and backward are timed separately (slowest rank, after a barrier).
2. Bytes: one more fwd+bwd with the comm counters reset; the bytes each rank sent per
   (phase, link class) are compared with the plan's prediction, byte for byte.
3. Exactness at `check_seq_len` in float64: the shards' outputs and gradients are
   gathered, unsharded and compared with SDPA on the whole sequence (rank 0 reports).
4. Memory: each rank's peak during one more fwd+bwd (`PeakMemory`), gathered, beside the
   planner's prediction (`ringctl.memory.predict_peak`).

With `workload.documents` (packed documents drawn from `seed`), every call passes their
`cu_seqlens`, and the check compares with SDPA given the block-diagonal mask.
"""

from __future__ import annotations

import ctypes
import time
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist

from ringctl.plan import PHASES
from ringctl.topology import LINKS


def full_inputs(w: Any, seq_len: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """q, k, v, dout for the whole sequence, identical on every rank (seeded generator)."""
    gen = torch.Generator().manual_seed(int(w.seed))
    shapes = [
        (w.batch, seq_len, w.heads, w.head_dim),
        (w.batch, seq_len, w.kv_heads, w.head_dim),
        (w.batch, seq_len, w.kv_heads, w.head_dim),
        (w.batch, seq_len, w.heads, w.head_dim),
    ]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


def documents_cu(w: Any, seq_len: int) -> tuple[int, ...] | None:
    """Boundaries of the packed documents of a `seq_len`-token sequence (drawn from
    `workload.documents` with `workload.seed`, the same on every rank; explicit lengths cut
    at `seq_len`), or None: one sequence. The `docs` layout always gets boundaries (one
    document without `documents`), so any `seq_len` can be sharded."""
    from ringctl.documents import cu_seqlens_of, parse_documents

    spec = parse_documents(getattr(w, "documents", None))
    if spec is None:
        return (0, seq_len) if w.layout == "docs" else None
    if spec.kind == "lengths":
        cu = [b for b in cu_seqlens_of(spec.lengths) if b < seq_len]
        end = min(seq_len, sum(spec.lengths))
        return tuple(cu) if cu[-1] == end else (*cu, end)
    return cu_seqlens_of(spec.sample(seq_len, int(w.seed)))


def local_shards(ctx: Any, tensors: list[torch.Tensor], cu: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    """This rank's shard (of its ring position) of each full-sequence tensor."""
    from ringctl.ring import shard_sequence

    layout = ctx.cfg.workload.layout
    return [
        shard_sequence(t, ctx.position, ctx.world_size, layout=layout, cu_seqlens=cu).contiguous()
        for t in tensors
    ]


def fwd_bwd(
    ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
    cu: tuple[int, ...] | None = None,
):  # fmt: skip
    """One forward and backward of ring_attention; returns (out, dq, dk, dv, t_fwd, t_bwd)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    dist.barrier(ctx.group)
    t0 = time.perf_counter()
    out = ctx.ring_attention(q, k, v, cu_seqlens=cu)
    _sync(ctx.device)
    t1 = time.perf_counter()
    out.backward(dout)
    _sync(ctx.device)
    t2 = time.perf_counter()
    return out.detach(), q.grad, k.grad, v.grad, t1 - t0, t2 - t1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slowest(values: list[float], ctx: Any) -> list[float]:
    """Per-iteration max over ranks: the ring is as fast as its slowest rank."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.group)
    return t.tolist()


def timing(ctx: Any) -> dict[str, Any]:
    w = ctx.cfg.workload
    dtype = getattr(torch, w.dtype)
    cu = documents_cu(w, int(w.seq_len))
    q, k, v, dout = local_shards(ctx, full_inputs(w, w.seq_len, dtype, ctx.device), cu)
    fwd, bwd = [], []
    for i in range(int(w.warmup) + int(w.iters)):
        *_, t_fwd, t_bwd = fwd_bwd(ctx, q, k, v, dout, cu)
        if i >= w.warmup:
            fwd.append(t_fwd)
            bwd.append(t_bwd)
    fwd, bwd = _slowest(fwd, ctx), _slowest(bwd, ctx)
    for step, (f, b) in enumerate(zip(fwd, bwd), start=1):
        ctx.metrics.log({"attention/fwd_ms": 1e3 * f, "attention/bwd_ms": 1e3 * b, "attention/step_ms": 1e3 * (f + b)}, step=step)
    return {
        "fwd_s": fwd, "bwd_s": bwd,
        "fwd_median_s": sorted(fwd)[len(fwd) // 2], "bwd_median_s": sorted(bwd)[len(bwd) // 2],
    }


def _per_rank(stats: Any, phase: str, link: str) -> int:
    """Bytes this rank sent in (phase, link) from ringctl.ring.comm_stats()."""
    if (phase, link) in stats:
        return int(stats[(phase, link)])
    return int(stats.get(phase, {}).get(link, 0))


def link_bytes(ctx: Any) -> dict[str, Any]:
    """Bytes sent per (phase, link class) per rank: measured by the runtime's counters
    during one fwd+bwd, and predicted by the plan."""
    from ringctl.ring import comm_stats, reset_comm_stats

    w = ctx.cfg.workload
    dtype = getattr(torch, w.dtype)
    cu = documents_cu(w, int(w.seq_len))
    q, k, v, dout = local_shards(ctx, full_inputs(w, w.seq_len, dtype, ctx.device), cu)
    reset_comm_stats()
    fwd_bwd(ctx, q, k, v, dout, cu)
    stats = comm_stats()
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    mine = {p: {link: _per_rank(stats, p, link) for link in LINKS} for p in PHASES}
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine, group=ctx.group)
    out: dict[str, Any] = {}
    exact = True
    for phase in PHASES:
        predicted = ctx.plan.predicted_bytes(w.batch, w.seq_len, w.kv_heads, w.head_dim, dtype_bytes, phase, heads=int(w.heads))
        out[phase] = {}
        for link in ("intra", "inter"):
            measured = [g[phase][link] for g in gathered]
            expect = [int(b) for b in predicted.get(link, [0] * ctx.world_size)]
            exact &= measured == expect
            out[phase][link] = {
                "measured": measured, "predicted": expect,
                "measured_total": sum(measured), "predicted_total": sum(expect),
            }
    out["match"] = exact
    return out


def exactness(ctx: Any) -> dict[str, Any]:
    """Max abs error of out, dq, dk, dv vs SDPA on the whole sequence, float64 (with
    documents: the block-diagonal mask; padding rows must be exactly 0)."""
    from ringctl.ring import unshard_sequence

    w = ctx.cfg.workload
    seq_len = int(w.check_seq_len)
    cu = documents_cu(w, seq_len)
    full = full_inputs(w, seq_len, torch.float64, ctx.device)
    q, k, v, dout = local_shards(ctx, full, cu)
    out, dq, dk, dv, *_ = fwd_bwd(ctx, q, k, v, dout, cu)
    order = list(ctx.plan.ring_order)  # position -> rank
    whole = []
    for local in (out, dq, dk, dv):
        shards = [torch.empty_like(local) for _ in range(ctx.world_size)]
        dist.all_gather(shards, local.contiguous(), group=ctx.group)
        whole.append(unshard_sequence(
            [shards[r] for r in order], layout=w.layout, cu_seqlens=cu, seq_len=seq_len
        ))  # fmt: skip
    errors = {}
    if ctx.rank == 0:
        ref = reference(*full, causal=bool(w.causal), cu_seqlens=cu)
        for name, got, want in zip(("out", "dq", "dk", "dv"), whole, ref):
            errors[name] = float((got - want).abs().max())
    err = torch.tensor([max(errors.values()) if errors else 0.0], dtype=torch.float64)
    dist.broadcast(err, src=0, group=ctx.group)
    max_error = float(err)
    return {
        "seq_len": seq_len, "dtype": "float64", "errors": errors, "max_error": max_error,
        "tol": float(w.check_tol), "passed": max_error <= float(w.check_tol),
    }


class PeakMemory:
    """Peak memory a section adds over the level just before it, on this rank (bytes).

    CUDA: the caching allocator's peak (``max_memory_allocated`` after
    ``reset_peak_memory_stats``) minus what was allocated at ``start``. CPU on Linux: the
    kernel's resident-set high-water mark (VmHWM), reset by writing "5" to
    /proc/self/clear_refs, minus the RSS at ``start``; the kernel raises the mark before any
    page leaves the resident set, so no transient is missed, however short. ``start`` first
    has glibc hand back the heap it keeps from earlier frees (``malloc_trim``): reused
    without that, such memory would serve the section without raising RSS and the figure
    would read low. With ``exact``, glibc also maps every block over 64 KiB on its own until
    ``stop`` (``mallopt(M_MMAP_THRESHOLD)``, as ``MALLOC_MMAP_THRESHOLD_=65536`` would), so
    RSS follows the live tensors instead of the heap's fragments; each such allocation then
    costs page faults, so a timed section should not be exact. ``peak()`` is None where
    neither source exists.

        with PeakMemory(device) as mem:
            ...
        mem.bytes
    """

    def __init__(self, device: torch.device, *, exact: bool = False) -> None:
        self.device = device
        self.exact = exact and device.type != "cuda"
        self.level: int | None = None
        self.bytes: int | None = None

    def start(self) -> None:
        """Take the current level and reset the high-water mark to it."""
        if self.device.type != "cuda":
            if self.exact:
                _mmap_threshold(_EXACT_MMAP_THRESHOLD)
            _trim_heap()
        self.restart()
        self.level = self._current()

    def stop(self) -> int | None:
        """The peak so far (``peak()``); glibc's mmap threshold back to its usual ceiling."""
        self.bytes = self.peak()
        if self.exact:
            _mmap_threshold(_GLIBC_MMAP_THRESHOLD_MAX)
        return self.bytes

    def restart(self) -> None:
        """Reset the high-water mark only (the level stays the one ``start`` took)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.level = None

    def peak(self) -> int | None:
        """Highest usage since the last (re)start, minus the level ``start`` took."""
        if self.level is None:
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device)) - self.level
        high = _proc_status_kb("VmHWM")
        return None if high is None else high * 1024 - self.level

    def _current(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        rss = _proc_status_kb("VmRSS")
        return None if rss is None else rss * 1024

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_EXACT_MMAP_THRESHOLD = 64 << 10
_GLIBC_MMAP_THRESHOLD_MAX = 32 << 20  # where glibc's own dynamic threshold stops (64-bit)


def _mmap_threshold(size: int) -> None:
    """glibc: serve blocks of ``size`` bytes or more by their own mappings (no-op elsewhere)."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, size)
    except (OSError, AttributeError):
        pass


def _trim_heap() -> None:
    """glibc: return freed heap memory to the kernel (no-op where there is no glibc)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_results(ctx: Any, peak: int | None, measured: str) -> dict[str, Any]:
    """Every rank's ``peak`` (gathered; None where unmeasured) and the planner's prediction
    of one ring_attention fwd+bwd for this workload and plan (``ringctl.memory``)."""
    from ringctl.memory import predict_peak
    from ringctl.ring.block import block_impl_for

    w = ctx.cfg.workload
    like = torch.empty((1, 1, 1, int(w.head_dim)), dtype=getattr(torch, w.dtype), device=ctx.device)
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, peak, group=ctx.group)
    plan = ctx.plan
    out: dict[str, Any] = {"peak_bytes_per_rank": gathered, "measured": measured}
    try:
        est = predict_peak(
            batch=int(w.batch), seq_len=int(w.seq_len), heads=int(w.heads),
            kv_heads=int(w.kv_heads), head_dim=int(w.head_dim), dtype=str(w.dtype),
            world_size=plan.world_size, layout=plan.layout, causal=bool(w.causal),
            algorithm=plan.algorithm, nodes=plan.nodes, block_impl=block_impl_for(like),
            cpu_threads=torch.get_num_threads(), direction=plan.direction,
        )  # fmt: skip
    except ValueError as err:
        out["predicted_error"] = str(err)
        return out
    out["predicted_peak_bytes"] = est.total
    out["predicted"] = est.to_dict()
    measured_peaks = [p for p in gathered if p is not None]
    if measured_peaks and est.total:
        out["measured_over_predicted"] = max(measured_peaks) / est.total
    return out


def memory(ctx: Any) -> dict[str, Any]:
    """Each rank's peak during one fwd+bwd at the configured size (inputs excluded; out and
    the gradients included, as they are until the caller drops them)."""
    w = ctx.cfg.workload
    dtype = getattr(torch, w.dtype)
    cu = documents_cu(w, int(w.seq_len))
    q, k, v, dout = local_shards(ctx, full_inputs(w, w.seq_len, dtype, ctx.device), cu)
    with PeakMemory(ctx.device, exact=True) as mem:
        kept = fwd_bwd(ctx, q, k, v, dout, cu)
    del kept
    return memory_results(ctx, mem.bytes, "one ring_attention forward+backward")


def document_mask(seq_len: int, cu: tuple[int, ...], causal: bool, device: Any = None) -> torch.Tensor:
    """(S, S) bool, the block-diagonal mask written out: query i sees key j iff both are in
    one document (tokens after the last boundary in none), and j <= i when causal."""
    doc = torch.full((seq_len,), -1, dtype=torch.int64)
    for d in range(len(cu) - 1):
        doc[cu[d] : cu[d + 1]] = d
    sees = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)
    if causal:
        sees &= torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return sees.to(device)


def reference(q, k, v, dout, *, causal: bool, cu_seqlens: tuple[int, ...] | None = None) -> list[torch.Tensor]:
    """SDPA on the whole sequence: out, dq, dk, dv (B, S, H, D); with documents, SDPA with
    the block-diagonal mask, and rows that see nothing (padding) 0 with no gradient."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if cu_seqlens is None:
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=True)
    else:
        sees = document_mask(q.shape[1], cu_seqlens, causal, q.device)
        empty = ~sees.any(1)
        sees[:, 0] |= empty  # SDPA gives NaN on a row that sees nothing: one key, zeroed below
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=sees, enable_gqa=True)
        out = out.masked_fill(empty[None, None, :, None], 0.0)
    out = out.transpose(1, 2)
    out.backward(dout)
    return [out.detach(), q.grad, k.grad, v.grad]


def documents_summary(w: Any, world_size: int) -> dict[str, Any] | None:
    """What results.json records of the packed documents at `workload.seq_len`."""
    from ringctl.documents import document_lengths, layout_padding

    cu = documents_cu(w, int(w.seq_len))
    if cu is None or getattr(w, "documents", None) is None:
        return None
    lengths = document_lengths(cu)
    return {
        "spec": str(getattr(w, "documents", None)), "count": len(lengths), "tokens": cu[-1],
        "mean_length": sum(lengths) / len(lengths), "max_length": max(lengths),
        "layout_padding_tokens": layout_padding(int(w.seq_len), world_size) if w.layout == "docs" else 0,
    }


def run(cfg: Any, ctx: Any) -> dict[str, Any]:
    result: dict[str, Any] = {"times": timing(ctx), "bytes": link_bytes(ctx), "memory": memory(ctx)}
    documents = documents_summary(cfg.workload, ctx.world_size)
    if documents is not None:
        result["documents"] = documents
    failures = []
    if cfg.workload.check:
        result["check"] = exactness(ctx)
        result["max_error"] = result["check"]["max_error"]
        if not result["check"]["passed"]:
            failures.append(
                f"exactness check failed: max error {result['max_error']:.3e} > "
                f"workload.check_tol={cfg.workload.check_tol}"
            )
    if not result["bytes"]["match"]:
        failures.append("measured bytes per link class differ from the plan's prediction (see bytes in results.json)")
    result["failures"] = failures
    return result
