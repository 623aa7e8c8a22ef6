"""MoE router logits in float32 from bf16/fp16 operands in one small kernel (DeepSeek's float32 gate).

Semantics (HF DeepSeek V2/V3 `MoEGate`):
    logits = F.linear(x.float(), weight.float())           float32 [T, E]
Inputs: x [T, H] (bf16 / fp16 / fp32; rows may be strided, the last dim contiguous), weight [E, H] (same dtype
family). Output: float32 [T, E], contiguous.

Why a kernel: the product of two bf16 (or two fp16) numbers is exact in float32, so multiplying the 16-bit
operands and accumulating in float32 gives the float32 linear's logits up to summation order, with no bf16->fp32
copy of x and no float32 weight copy; torch takes 3-4 launches (a cast, a SIMT sgemm or dot kernel, a split-K
reduce) for what is one launch here. Deterministic: every logit is summed by one program in a fixed order, no
atomics.

Shapes: T = 1..ROUTER_KERNEL_MAX_TOKENS (decode and prefill steps); above that (or on CPU, or without Triton) the
reference `F.linear(x.float(), weight.float())` runs. Two variants of the kernel (`uses_fma` picks):
- T <= FMA_MAX_TOKENS and T*E*H <= FMA_MAX_WORK: multiply + sum on the CUDA cores, one expert x up to 8 tokens
  per program (enough programs to stream the weight); the K loop is unrolled (H is a compile-time constant) so
  that a program's loads are all in flight; products accumulate elementwise, reduced once at the end. IEEE float32
  throughout: ~1e-7 relative to the largest logit, as the float32 linear (H100, 26 layers in a CUDA graph:
  E=64 H=2048 T=1 1.6 us vs 6.2 us for cast + cuBLAS, T=64 3.4 us vs 11 us; E=256 H=7168 T=1 3.4 us vs 9 us).
- above (16-bit operands of one dtype only): tl.dot tiles of 16 tokens x 16 experts. Hopper's tensor cores sum
  their float32 accumulators without IEEE round-to-nearest, so these logits are within ~1e-5 (H=7168; ~2e-6 at
  H=2048) of the exact ones relative to the largest logit, not ~1e-7 (E=256 H=7168 T=64: 15.5 us vs 22.5 us).
  float32 or mixed operands there take the torch path.
T is not specialised on (one binary per variant and tile shape, not per step size).
"""
from __future__ import annotations

import torch

from fractal.kernels._triton_support import HAS_TRITON, INTERPRET, next_pow2, pdl_launch, use_triton

# above this the torch path runs. Round 6: raised from 256 to cover decode at b=512 and prefill steps too; there the
# torch path was a float32 copy of x plus a SIMT float32 GEMM (13.6 us per layer at T=512, ~60 us at T=8192 on an H100)
ROUTER_KERNEL_MAX_TOKENS = 1 << 16
# from here the tl.dot variant takes 64 experts per program: x is read once, not E/16 times. Round 9 (R9-11, H100,
# graph replay, 26 gates): at 257-1024 tokens that tile left only T/64 programs: T=512 E=64 8.9 us against 5.2 with
# 16-expert tiles (E=128 8.6 vs 5.3); at T=4096 / 16384 the wide tile stays best or even (E=64 11.5 / 29.3 us).
DOT_WIDE_MIN_TOKENS = 1025
FMA_MAX_TOKENS = 128  # the exact multiply + sum variant up to this many tokens ...
FMA_MAX_WORK = 1 << 26  # ... and T * E * H multiply-adds; above, tl.dot tiles (faster there on an H100)


