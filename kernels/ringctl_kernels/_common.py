"""What the forward and backward kernels share: the dot policy, input checks, mask tables.

A block's mask reaches the kernels as *ranges*: query row i sees keys ``lo[i] <= j < hi[i]``
with ``lo`` and ``hi`` non-decreasing down the rows. That is the whole mask of any block the
ring computes (ringctl.ring.mask: documents, causal and windows over ascending positions);
causal positions alone (``q_pos``/``k_pos``: "query i sees key j iff k_pos[j] <= q_pos[i]")
are the case ``lo = 0``. The tables hold both directions, so a kernel tests two integer
comparisons per element and knows, per tile, whether it is fully visible (no mask), partly
visible (mask) or hidden (never loaded):

- ``kv_lo[i], kv_hi[i]``: the keys query row i sees.
- ``q_lo[j], q_hi[j]``: the query rows that see key j (contiguous too, as lo/hi ascend).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


# triton.jit picks interpreter or compiler when the kernels are defined, so the mode is
# fixed by TRITON_INTERPRET at the time this package is imported, not at call time.
try:
    _INTERPRET_AT_IMPORT = bool(triton.knobs.runtime.interpret)
except AttributeError:  # triton < 3.4 has no knobs
    _INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when the kernels were built for triton's CPU interpreter (TRITON_INTERPRET=1)."""
    return _INTERPRET_AT_IMPORT


AUTOTUNE_ENV = "RINGCTL_KERNELS_AUTOTUNE"


def autotuning() -> bool:
    """False when RINGCTL_KERNELS_AUTOTUNE=0 at import: one default config per kernel, no
    autotuning pause on each new shape (quick GPU checks; the first call of a shape otherwise
    benchmarks every config)."""
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def choose_configs(interpreter: triton.Config, default: triton.Config,
                   space: list[triton.Config]) -> list[triton.Config]:
    """The autotune space, or one config: under the interpreter (programs run one by one;
    small unequal tiles exercise the tile bookkeeping in the CPU tests) or with autotuning off."""
    if interpreting():
        return [interpreter]
    return space if autotuning() else [default]


