"""Writes of the new tokens into the paged KV cache, one launch each (instead of cat + index_copy / two copies).

Layouts (flat slot = block * block_size + offset, as AttentionMetadata.slot_mapping):
    GQA: kv_cache [2, num_blocks, block_size, Hkv, D]; key/value [T, Hkv, D] (rows/heads may be strided,
         e.g. views of the fused qkv output; the last dim contiguous) -> kv_cache[0/1] at slots[t].
    MLA: kv_cache [num_blocks, block_size, L + R]; latent [T, L] *before* its RMSNorm (kv_a_layernorm),
         k_rope [T, R] already rotated -> kv_cache[slot] = [rms_norm(latent) | k_rope].
         The norm rounds as fractal.kernels.rmsnorm / HF: float32 normalisation, rounded to the input dtype,
         times the weight, rounded again; the cache gets exactly what the torch modules would store.
Values are cast to the cache dtype on store. The references are plain torch (index_copy_).
"""
from __future__ import annotations

import torch

from fractal.errors import FractalError
from fractal.kernels._triton_support import HAS_TRITON, next_pow2, use_triton
from fractal.kernels.rmsnorm import rms_norm_ref

if HAS_TRITON:
    from fractal.kernels._triton_support import tl, triton

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, cache_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                         stride_ckv, stride_cslot, stride_ch, HKV, D,
                         BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < HKV) & (d < D)
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        dst = cache_ptr + slot * stride_cslot + h * stride_ch + d
        tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_ckv, v.to(cache_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _write_mla_kernel(lat_ptr, kr_ptr, w_ptr, cache_ptr, slot_ptr, stride_lt, stride_kt, stride_cslot,
                          L, R, eps, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        cols = tl.arange(0, BLOCK_L)
        lmask = cols < L
        x = tl.load(lat_ptr + t * stride_lt + cols, mask=lmask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / L
        y = (x * tl.rsqrt(var + eps)).to(lat_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=lmask, other=0.0).to(tl.float32)
        dst = cache_ptr + slot * stride_cslot
        tl.store(dst + cols, (y * w).to(lat_ptr.dtype.element_ty).to(cache_ptr.dtype.element_ty), mask=lmask)
        r = tl.arange(0, BLOCK_R)
        kr = tl.load(kr_ptr + t * stride_kt + r, mask=r < R)
        tl.store(dst + L + r, kr.to(cache_ptr.dtype.element_ty), mask=r < R)


def write_kv_ref(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    flat = kv_cache.flatten(1, 2)  # [2, num_slots, Hkv, D] view
    flat[0].index_copy_(0, slots, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slots, value.to(kv_cache.dtype))


def write_mla_ref(kv_cache: torch.Tensor, latent: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                  k_rope: torch.Tensor, slots: torch.Tensor) -> None:
    normed = rms_norm_ref(latent, norm_weight, eps)
    kv_cache.flatten(0, 1).index_copy_(0, slots, torch.cat((normed, k_rope.to(normed.dtype)), dim=-1).to(kv_cache.dtype))


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
    """GQA cache write (see the module docstring); one Triton launch on CUDA, the reference elsewhere."""
    if kv_cache.dim() != 5 or key.shape != value.shape or key.shape[1:] != kv_cache.shape[3:]:
        raise FractalError(f"key {tuple(key.shape)} / value {tuple(value.shape)} do not fit kv_cache "
                           f"{tuple(kv_cache.shape)}: want [T, Hkv, D] and [2, blocks, block_size, Hkv, D]")
    if (not use_triton(kv_cache, key, value, slots) or key.stride(-1) != 1 or value.stride(-1) != 1
            or not kv_cache.is_contiguous()):
        write_kv_ref(kv_cache, key, value, slots)
        return
    T, hkv, d = key.shape
    if T == 0:
        return
    _write_kv_kernel[(T,)](
        key, value, kv_cache, slots, key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3), hkv, d,
        BLOCK_H=next_pow2(hkv), BLOCK_D=next_pow2(d), num_warps=1 if hkv * d <= 1024 else 4,
    )


def write_mla(kv_cache: torch.Tensor, latent: torch.Tensor, norm_weight: torch.Tensor, eps: float,
              k_rope: torch.Tensor, slots: torch.Tensor) -> None:
    """MLA cache write with the latent's RMSNorm fused in (see the module docstring)."""
    L, R = latent.shape[-1], k_rope.shape[-1]
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != L + R or norm_weight.shape != (L,):
        raise FractalError(f"latent {tuple(latent.shape)}, k_rope {tuple(k_rope.shape)} and norm weight "
                           f"{tuple(norm_weight.shape)} do not fit kv_cache {tuple(kv_cache.shape)}")
    if (not use_triton(kv_cache, latent, k_rope, slots) or latent.stride(-1) != 1 or k_rope.stride(-1) != 1
            or not kv_cache.is_contiguous()):
        write_mla_ref(kv_cache, latent, norm_weight, eps, k_rope, slots)
        return
    T = latent.shape[0]
    if T == 0:
        return
    _write_mla_kernel[(T,)](
        latent, k_rope, norm_weight, kv_cache, slots, latent.stride(0), k_rope.stride(0), kv_cache.stride(1),
        L, R, eps, BLOCK_L=next_pow2(L), BLOCK_R=next_pow2(R), num_warps=1 if L <= 512 else 4,
    )