if HAS_TRITON:
    from fractal.kernels._triton_support import pdl_wait, tl, triton

    # sizes that change every step are not specialised on (no recompile per value class)
    @triton.jit(do_not_specialize=["T"])
    def _router_fma_kernel(
        x_ptr, w_ptr, out_ptr, T, E, stride_xt, stride_we, stride_ot,
        H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        pid_e = tl.program_id(0)
        pid_t = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_k = tl.arange(0, BLOCK_K)
        tmask = offs_t < T
        emask = offs_e < E
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None, None] * stride_xt
        w_rows = w_ptr + offs_e.to(tl.int64)[None, :, None] * stride_we
        acc = tl.zeros([BLOCK_T, BLOCK_E, BLOCK_K], dtype=tl.float32)
        # H is constexpr: unrolled, so every chunk's loads can be issued before the first product
        for k0 in tl.static_range(0, H, BLOCK_K):
            k = k0 + offs_k[None, None, :]
            kmask = k < H
            xv = tl.load(x_rows + k, mask=tmask[:, None, None] & kmask, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + k, mask=emask[None, :, None] & kmask, other=0.0).to(tl.float32)
            acc += xv * wv  # bf16 x bf16 is exact in float32
        logits = tl.sum(acc, axis=2)
        o_ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_e[None, :]
        tl.store(o_ptrs, logits.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & emask[None, :])

    # sizes that change every step are not specialised on (no recompile per value class)
    @triton.jit(do_not_specialize=["T"])
    def _router_dot_kernel(
        x_ptr, w_ptr, out_ptr, T, E, stride_xt, stride_we, stride_ot,
        H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
        FP32_DOT: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        pid_e = tl.program_id(0)
        pid_t = tl.program_id(1)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
        offs_k = tl.arange(0, BLOCK_K)
        tmask = offs_t < T
        emask = offs_e < E
        x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt + offs_k[None, :]
        w_ptrs = w_ptr + offs_e.to(tl.int64)[None, :] * stride_we + offs_k[:, None]
        acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kmask = (k0 + offs_k) < H
            xv = tl.load(x_ptrs, mask=tmask[:, None] & kmask[None, :], other=0.0)
            wv = tl.load(w_ptrs, mask=kmask[:, None] & emask[None, :], other=0.0)  # [BLOCK_K, BLOCK_E]
            if FP32_DOT:
                acc = tl.dot(xv.to(tl.float32), wv.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xv, wv, acc)  # 16-bit operands, float32 accumulation: exact products
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        o_ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * stride_ot + offs_e[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & emask[None, :])


def router_logits_ref(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float32 linear (HF DeepSeek's gate): float32 [T, E]; rounded to out_dtype if that is not float32."""
    return torch.nn.functional.linear(x.float(), weight.float()).to(out_dtype)


def _fma_tiles(T: int, E: int, H: int) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_K, num_warps) of the multiply + sum variant (H100: one expert per program streams
    the weight fastest at E = 64..256; the T tile is at most 8 tokens)."""
    block_t = next_pow2(min(T, 8))
    if T <= 2:
        return block_t, 1, min(next_pow2(H), 2048), 8
    return block_t, 1, min(next_pow2(H), 1024), 4


def _dot_tiles(T: int, E: int, H: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_E, BLOCK_K, num_warps, num_stages) of the tl.dot variant (tuned on an H100)."""
    if T >= DOT_WIDE_MIN_TOKENS:
        return 64, min(64, max(16, next_pow2(E))), 64, 4, 3
    block_t = 16 if T <= 128 else 64
    return block_t, 16, 128 if H <= 2048 else 256, 4, 3


def uses_fma(T: int, E: int, H: int) -> bool:
    """Whether router_logits takes the IEEE float32 multiply + sum variant (else tl.dot tiles or torch)."""
    return T <= FMA_MAX_TOKENS and T * E * H <= FMA_MAX_WORK


def router_logits(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """logits [T, E] = x [T, H] @ weight [E, H]^T with float32 accumulation (one Triton launch on CUDA for
    T <= ROUTER_KERNEL_MAX_TOKENS; the float32 torch linear elsewhere). See the module docstring.
    out_dtype: float32 (DeepSeek's float32 gate), or x's 16-bit dtype for a plain 16-bit gate (Qwen3-MoE,
    Mixtral): the float32 sum rounded once on store, as a 16-bit GEMM with float32 accumulation rounds it."""
    T, H = x.shape
    E, H_w = weight.shape
    if H != H_w:
        raise ValueError(f"router_logits: x has {H} features but weight has {H_w}")
    if T > ROUTER_KERNEL_MAX_TOKENS or not use_triton(x, weight):
        return router_logits_ref(x, weight, out_dtype)
    out = torch.empty(T, E, dtype=out_dtype, device=x.device)
    if T == 0 or E == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if uses_fma(T, E, H):
        bt, be, bk, nw = _fma_tiles(T, E, H)
        grid = (triton.cdiv(E, be), triton.cdiv(T, bt))
        _router_fma_kernel[grid](
            x, weight, out, T, E, x.stride(0), weight.stride(0), out.stride(0),
            H=H, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk, num_warps=nw, **pdl_launch(),
        )
    elif x.dtype != weight.dtype or x.dtype == torch.float32:
        return router_logits_ref(x, weight, out_dtype)  # an IEEE float32 dot is far slower than cuBLAS
    else:
        bt, be, bk, nw, ns = _dot_tiles(T, E, H)
        # Triton's CPU interpreter mis-handles bf16 dots: there the operands go through float32 (exact for 16-bit)
        fp32_dot = INTERPRET
        grid = (triton.cdiv(E, be), triton.cdiv(T, bt))
        _router_dot_kernel[grid](
            x, weight, out, T, E, x.stride(0), weight.stride(0), out.stride(0),
            H=H, BLOCK_T=bt, BLOCK_E=be, BLOCK_K=bk, FP32_DOT=fp32_dot, num_warps=nw, num_stages=ns,
            **pdl_launch(),
        )
    return out