@triton.jit
def _dot(a, b, acc, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b. DOT_FP32 upcasts the operands first: the interpreter's bf16 dot is wrong."""
    if DOT_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _tile_bounds(lo, hi, ok, N, BLOCK: tl.constexpr):
    """Loop bounds, over the other side's tiles of BLOCK, for one tile of rows that see
    ``[lo, hi)`` (``ok``: real rows; the others carry lo = N, hi = 0): masked tiles in
    ``[first, full_lo)``, tiles every row sees whole in ``[full_lo, full_hi)``, masked in
    ``[full_hi, last)``. Tiles outside every row's range are never visited."""
    any_lo = tl.min(lo)
    last = tl.max(hi)
    all_lo = tl.max(tl.where(ok, lo, 0))
    all_hi = tl.min(tl.where(ok, hi, N))
    first = (any_lo // BLOCK) * BLOCK
    full_lo = ((all_lo + BLOCK - 1) // BLOCK) * BLOCK
    full_hi = (all_hi // BLOCK) * BLOCK
    none = full_hi <= full_lo
    full_lo = tl.where(none, first, full_lo)
    full_hi = tl.where(none, first, full_hi)
    return first, full_lo, full_hi, last


@dataclass(frozen=True)
class DotPolicy:
    """Constexprs for ``_dot``: fp32 inputs get IEEE products (no silent TF32)."""

    dot_fp32: bool
    precision: str

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> DotPolicy:
        return cls(
            dot_fp32=interpreting() and dtype == torch.bfloat16,
            precision="ieee" if dtype == torch.float32 else "tf32",
        )


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> None:
    """Raise ValueError/RuntimeError for anything the kernels cannot compute exactly."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, S, H, D), got shape {tuple(t.shape)}")
    if q.dtype == torch.float64:
        raise ValueError(
            "dtype float64 is not supported by the Triton kernels (allowed: float16, bfloat16, "
            "float32); ringctl.ring.block sends float64 to its torch path unless "
            "RINGCTL_BLOCK_IMPL=triton forces the kernels: unset it for float64"
        )
    if q.dtype not in DTYPES:
        raise ValueError(f"q.dtype {q.dtype} not supported; allowed: float16, bfloat16, float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    (b, _, hq, d), (bk, _, hkv, dk) = q.shape, k.shape
    if bk != b or dk != d:
        raise ValueError(
            f"q (B, Sq, Hq, D) = {tuple(q.shape)} and k (B, Sk, Hkv, D) = {tuple(k.shape)} "
            "must agree on B and D"
        )
    if d not in HEAD_DIMS:
        raise ValueError(f"head_dim {d} not supported by the Triton kernels; allowed: {HEAD_DIMS}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"Hq ({hq}) must be a multiple of Hkv ({hkv})")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a finite positive float, got {scale!r}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_extent(name, t)
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"ringctl_kernels needs CUDA tensors (got device {q.device}); to run them on the CPU "
            "set TRITON_INTERPRET=1 before triton is imported"
        )


def check_extent(name: str, t: torch.Tensor) -> None:
    """Kernels index within one batch entry in int32 (the batch offset is int64)."""
    per_batch = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:]))
    contiguous = t.shape[1] * t.shape[2] * t.shape[3]  # the fp32 outputs of that shape
    if max(per_batch, contiguous) >= 2**31:
        raise ValueError(
            f"{name} of shape {tuple(t.shape)} spans >= 2**31 elements per batch entry; the "
            "kernels index in int32 there: use shorter blocks (more ring steps) or split heads"
        )


def check_like(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    """Backward inputs (dout, out, lse) must match the shapes the forward produced."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.dim() == 4:
        check_extent(name, t)


@dataclass(frozen=True)
class MaskTables:
    """Range form of the mask (see module docstring); all None = no mask."""

    kv_lo: torch.Tensor | None  # (Sq,) int32
    kv_hi: torch.Tensor | None  # (Sq,) int32
    q_lo: torch.Tensor | None  # (Sk,) int32
    q_hi: torch.Tensor | None  # (Sk,) int32

    @property
    def has_mask(self) -> bool:
        return self.kv_lo is not None


def _check_pos(name: str, pos: torch.Tensor, length: int, device: torch.device) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor) or pos.dim() != 1 or pos.shape[0] != length:
        shape = tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"{name} must be a 1-D tensor of length {length}, got {shape}")
    if pos.dtype.is_floating_point or pos.dtype.is_complex or pos.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer token positions, got dtype {pos.dtype}")
    return pos.to(device=device, dtype=torch.int64)


def _descending(pos: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: some neighbour pair is out of order (stays on the device)."""
    return (pos[1:] < pos[:-1]).any()


def mask_tables(
    q_pos: torch.Tensor | None,
    k_pos: torch.Tensor | None,
    sq: int,
    sk: int,
    device: torch.device,
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> MaskTables:
    """Validate causal positions or key ranges and build the tables on ``device``."""
    if (q_pos is None) != (k_pos is None):
        raise ValueError("q_pos and k_pos must both be given or both be None (no mask)")
    if ranges is not None and q_pos is not None:
        raise ValueError("give either q_pos/k_pos (causal positions) or ranges, not both")
    if ranges is not None:
        lo, hi = _check_ranges(ranges, sq, sk, device)
    elif q_pos is not None and k_pos is not None:
        qp = _check_pos("q_pos", q_pos, sq, device)
        kp = _check_pos("k_pos", k_pos, sk, device)
        # one host sync for both order checks (the kernels' tile skipping relies on the order)
        q_bad, k_bad = torch.stack((_descending(qp), _descending(kp))).tolist()
        for name, bad in (("q_pos", q_bad), ("k_pos", k_bad)):
            if bad:
                raise ValueError(f"{name} must be sorted ascending (every ringctl layout gives that)")
        hi = torch.searchsorted(kp, qp, right=True)
        lo = torch.zeros_like(hi)
    else:
        return MaskTables(None, None, None, None)
    keys = torch.arange(sk, device=device, dtype=torch.int64)
    q_lo = torch.searchsorted(hi, keys, right=True, out_int32=True)  # first row with hi > j
    q_hi = torch.searchsorted(lo, keys, right=True, out_int32=True)  # rows with lo <= j
    return MaskTables(
        lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous(),
        q_lo.contiguous(), q_hi.contiguous(),
    )  # fmt: skip


def _check_ranges(
    ranges: object, sq: int, sk: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(ranges, (tuple, list)) or len(ranges) != 2:
        raise ValueError(f"ranges must be a pair (lo, hi) of 1-D int tensors of length {sq}")
    lo = _check_pos("ranges[0] (lo)", ranges[0], sq, device)
    hi = _check_pos("ranges[1] (hi)", ranges[1], sq, device)
    if sq == 0:
        return lo, hi
    checks = torch.stack((
        _descending(lo), _descending(hi), (lo > hi).any(), lo[0] < 0, hi[-1] > sk,
    )).tolist()  # fmt: skip
    problems = (
        "lo must not decrease down the rows", "hi must not decrease down the rows",
        "lo <= hi on every row", "lo >= 0", f"hi <= {sk} (the keys given)",
    )  # fmt: skip
    for bad, problem in zip(checks, problems, strict=True):
        if bad:
            raise ValueError(f"ranges (lo, hi) are not a block mask: need {problem}")
    return lo, hi


def strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    """(B, S, H, D) strides, in the order the kernels take them."""
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def keep_config(conf: triton.Config, block_m: str, block_n: str, rows: int, cols: int,
                head_dim: int, min_tile_8_warps: int = 128 * 64) -> bool:
    """Autotune filter shared by the kernels.

    Drops 8 warps on tiles smaller than ``min_tile_8_warps`` (too little work per warp; the
    dK/dV kernel sets it lower: its four register-resident tiles spill at 4 warps), tiles
    far larger than the sequence they cover (all padding), and the deepest pipelines at
    head_dim 128 (they exceed shared memory and only cost autotuning time).
    """
    bm, bn = conf.kwargs[block_m], conf.kwargs[block_n]
    if conf.num_warps == 8 and bm * bn < min_tile_8_warps:
        return False
    if bm > max(16, triton.next_power_of_2(rows)) or bn > max(16, triton.next_power_of_2(cols)):
        return False
    return not (head_dim >= 128 and conf.num_stages > 3 and bm * bn >= 128 * 128)


def prune(configs: list[triton.Config], block_m: str, block_n: str, rows: int, cols: int,
          head_dim: int, min_tile_8_warps: int = 128 * 64) -> list[triton.Config]:
    """``keep_config`` over a list, never empty (falls back to the smallest tiles)."""
    kept = [c for c in configs
            if keep_config(c, block_m, block_n, rows, cols, head_dim, min_tile_8_warps)]
    if kept:
        return kept
    smallest = min(configs, key=lambda c: (c.kwargs[block_m] * c.kwargs[block_n], c.num_warps))
    return [smallest]
