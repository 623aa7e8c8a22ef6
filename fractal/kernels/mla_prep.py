"""MLA (DeepSeek V2/V3) attention prologue in one launch: RoPE on q_rope and k_rope, then the latent-cache write.

What: per MLA layer, one launch instead of the two that ran back to back,
    rotary_embedding_(positions, q_rope, k_rope[:, None, :], cos_sin_cache, style)     (fractal.kernels.rotary)
    write_mla(kv_cache, latent, kv_norm_weight, eps, k_rope, slot_mapping)            (fractal.kernels.kv_write)
Layouts (q and kv_a are views of the projection GEMM outputs: rows strided, the last dim contiguous):
    q              [T, H, Dn + R]  q[..., Dn:] = q_rope, rotated in place (all H heads); q[..., :Dn] untouched
    kv_a           [T, L + R]      kv_a[:, :L] = latent (before kv_a_layernorm), untouched;
                                   kv_a[:, L:] = k_rope, rotated in place (as the two-step path leaves it)
    positions      int [T]; slot_mapping int [T] (flat slot = block * block_size + offset)
    cos_sin_cache  float32 [max_position, R] = [cos | sin] (rope scaling already in it; rotary_dim == R)
    kv_norm_weight [L]; kv_cache [num_blocks, block_size, L + R], contiguous
    -> kv_cache[slot[t]] = [rms_norm(latent[t]) | rotated k_rope[t]], cast to the cache dtype
    Slots as write_mla takes them: every slot is written, none skipped (no -1 convention), none checked.
    Styles "interleave" (DeepSeek) and "neox".
Rounding (the reference is mla_prep_ref = rotary_ref + write_mla_ref, plain torch):
    rope: float32 products and sums, each rounded to float32 (compiled with enable_fp_fusion=False: x1*c - x2*s is
          not contracted into an FMA), rounded once to the input dtype; k_rope in that dtype then cast to the cache
          dtype. q, kv_a and the cached k_rope are bitwise the reference's.
    norm: float32 x * rsqrt(mean(x^2) + eps) rounded to the input dtype, times the weight in float32, rounded
          again, then cast to the cache dtype (rms_norm_ref / HF). The float32 sum of squares is taken in another
          order than torch's mean, so the variance can differ in its last bit and a normalised value near a
          rounding boundary then rounds the other way: 1 ulp, ~1-4 per million latent values in bf16 (H100,
          T = 4096); bitwise the reference's where the sum is exact. write_mla's kernel differs from torch alike.
    The two launches replaced differ from the reference too: rotary_embedding_'s kernel is compiled with FMA
    contraction, so ~1 in 50,000 rotated values is 1 ulp off the reference (and off this kernel).
Why: a decode step at batch 1 is ~430 launches, each small one ~1.6-2 us; this is one fewer per MLA layer.
One program per token does everything (q heads BLOCK_H at a time, `launch_config`); per-step values (T, the row
strides, which differ at T = 1, positions, slots) are not specialised on: one binary per model shape (another if a
row stride is not a multiple of 16 bytes). No host sync: CUDA-graph capturable. On CPU, without Triton, or for a
layout the kernel does not take (a non-contiguous cache, a strided last dim, ...) the reference runs.
H100, bf16, us per call inside a CUDA graph (20 calls per graph), fused vs rotary_embedding_ + write_mla:
    T        DeepSeek-V2-Lite (H 16)       V3-like (H 128, q from q_b_proj)
    1          1.9     2.7                   2.2     3.4
    64         2.0     3.3                   2.4     3.7
    512        2.3     3.7                   4.6     5.7
    16384     42.8    47.3                 216     218       (q_rope read + written: ~2.6 TB/s at V3)
"""
from __future__ import annotations

import torch

from fractal.errors import FractalError
from fractal.kernels._triton_support import HAS_TRITON, next_pow2, pdl_launch, use_triton
from fractal.kernels.kv_write import write_mla_ref
from fractal.kernels.rotary import rotary_ref

