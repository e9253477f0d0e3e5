"""GPU benchmark: ringctl's Triton block kernels vs torch SDPA, measured side by side.

Prints TFLOP/s and ratios, never asserts on time. Two tables:

1. kernels: ``block_forward`` and ``block_forward + block_backward`` on the whole sequence
   vs ``scaled_dot_product_attention`` with the flash and cuDNN backends (forced through
   ``torch.nn.attention.sdpa_kernel``), causal (positions 0..S-1 on both sides) and not.
2. blockwise on one GPU: the sequence cut into W contiguous blocks, every (q block,
   kv block) pair run through the block kernels and merged by the runtime's log-sum-exp
   merge (``ringctl.ring.merge.merge_block``), as the ring does across W GPUs minus the
   communication; compared with one SDPA flash call. Causal pairs
   with nothing visible are skipped, as the runtime skips them.

Goals (issue 5): kernel >= 0.9x SDPA throughput; blockwise >= 0.92x one SDPA call.

    python bench/kernels.py                       # bf16, D=128, S=4K..32K, causal and not
    python bench/kernels.py --seqlens 4096 --world 2 4 --no-backward

FLOPs count the two (forward) and five (backward) matmuls, halved when causal: forward
4*B*H*S*S*D, backward 2.5x that. The first run of each shape autotunes the kernels (minutes
the first time, cached afterwards); that time is not measured. ``--no-autotune`` skips it
(one default config per kernel), e.g. for a check that must fit a short GPU lease:

    python bench/kernels.py --no-autotune --seqlens 4096 16384
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Problem:
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    dtype: torch.dtype

    def flops(self, backward: bool) -> float:
        fwd = 4.0 * self.batch * self.heads * self.seqlen * self.seqlen * self.head_dim
        if self.causal:
            fwd *= 0.5
        return fwd * (3.5 if backward else 1.0)

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """q, k, v, dout in the runtime's (B, S, H, D) layout."""
        shape = (self.batch, self.seqlen, self.heads, self.head_dim)
        return tuple(torch.randn(shape, device="cuda", dtype=self.dtype) for _ in range(4))


def timed_ms(fn: Callable[[], object], warmup: int, rep: int) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep))


def sdpa_fn(p: Problem, backend, backward: bool) -> Callable[[], object]:
    """One SDPA call over the whole sequence (heads-first views of the same tensors)."""
    from torch.nn.attention import sdpa_kernel

    q, k, v, dout = (t.transpose(1, 2) for t in p.inputs())
    if backward:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    scale = p.head_dim ** -0.5

    def run() -> object:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=p.causal, scale=scale)
            if backward:
                return torch.autograd.grad(out, (q, k, v), dout)
            return out

    return run


def kernel_fn(p: Problem, backward: bool) -> Callable[[], object]:
    """block_forward (and block_backward given its own out/lse) over the whole sequence."""
    from ringctl_kernels import block_backward, block_forward

    q, k, v, dout = p.inputs()
    pos = torch.arange(p.seqlen, device="cuda") if p.causal else None
    scale = p.head_dim ** -0.5

    def run() -> object:
        out, lse = block_forward(q, k, v, scale=scale, q_pos=pos, k_pos=pos)
        if backward:
            return block_backward(dout, q, k, v, out, lse, scale=scale, q_pos=pos, k_pos=pos)
        return out

    return run


