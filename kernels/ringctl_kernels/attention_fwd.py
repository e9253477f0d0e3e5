"""Forward block kernel: softmax(q k^T * scale, mask) v, plus the log-sum-exp.

One program owns BLOCK_M query rows of one (batch, query head) and walks only the key tiles
its rows' ranges touch (``_common``'s tables), in three loops: the masked tiles before the
keys every row sees, those tiles with no mask at all, the masked tiles after them; tiles no
row sees are never loaded. The online softmax runs in base 2
(``exp2``, scores pre-multiplied by log2(e)); lse is returned in natural log.
File order as in triton's tutorials/06-fused-attention.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    DotPolicy,
    _dot,
    _tile_bounds,
    check_qkv,
    choose_configs,
    mask_tables,
    prune,
    strides,
)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               kv_lo, kv_hi, lo, hi, Sk, qk_scale, offs_n, offs_d,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MASKED:
            kt = tl.load(kt_ptrs, mask=cols[None, :] < Sk, other=0.0)
            v = tl.load(v_ptrs, mask=cols[:, None] < Sk, other=0.0)
        else:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        s = _dot(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_FP32, PRECISION)
        s = s * qk_scale
        if MASKED:
            # kv_hi <= Sk, so this also hides the padding columns of a ragged last tile
            seen = (cols[None, :] >= kv_lo[:, None]) & (cols[None, :] < kv_hi[:, None])
            s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # a row with nothing visible yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_shift = m_new
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, DOT_FP32, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, Lse, KvLo, KvHi,
                stride_qb, stride_qs, stride_qh, stride_qd,
                stride_kb, stride_ks, stride_kh, stride_kd,
                stride_vb, stride_vs, stride_vh, stride_vd,
                stride_ob, stride_os, stride_oh, stride_od,
                Sq, Sk, Hq, GROUP, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // Hq).to(tl.int64)
    off_h = off_bh % Hq
    off_hk = off_h // GROUP  # GQA: index the shared kv head, never expand it
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Sq

    q_ptrs = Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh

    if HAS_MASK:
        kv_lo = tl.load(KvLo + offs_m, mask=row_ok, other=Sk)
        kv_hi = tl.load(KvHi + offs_m, mask=row_ok, other=0)
    else:
        kv_lo = tl.zeros([BLOCK_M], dtype=tl.int32)
        kv_hi = tl.zeros([BLOCK_M], dtype=tl.int32) + Sk
    lo, full_lo, full_hi, hi = _tile_bounds(kv_lo, kv_hi, row_ok, Sk, BLOCK_N)

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               kv_lo, kv_hi, lo, full_lo, Sk, qk_scale, offs_n, offs_d,
                               BLOCK_M, BLOCK_N, True, DOT_FP32, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               kv_lo, kv_hi, full_lo, full_hi, Sk, qk_scale, offs_n, offs_d,
                               BLOCK_M, BLOCK_N, False, DOT_FP32, PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                               kv_lo, kv_hi, full_hi, hi, Sk, qk_scale, offs_n, offs_d,
                               BLOCK_M, BLOCK_N, True, DOT_FP32, PRECISION)

    # epilogue: rows that saw no key get out = 0 (acc is 0 there) and lse = -inf, never NaN
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_ptrs = Out + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out, mask=row_ok[:, None])
    tl.store(Lse + off_bh.to(tl.int64) * Sq + offs_m, lse, mask=row_ok)


def _fwd_configs() -> list[triton.Config]:
    return choose_configs(
        interpreter=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_stages=1, num_warps=4),
        default=triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=3, num_warps=8),
        space=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
            for bm in (64, 128)
            for bn in (32, 64, 128)
            for s in (2, 3, 4)
            for w in (4, 8)
        ],
    )


def _prune_fwd(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    return prune(configs, "BLOCK_M", "BLOCK_N", args["Sq"], args["Sk"], args["HEAD_DIM"])


_fwd = triton.autotune(
    configs=_fwd_configs(),
    key=["Sq", "Sk", "HEAD_DIM", "HAS_MASK"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_fwd_kernel)


def block_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one q block over one kv block: ``(out (B,Sq,Hq,D), lse (B,Hq,Sq))`` in fp32.

    q ``(B, Sq, Hq, D)``, k/v ``(B, Sk, Hkv, D)``; float16/bfloat16/float32 (float64 raises:
    the runtime keeps float64 on its torch reference). The mask: none; causal positions
    (query i sees key j iff ``k_pos[j] <= q_pos[i]``, both sorted ascending); or ``ranges``
    ``(lo, hi)``: row i sees keys ``lo[i] <= j < hi[i]``, lo and hi non-decreasing. Rows that
    see no key: out 0, lse -inf.
    """
    check_qkv(q, k, v, scale)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    tables = mask_tables(q_pos, k_pos, sq, sk, q.device, ranges)
    out = torch.zeros((b, sq, hq, d), dtype=torch.float32, device=q.device)
    lse = torch.full((b, hq, sq), -math.inf, dtype=torch.float32, device=q.device)
    if b * sq * hq == 0 or sk == 0:
        return out, lse
    policy = DotPolicy.for_dtype(q.dtype)
    kv_lo = tables.kv_lo if tables.kv_lo is not None else lse  # unused pointers when no mask
    kv_hi = tables.kv_hi if tables.kv_hi is not None else lse

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(sq, meta["BLOCK_M"]), b * hq

    _fwd[grid](
        q, k, v, out, lse, kv_lo, kv_hi,
        *strides(q), *strides(k), *strides(v), *strides(out),
        sq, sk, hq, hq // hkv, scale * LOG2E,
        HEAD_DIM=d, HAS_MASK=tables.has_mask, DOT_FP32=policy.dot_fp32, PRECISION=policy.precision,
    )
    return out, lse