if HAS_TRITON:
    from fractal.kernels._triton_support import pdl_wait, tl, triton
    from fractal.kernels.rotary import _rope_one

    # row strides (they differ at T = 1, and between views), positions and slots are not specialised on
    @triton.jit(do_not_specialize=["stride_qt", "stride_qh", "stride_kvt"],
                do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
    def _mla_prep_kernel(
        pos_ptr, slot_ptr, cs_ptr, q_ptr, kv_ptr, w_ptr, cache_ptr,
        stride_qt, stride_qh, stride_kvt, eps,
        H: tl.constexpr, L: tl.constexpr, DN: tl.constexpr, HALF: tl.constexpr, Q_ALIGN: tl.constexpr,
        KV_ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr,
        NEOX: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        # strides come in units of *_ALIGN elements: rows stay provably 16-byte aligned (vector loads)
        q_row = q_ptr + t * (stride_qt * Q_ALIGN) + DN
        kv_row = kv_ptr + t * (stride_kvt * KV_ALIGN)
        dst = cache_ptr + slot * (L + 2 * HALF)
        # cos / sin of this position, as _rope_kernel loads them
        i = tl.arange(0, BLOCK_R)[None, :]
        c = tl.load(cs_ptr + pos * (2 * HALF) + i, mask=i < HALF, other=0.0)
        s = tl.load(cs_ptr + pos * (2 * HALF) + HALF + i, mask=i < HALF, other=0.0)
        # the latent row and its RMSNorm, as _write_mla_kernel
        cols = tl.arange(0, BLOCK_L)
        lmask = cols < L
        x = tl.load(kv_row + cols, mask=lmask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / L
        y = (x * tl.rsqrt(var + eps)).to(kv_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=lmask, other=0.0).to(tl.float32)
        tl.store(dst + cols, (y * w).to(kv_ptr.dtype.element_ty).to(cache_ptr.dtype.element_ty), mask=lmask)
        # k_rope (one head): _rope_one's arithmetic, the rounded result stored in place and into the cache
        kr = kv_row + L
        if (not NEOX) and (BLOCK_R == HALF):
            r = tl.arange(0, 2 * BLOCK_R)[None, :]
            k = tl.load(kr + r).to(tl.float32)
            k1, k2 = tl.split(tl.reshape(k, [1, BLOCK_R, 2]))
            o = tl.join(k1 * c - k2 * s, k2 * c + k1 * s)
            o = tl.reshape(o, [1, 2 * BLOCK_R]).to(kv_ptr.dtype.element_ty)
            tl.store(kr + r, o)
            tl.store(dst + L + r, o.to(cache_ptr.dtype.element_ty))
        else:
            hmask = i < HALF
            if NEOX:
                o1 = i
                o2 = i + HALF
            else:
                o1 = 2 * i
                o2 = 2 * i + 1
            k1 = tl.load(kr + o1, mask=hmask, other=0.0).to(tl.float32)
            k2 = tl.load(kr + o2, mask=hmask, other=0.0).to(tl.float32)
            n1 = (k1 * c - k2 * s).to(kv_ptr.dtype.element_ty)
            n2 = (k2 * c + k1 * s).to(kv_ptr.dtype.element_ty)
            tl.store(kr + o1, n1, mask=hmask)
            tl.store(kr + o2, n2, mask=hmask)
            tl.store(dst + L + o1, n1.to(cache_ptr.dtype.element_ty), mask=hmask)
            tl.store(dst + L + o2, n2.to(cache_ptr.dtype.element_ty), mask=hmask)
        # q_rope of all heads, BLOCK_H heads at a time, with the rotary kernel's own code
        for h0 in tl.static_range(0, H, BLOCK_H):
            _rope_one(q_row + h0 * (stride_qh * Q_ALIGN), stride_qh * Q_ALIGN, H - h0, c, s, HALF, BLOCK_H,
                      BLOCK_R, NEOX)


def _check(q: torch.Tensor, kv_a: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, style: str,
           kv_norm_weight: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> tuple[int, int]:
    """(L, R) after checking that the shapes fit together; FractalError otherwise."""
    if style not in ("neox", "interleave"):
        raise FractalError(f"rope style {style!r} is not valid; valid: ['neox', 'interleave']")
    if q.dim() != 3 or kv_a.dim() != 2 or kv_norm_weight.dim() != 1 or kv_cache.dim() != 3:
        raise FractalError(f"want q [T, H, Dn + R], kv_a [T, L + R], kv_norm_weight [L] and kv_cache "
                           f"[blocks, block_size, L + R]; got {tuple(q.shape)}, {tuple(kv_a.shape)}, "
                           f"{tuple(kv_norm_weight.shape)}, {tuple(kv_cache.shape)}")
    T = q.shape[0]
    L = kv_norm_weight.shape[0]
    R = kv_a.shape[1] - L
    if (kv_a.shape[0] != T or tuple(positions.shape) != (T,) or tuple(slot_mapping.shape) != (T,) or R <= 0
            or R % 2 or q.shape[2] < R or kv_cache.shape[2] != L + R or cos_sin_cache.shape[-1] != R):
        raise FractalError(f"q {tuple(q.shape)}, kv_a {tuple(kv_a.shape)}, positions {tuple(positions.shape)}, "
                           f"cos_sin_cache {tuple(cos_sin_cache.shape)}, kv_norm_weight {tuple(kv_norm_weight.shape)}, "
                           f"kv_cache {tuple(kv_cache.shape)}, slot_mapping {tuple(slot_mapping.shape)} do not fit: "
                           f"want R = kv_a width - L even, <= q's head_dim, == the cos/sin width and "
                           f"kv_cache width == L + R")
    return L, R


def mla_prep_ref(q: torch.Tensor, kv_a: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 style: str, kv_norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Plain torch, in place like mla_prep_: rotary_ref on q_rope / k_rope (copied back), then write_mla_ref."""
    L, R = _check(q, kv_a, positions, cos_sin_cache, style, kv_norm_weight, kv_cache, slot_mapping)
    q_rope, k_rope = q[..., q.shape[2] - R:], kv_a[:, None, L:]
    q_new, k_new = rotary_ref(positions, q_rope, k_rope, cos_sin_cache, style)
    q_rope.copy_(q_new)
    k_rope.copy_(k_new)
    write_mla_ref(kv_cache, kv_a[:, :L], kv_norm_weight, eps, kv_a[:, L:], slot_mapping)


def launch_config(num_heads: int, rope_dim: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps), the same at every step size: up to 64 rotated q numbers per thread per chunk of heads;
    one warp for DeepSeek-V2-Lite's 16 heads, 4 warps and all heads at once for V3's 128 (H100, see above)."""
    block_r = next_pow2(rope_dim // 2)
    num_warps = min(4, max(1, next_pow2(num_heads) * 2 * block_r // 2048))
    return min(next_pow2(num_heads), max(1, 2048 * num_warps // (2 * block_r))), num_warps


def _align(*strides: int, elem_bytes: int) -> int:
    """The largest power of two <= 16 bytes (in elements) that divides every stride."""
    a = max(1, 16 // elem_bytes)
    while a > 1 and any(st % a for st in strides):
        a //= 2
    return a


def mla_prep_(q: torch.Tensor, kv_a: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
              style: str, kv_norm_weight: torch.Tensor, eps: float, kv_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    """RoPE q_rope (= q[..., -R:]) and k_rope (= kv_a[:, L:]) in place and store [rms_norm(latent) | k_rope] at
    kv_cache[slot]; one Triton launch on CUDA (see the module docstring), the reference elsewhere."""
    L, R = _check(q, kv_a, positions, cos_sin_cache, style, kv_norm_weight, kv_cache, slot_mapping)
    if (not use_triton(q, kv_a, positions, cos_sin_cache, kv_norm_weight, kv_cache, slot_mapping)
            or q.stride(-1) != 1 or kv_a.stride(-1) != 1 or not kv_cache.is_contiguous()
            or not (kv_norm_weight.is_contiguous() and positions.is_contiguous() and slot_mapping.is_contiguous())):
        mla_prep_ref(q, kv_a, positions, cos_sin_cache, style, kv_norm_weight, eps, kv_cache, slot_mapping)
        return
    T, H = q.shape[0], q.shape[1]
    if T == 0:
        return
    cache = cos_sin_cache
    if cache.dtype != torch.float32 or not cache.is_contiguous():
        cache = cache.float().contiguous()
    q_align = _align(q.stride(0), q.stride(1), elem_bytes=q.element_size())
    kv_align = _align(kv_a.stride(0), elem_bytes=kv_a.element_size())
    block_h, num_warps = launch_config(H, R)
    _mla_prep_kernel[(T,)](
        positions, slot_mapping, cache, q, kv_a, kv_norm_weight, kv_cache,
        q.stride(0) // q_align, q.stride(1) // q_align, kv_a.stride(0) // kv_align, float(eps),
        H=H, L=L, DN=q.shape[2] - R, HALF=R // 2, Q_ALIGN=q_align, KV_ALIGN=kv_align, BLOCK_R=next_pow2(R // 2),
        BLOCK_H=block_h, BLOCK_L=next_pow2(L), NEOX=style == "neox", num_warps=num_warps,
        enable_fp_fusion=False,  # products and sums rounded one by one, as in torch: no FMA contraction
        **pdl_launch(),
    )