def blockwise_fn(p: Problem, world: int, backward: bool) -> Callable[[], object]:
    """The ring's work on one GPU: W x W block pairs (lower triangle if causal), merged."""
    from ringctl.ring.merge import merge_block
    from ringctl_kernels import block_backward, block_forward

    q, k, v, dout = p.inputs()
    chunk = p.seqlen // world
    scale = p.head_dim ** -0.5
    blocks = [slice(i * chunk, (i + 1) * chunk) for i in range(world)]
    pos = [torch.arange(b.start, b.stop, device="cuda") for b in blocks]
    pairs = [(i, j) for i in range(world) for j in range(world) if not (p.causal and j > i)]

    def masks(i: int, j: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        # off-diagonal causal pairs are fully visible: run them unmasked, as the ring may
        return (pos[i], pos[j]) if p.causal and i == j else (None, None)

    def run() -> object:
        outs: list[torch.Tensor] = []
        lses: list[torch.Tensor] = []
        for i, qb in enumerate(blocks):
            out = torch.zeros((p.batch, chunk, p.heads, p.head_dim), device="cuda", dtype=torch.float32)
            lse = torch.full((p.batch, p.heads, chunk), float("-inf"), device="cuda", dtype=torch.float32)
            for j in (j for (ii, j) in pairs if ii == i):
                qp, kp = masks(i, j)
                out_b, lse_b = block_forward(q[:, qb], k[:, blocks[j]], v[:, blocks[j]],
                                             scale=scale, q_pos=qp, k_pos=kp)
                merge_block(out, lse, out_b, lse_b)
            outs.append(out)
            lses.append(lse)
        if not backward:
            return outs
        dq = torch.zeros(q.shape, device="cuda", dtype=torch.float32)
        dk = torch.zeros(k.shape, device="cuda", dtype=torch.float32)
        dv = torch.zeros(v.shape, device="cuda", dtype=torch.float32)
        for i, j in pairs:
            qb, kb = blocks[i], blocks[j]
            qp, kp = masks(i, j)
            dq_b, dk_b, dv_b = block_backward(dout[:, qb], q[:, qb], k[:, kb], v[:, kb], outs[i], lses[i],
                                              scale=scale, q_pos=qp, k_pos=kp)
            dq[:, qb] += dq_b
            dk[:, kb] += dk_b
            dv[:, kb] += dv_b
        return dq, dk, dv

    return run


def max_errors(p: Problem) -> list[float]:
    """max |triton - SDPA flash| of out, dq, dk, dv: a check of the compiled kernels, which
    the CPU tests (interpreter) cannot give. Both sides carry bf16/fp16 rounding."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from ringctl_kernels import block_backward, block_forward

    q, k, v, dout = p.inputs()
    pos = torch.arange(p.seqlen, device="cuda") if p.causal else None
    scale = p.head_dim ** -0.5
    out, lse = block_forward(q, k, v, scale=scale, q_pos=pos, k_pos=pos)
    grads = block_backward(dout, q, k, v, out, lse, scale=scale, q_pos=pos, k_pos=pos)
    qh, kh, vh = (t.transpose(1, 2).detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ref = F.scaled_dot_product_attention(qh, kh, vh, is_causal=p.causal, scale=scale)
    ref_grads = torch.autograd.grad(ref, (qh, kh, vh), dout.transpose(1, 2))
    pairs = [(out, ref)] + list(zip(grads, ref_grads))
    return [(a.float() - b.transpose(1, 2).float()).abs().max().item() for a, b in pairs]


def measure(fn: Callable[[], object], p: Problem, backward: bool, args) -> float | None:
    """TFLOP/s, or None when the backend refuses this problem (e.g. cuDNN not available)."""
    try:
        ms = timed_ms(fn, args.warmup, args.rep)
    except RuntimeError as err:  # SDPA raises RuntimeError when a forced backend cannot run
        print(f"  (skipped: {str(err).splitlines()[0][:100]})", file=sys.stderr)
        return None
    return p.flops(backward) / (ms * 1e-3) / 1e12


def fmt(x: float | None) -> str:
    return "   n/a" if x is None else f"{x:6.1f}"


def ratio(a: float | None, b: float | None) -> str:
    return "  n/a" if a is None or b is None else f"{a / b:5.2f}"


def kernel_table(args) -> None:
    from torch.nn.attention import SDPBackend

    phases = [False] if args.no_backward else [False, True]
    print("\n== kernels vs SDPA (TFLOP/s; ratio = triton / sdpa) ==")
    print(f"{'S':>6} {'causal':>6} {'phase':>7} | {'triton':>6} {'flash':>6} {'cudnn':>6} | "
          f"{'/flash':>6} {'/cudnn':>6}")
    for s in args.seqlens:
        for causal in (False, True):
            p = Problem(args.batch, args.heads, s, args.head_dim, causal, DTYPES[args.dtype])
            errs = max_errors(p)
            print(f"{s:>6} {causal!s:>6}   check | max |triton - flash| out {errs[0]:.2e} "
                  f"dq {errs[1]:.2e} dk {errs[2]:.2e} dv {errs[3]:.2e}", flush=True)
            for bwd in phases:
                tri = measure(kernel_fn(p, bwd), p, bwd, args)
                fla = measure(sdpa_fn(p, SDPBackend.FLASH_ATTENTION, bwd), p, bwd, args)
                cud = measure(sdpa_fn(p, SDPBackend.CUDNN_ATTENTION, bwd), p, bwd, args)
                phase = "fwd+bwd" if bwd else "fwd"
                print(f"{s:>6} {causal!s:>6} {phase:>7} | {fmt(tri)} {fmt(fla)} {fmt(cud)} | "
                      f"{ratio(tri, fla):>6} {ratio(tri, cud):>6}", flush=True)
                torch.cuda.empty_cache()


def blockwise_table(args) -> None:
    from torch.nn.attention import SDPBackend

    phases = [False] if args.no_backward else [False, True]
    print("\n== blockwise on one GPU (W blocks merged by lse) vs one SDPA flash call ==")
    print(f"{'S':>6} {'W':>3} {'causal':>6} {'phase':>7} | {'blockw':>6} {'flash':>6} | {'ratio':>6}")
    for s in args.seqlens:
        for world in args.world:
            if s % world:
                print(f"{s:>6} {world:>3}  skipped: S not divisible by W")
                continue
            for causal in (False, True):
                p = Problem(args.batch, args.heads, s, args.head_dim, causal, DTYPES[args.dtype])
                for bwd in phases:
                    blk = measure(blockwise_fn(p, world, bwd), p, bwd, args)
                    fla = measure(sdpa_fn(p, SDPBackend.FLASH_ATTENTION, bwd), p, bwd, args)
                    phase = "fwd+bwd" if bwd else "fwd"
                    print(f"{s:>6} {world:>3} {causal!s:>6} {phase:>7} | {fmt(blk)} {fmt(fla)} | "
                          f"{ratio(blk, fla):>6}", flush=True)
                    torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128, choices=(64, 128))
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--world", type=int, nargs="+", default=[4],
                    help="number of blocks W for the blockwise table")
    ap.add_argument("--no-backward", action="store_true", help="forward only")
    ap.add_argument("--skip-blockwise", action="store_true")
    ap.add_argument("--no-autotune", action="store_true",
                    help="one default config per kernel (RINGCTL_KERNELS_AUTOTUNE=0): fast start")
    ap.add_argument("--warmup", type=int, default=25, help="ms of warm-up per measurement")
    ap.add_argument("--rep", type=int, default=100, help="ms of repetitions per measurement")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the CPU checks of the kernels are tests/test_kernels.py", file=sys.stderr)
        return 2
    if args.no_autotune:
        os.environ["RINGCTL_KERNELS_AUTOTUNE"] = "0"  # read when ringctl_kernels is imported
    import triton

    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"B={args.batch} H={args.heads} D={args.head_dim} {args.dtype}, "
          f"autotune {'off' if args.no_autotune else 'on'}")
    kernel_table(args)
    if not args.skip_blockwise:
        blockwise_table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
