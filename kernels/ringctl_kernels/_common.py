"""What the forward and backward kernels share: the dot policy, input checks, mask tables.

The mask tables turn the global token positions of docs/internals.md ("query i sees key j
iff k_pos[j] <= q_pos[i]", positions ascending within a shard) into prefix counts, so a
kernel tests one integer comparison per element and knows, per tile, which tiles are
fully visible (no mask), partly visible (mask) or hidden (skipped):

- ``kv_visible[i]`` = number of keys query row i sees; they are keys ``0 .. kv_visible[i]-1``.
- ``q_first[j]``   = first query row that sees key j; rows ``q_first[j] ..`` all see it.
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
    """Prefix-count form of the position mask (see module docstring); None = no mask."""

    kv_visible: torch.Tensor | None  # (Sq,) int32
    q_first: torch.Tensor | None  # (Sk,) int32

    @property
    def has_pos(self) -> bool:
        return self.kv_visible is not None


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
) -> MaskTables:
    """Validate the positions and build the prefix counts on ``device``."""
    if (q_pos is None) != (k_pos is None):
        raise ValueError("q_pos and k_pos must both be given or both be None (no mask)")
    if q_pos is None or k_pos is None:
        return MaskTables(None, None)
    qp = _check_pos("q_pos", q_pos, sq, device)
    kp = _check_pos("k_pos", k_pos, sk, device)
    # one host sync for both order checks (the kernels' tile skipping relies on the order)
    q_bad, k_bad = torch.stack((_descending(qp), _descending(kp))).tolist()
    for name, bad in (("q_pos", q_bad), ("k_pos", k_bad)):
        if bad:
            raise ValueError(f"{name} must be sorted ascending (every ringctl layout gives that)")
    kv_visible = torch.searchsorted(kp, qp, right=True, out_int32=True)
    q_first = torch.searchsorted(qp, kp, right=False, out_int32=True)
    return MaskTables(kv_visible.contiguous(), q_first.contiguous())


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
