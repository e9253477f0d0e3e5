"""Backward block kernels (FlashAttention-2 style) given the ring's FINAL out and lse.

With P = exp(S*scale - lse) taken against the final lse, each kv block's share of the
gradient is exact on its own: dV = P^T dO, dS = P * (dO V^T - delta), dQ = scale dS K,
dK = scale dS^T Q, where delta = rowsum(dO * out) of the final out (computed once, in torch).
Two kernels, no atomics: ``_dq_kernel`` (one program per query tile, walks the kv block like
the forward) and ``_dkdv_kernel`` (one program per kv tile of one kv head, walks the query
rows of every query head in its GQA group, so dK/dV come out summed over the group).
File order as in triton's tutorials/06-fused-attention.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LOG2E,
    DotPolicy,
    _dot,
    _tile_bounds,
    check_like,
    check_qkv,
    choose_configs,
    mask_tables,
    prune,
    strides,
)


@triton.jit
def _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              kv_lo, kv_hi, lo, hi, Sk, qk_scale, offs_n, offs_d,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        cols = start_n + offs_n
        k_ptrs = k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd
        vt_ptrs = v_base + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=cols[:, None] < Sk, other=0.0)
            vt = tl.load(vt_ptrs, mask=cols[None, :] < Sk, other=0.0)
        else:
            k = tl.load(k_ptrs)
            vt = tl.load(vt_ptrs)
        zeros = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = _dot(q, tl.trans(k), zeros, DOT_FP32, PRECISION) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            seen = (cols[None, :] >= kv_lo[:, None]) & (cols[None, :] < kv_hi[:, None])
            p = tl.where(seen, p, 0.0)
        dp = _dot(do, vt, zeros, DOT_FP32, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_FP32, PRECISION)
    return dq


@triton.jit
def _dq_kernel(Q, K, V, DO, Lse, Delta, DQ, KvLo, KvHi,
               stride_qb, stride_qs, stride_qh, stride_qd,
               stride_kb, stride_ks, stride_kh, stride_kd,
               stride_vb, stride_vs, stride_vh, stride_vd,
               stride_dob, stride_dos, stride_doh, stride_dod,
               stride_dqb, stride_dqs, stride_dqh, stride_dqd,
               Sq, Sk, Hq, GROUP, scale, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = (off_bh // Hq).to(tl.int64)
    off_h = off_bh % Hq
    off_hk = off_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Sq

    q = tl.load(Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos
                 + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    row_base = off_bh.to(tl.int64) * Sq
    lse = tl.load(Lse + row_base + offs_m, mask=row_ok, other=float("inf"))
    # lse = -inf: the row saw no key anywhere in the ring; +inf makes its P exactly 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=row_ok, other=0.0)
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh

    if HAS_MASK:
        kv_lo = tl.load(KvLo + offs_m, mask=row_ok, other=Sk)
        kv_hi = tl.load(KvHi + offs_m, mask=row_ok, other=0)
    else:
        kv_lo = tl.zeros([BLOCK_M], dtype=tl.int32)
        kv_hi = tl.zeros([BLOCK_M], dtype=tl.int32) + Sk
    lo, full_lo, full_hi, hi = _tile_bounds(kv_lo, kv_hi, row_ok, Sk, BLOCK_N)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                   kv_lo, kv_hi, lo, full_lo, Sk, qk_scale, offs_n, offs_d,
                   BLOCK_M, BLOCK_N, True, DOT_FP32, PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                   kv_lo, kv_hi, full_lo, full_hi, Sk, qk_scale, offs_n, offs_d,
                   BLOCK_M, BLOCK_N, False, DOT_FP32, PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
                   kv_lo, kv_hi, full_hi, hi, Sk, qk_scale, offs_n, offs_d,
                   BLOCK_M, BLOCK_N, True, DOT_FP32, PRECISION)
    dq_ptrs = DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, dq * scale, mask=row_ok[:, None])


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                stride_qm, stride_qd, stride_dom, stride_dod,
                q_lo, q_hi, lo, hi, Sq, qk_scale, offs_m, offs_d,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        row_ok = rows < Sq
        # padding rows load lse = +inf, so their P is 0 and they add nothing
        q = tl.load(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=float("inf"))
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        zeros = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        st = _dot(k, tl.trans(q), zeros, DOT_FP32, PRECISION) * qk_scale
        pt = tl.math.exp2(st - lse2[None, :])
        if MASKED:
            seen = (rows[None, :] >= q_lo[:, None]) & (rows[None, :] < q_hi[:, None])
            pt = tl.where(seen, pt, 0.0)
        dv = _dot(pt.to(do.dtype), do, dv, DOT_FP32, PRECISION)
        dpt = _dot(v, tl.trans(do), zeros, DOT_FP32, PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = _dot(dst.to(q.dtype), q, dk, DOT_FP32, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, Lse, Delta, DK, DV, QLo, QHi,
                 stride_qb, stride_qs, stride_qh, stride_qd,
                 stride_kb, stride_ks, stride_kh, stride_kd,
                 stride_vb, stride_vs, stride_vh, stride_vd,
                 stride_dob, stride_dos, stride_doh, stride_dod,
                 stride_dkb, stride_dks, stride_dkh, stride_dkd,
                 Sq, Sk, Hq, Hkv, GROUP, scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_MASK: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_bhk = tl.program_id(1)
    off_b = (off_bhk // Hkv).to(tl.int64)
    off_hk = off_bhk % Hkv
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < Sk

    k = tl.load(K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_ks
                + offs_d[None, :] * stride_kd, mask=col_ok[:, None], other=0.0)
    v = tl.load(V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vs
                + offs_d[None, :] * stride_vd, mask=col_ok[:, None], other=0.0)

    if HAS_MASK:
        q_lo = tl.load(QLo + offs_n, mask=col_ok, other=Sq)
        q_hi = tl.load(QHi + offs_n, mask=col_ok, other=0)
    else:
        q_lo = tl.zeros([BLOCK_N], dtype=tl.int32)
        q_hi = tl.zeros([BLOCK_N], dtype=tl.int32) + Sq
    lo, full_lo, full_hi, hi = _tile_bounds(q_lo, q_hi, col_ok, Sq, BLOCK_M)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for g in range(GROUP):  # the query heads that share this kv head
        off_h = off_hk * GROUP + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * Hq + off_h) * Sq
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base,
                             stride_qs, stride_qd, stride_dos, stride_dod,
                             q_lo, q_hi, lo, full_lo, Sq, qk_scale, offs_m, offs_d,
                             BLOCK_M, BLOCK_N, True, DOT_FP32, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base,
                             stride_qs, stride_qd, stride_dos, stride_dod,
                             q_lo, q_hi, full_lo, full_hi, Sq, qk_scale, offs_m, offs_d,
                             BLOCK_M, BLOCK_N, False, DOT_FP32, PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, Lse + row_base, Delta + row_base,
                             stride_qs, stride_qd, stride_dos, stride_dod,
                             q_lo, q_hi, full_hi, hi, Sq, qk_scale, offs_m, offs_d,
                             BLOCK_M, BLOCK_N, True, DOT_FP32, PRECISION)
    # dK and dV share one layout (both allocated here as (B, Sk, Hkv, D) contiguous)
    kv_off = off_b * stride_dkb + off_hk * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    tl.store(DK + kv_off, dk * scale, mask=col_ok[:, None])
    tl.store(DV + kv_off, dv, mask=col_ok[:, None])


def _dq_configs() -> list[triton.Config]:
    return choose_configs(
        interpreter=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_stages=1, num_warps=4),
        default=triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_stages=2, num_warps=8),
        space=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
            for bm in (64, 128)
            for bn in (32, 64, 128)
            for s in (2, 3)
            for w in (4, 8)
        ],
    )


def _dkdv_configs() -> list[triton.Config]:
    # default: no register spills at head_dim 128 on sm_90 (ptxas -v on the AOT build)
    return choose_configs(
        interpreter=triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_stages=1, num_warps=4),
        default=triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_stages=2, num_warps=8),
        space=[
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
            for bm in (32, 64)
            for bn in (64, 128)
            for s in (2, 3)
            for w in (4, 8)
        ],
    )


def _prune_dq(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    return prune(configs, "BLOCK_M", "BLOCK_N", args["Sq"], args["Sk"], args["HEAD_DIM"])


def _prune_dkdv(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    return prune(configs, "BLOCK_M", "BLOCK_N", args["Sq"], args["Sk"], args["HEAD_DIM"],
                 min_tile_8_warps=32 * 64)


_dq = triton.autotune(
    configs=_dq_configs(),
    key=["Sq", "Sk", "HEAD_DIM", "HAS_MASK"],
    prune_configs_by={"early_config_prune": _prune_dq},
)(_dq_kernel)

_dkdv = triton.autotune(
    configs=_dkdv_configs(),
    key=["Sq", "Sk", "HEAD_DIM", "HAS_MASK", "GROUP"],
    prune_configs_by={"early_config_prune": _prune_dkdv},
)(_dkdv_kernel)


def block_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one (q block, kv block) pair: ``(dq, dk, dv)`` in fp32.

    ``out`` (B,Sq,Hq,D) and ``lse`` (B,Hq,Sq) are the ring's final merged values, not this
    block's; ``dout`` is cast to q's dtype for the tensor-core products (as FlashAttention
    does). dk/dv are (B,Sk,Hkv,D), summed over each kv head's query group. Rows with
    lse = -inf contribute nothing. The mask (positions or ``ranges``) as in ``block_forward``.
    """
    check_qkv(q, k, v, scale)
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    check_like("dout", dout, (b, sq, hq, d), q.device)
    check_like("out", out, (b, sq, hq, d), q.device)
    check_like("lse", lse, (b, hq, sq), q.device)
    tables = mask_tables(q_pos, k_pos, sq, sk, q.device, ranges)
    dq = torch.zeros((b, sq, hq, d), dtype=torch.float32, device=q.device)
    dk = torch.zeros((b, sk, hkv, d), dtype=torch.float32, device=q.device)
    dv = torch.zeros((b, sk, hkv, d), dtype=torch.float32, device=q.device)
    if b * sq * hq == 0 or sk == 0:
        return dq, dk, dv
    policy = DotPolicy.for_dtype(q.dtype)
    do = dout.to(q.dtype)
    lse = lse.to(torch.float32).contiguous()
    # FlashAttention-2's delta against the FINAL out; a -inf row has out = 0, so delta = 0
    delta = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1).transpose(1, 2).contiguous()
    group = hq // hkv
    # unused pointers when there is no mask
    kv_lo, kv_hi, q_lo, q_hi = (t if t is not None else lse for t in (
        tables.kv_lo, tables.kv_hi, tables.q_lo, tables.q_hi))

    def dq_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(sq, meta["BLOCK_M"]), b * hq

    def dkdv_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(sk, meta["BLOCK_N"]), b * hkv

    _dq[dq_grid](
        q, k, v, do, lse, delta, dq, kv_lo, kv_hi,
        *strides(q), *strides(k), *strides(v), *strides(do), *strides(dq),
        sq, sk, hq, group, scale, scale * LOG2E,
        HEAD_DIM=d, HAS_MASK=tables.has_mask, DOT_FP32=policy.dot_fp32, PRECISION=policy.precision,
    )
    _dkdv[dkdv_grid](
        q, k, v, do, lse, delta, dk, dv, q_lo, q_hi,
        *strides(q), *strides(k), *strides(v), *strides(do), *strides(dk),
        sq, sk, hq, hkv, group, scale, scale * LOG2E,
        HEAD_DIM=d, HAS_MASK=tables.has_mask, DOT_FP32=policy.dot_fp32, PRECISION=policy.precision,
    )
    return dq, dk, dv
