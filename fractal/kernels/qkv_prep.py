"""Everything between the fused qkv GEMM and attention of a GQA layer (Llama, Qwen3) in one Triton launch.

What: per token, on the qkv projection's output, in place,
    1. optional per-head RMSNorm of q and of k over head_dim (Qwen3's q_norm / k_norm, weights [D] each),
    2. RoPE on q and k at `positions` from the float32 cos/sin cache (styles "neox" and "interleave";
       the first rotary_dim dims of each head rotate, the rest stay as they are or as the norm left them),
    3. q and k written back into qkv (the caller keeps using the views), k and v stored into the paged KV cache
       at `slot_mapping`.
Layouts:
    qkv           [T, (Hq + 2 * Hkv) * D]  rows may have any stride, the last dim contiguous;
                  q = qkv[:, :Hq*D] viewed [T, Hq, D], k = the next Hkv*D, v = the last Hkv*D
    positions     int [T]; cos_sin_cache float32 [max_position, rotary_dim] = [cos | sin] (rotary.build_cos_sin_cache)
    kv_cache      [2, num_blocks, block_size, Hkv, D] contiguous; slot_mapping int [T], slot = block * block_size
                  + offset (kv_write.write_kv's layout). Like write_kv there is no "skip" slot: every slot must be
                  in range (write_kv's kernel and its index_copy_ reference neither skip nor check negative slots).
Rounding (the same as the three-step path qkv_prep_ref: rmsnorm.rms_norm_ref, rotary.rotary_ref,
kv_write.write_kv_ref):
    norm: x float32 * rsqrt(mean(x^2) + eps) rounded to the dtype, times the weight in float32, rounded again
          (fractal.layers.norm.RMSNorm / HF); the rope input is that rounded value;
    rope: float32 products and sums, each rounded to float32 (the kernel is compiled with enable_fp_fusion=False,
          so x1*cos - x2*sin is not contracted into an FMA: the result is bitwise rotary_ref's), rounded once to
          the dtype;
    cache: k (after norm and rope, in the dtype) and v cast to the cache dtype.
    Without the norm the result is bitwise the reference's. With it, the float32 sum of squares is summed in a
    different order than torch's mean, so the variance (and the rsqrt) can differ in its last float32 bit; a
    normalised value lying near a rounding boundary of the dtype then rounds the other way (1 ulp of the dtype,
    a small fraction of the elements, rarer for bf16 than fp16 and frequent for float32). fractal's own rms_norm
    kernel differs from torch in the same way.
Why: a Qwen3 layer otherwise runs q_norm and k_norm (2 launches plus 2 copies of the strided views into new
tensors), rotary_embedding_ and write_kv: 5-6 launches and 3 passes over q/k, where one pass suffices; Llama
(no norm) goes from 2 launches to 1.
Grid: (T, ceil(Hq / Q_HEADS_PER_PROGRAM) + 1): the programs of a token share its cos/sin row; the last one of each
token does k (norm, rope, in place, cache) and v (cache). 8 q heads per program and 4 warps at every step size:
within 0.1 us (small steps) / 1% (T=8192) of the best of {4, 8, 16, 32} heads x {1, 2, 4, 8} warps measured
(H100, bf16, per call inside a CUDA graph; the Llama column was taken with 32 q heads per program from T=64 on):
    T      Qwen3: fused vs rms_norm x2 + rotary_embedding_ + write_kv    Llama-8B: fused vs rotary + write_kv
    1             1.7 us     5.0 us                                              1.6 us    3.0 us
    64            1.9 us    11.6 us                                              2.0 us    3.5 us
    256           2.8 us    17.2 us                                              2.6 us    4.2 us
    8192         67   us   345   us   (~2.6 TB/s moved)                         82   us   87   us
Per-step values (T, positions, slots, the row stride) are not specialised on: one binary per model shape (two if
a row stride is not a multiple of 8 elements), CUDA-graph capturable (no host sync). On CPU or without Triton the
reference runs.
"""
from __future__ import annotations

import torch

from fractal.errors import FractalError
from fractal.kernels._triton_support import HAS_TRITON, next_pow2, pdl_launch, use_triton
from fractal.kernels.kv_write import write_kv_ref
from fractal.kernels.rmsnorm import rms_norm_ref
from fractal.kernels.rotary import rotary_ref

Q_HEADS_PER_PROGRAM = 8  # Llama/Qwen3 (32 q heads): 4 q programs + 1 k/v program per token
NUM_WARPS = 4

if HAS_TRITON:
    from fractal.kernels._triton_support import pdl_wait, tl, triton

    @triton.jit
    def _norm_rope_heads(row, h, hmask, c, s, w_ptr, eps, dst, D: tl.constexpr, HALF: tl.constexpr,
                         ROT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr, NEOX: tl.constexpr,
                         HAS_NORM: tl.constexpr, TO_CACHE: tl.constexpr):
        """Heads h [BLOCK_H, 1] of one token starting at `row` (head stride D): norm, rope, store in place (and
        into the cache row `dst` when TO_CACHE). Each element is loaded and stored by the same thread: no race."""
        i = tl.arange(0, BLOCK_R)[None, :]
        m = hmask & (i < HALF)
        if NEOX:
            o1 = h * D + i
            o2 = o1 + HALF
        else:
            o1 = h * D + 2 * i
            o2 = o1 + 1
        x1 = tl.load(row + o1, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(row + o2, mask=m, other=0.0).to(tl.float32)
        dt = row.dtype.element_ty
        if ROT < D:
            j = ROT + tl.arange(0, BLOCK_T)[None, :]
            mt = hmask & (j < D)
            ot = h * D + j
            xt = tl.load(row + ot, mask=mt, other=0.0).to(tl.float32)
        if HAS_NORM:
            ss = tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)
            if ROT < D:
                ss += tl.sum(xt * xt, axis=1)
            r = tl.rsqrt(ss / D + eps)[:, None]
            if NEOX:
                w1 = tl.load(w_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)
                w2 = tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
            else:
                w1 = tl.load(w_ptr + 2 * i, mask=i < HALF, other=0.0).to(tl.float32)
                w2 = tl.load(w_ptr + 2 * i + 1, mask=i < HALF, other=0.0).to(tl.float32)
            x1 = (w1 * (x1 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            x2 = (w2 * (x2 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
            if ROT < D:
                wt = tl.load(w_ptr + j, mask=j < D, other=0.0).to(tl.float32)
                xt = (wt * (xt * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
                tl.store(row + ot, xt.to(dt), mask=mt)
        y1 = (x1 * c - x2 * s).to(dt)
        y2 = (x2 * c + x1 * s).to(dt)
        tl.store(row + o1, y1, mask=m)
        tl.store(row + o2, y2, mask=m)
        if TO_CACHE:
            cdt = dst.dtype.element_ty
            tl.store(dst + o1, y1.to(cdt), mask=m)
            tl.store(dst + o2, y2.to(cdt), mask=m)
            if ROT < D:
                tl.store(dst + ot, xt.to(dt).to(cdt), mask=mt)

    # the row stride, positions and slots change per step (or per view): not specialised on
    @triton.jit(do_not_specialize=["stride_t"], do_not_specialize_on_alignment=["pos_ptr", "slot_ptr"])
    def _qkv_prep_kernel(
        qkv_ptr, pos_ptr, slot_ptr, cs_ptr, qw_ptr, kw_ptr, cache_ptr,
        stride_t, stride_kv, eps,
        HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr,
        ROW_ALIGN: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, NEOX: tl.constexpr, Q_NORM: tl.constexpr,
        K_NORM: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        # stride_t is in units of ROW_ALIGN elements: rows stay provably 16-byte aligned without specialising
        row = qkv_ptr + t * (stride_t * ROW_ALIGN)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        i = tl.arange(0, BLOCK_R)[None, :]
        c = tl.load(cs_ptr + pos * ROT + i, mask=i < HALF, other=0.0)
        s = tl.load(cs_ptr + pos * ROT + HALF + i, mask=i < HALF, other=0.0)
        NQB: tl.constexpr = (HQ + BLOCK_HQ - 1) // BLOCK_HQ
        # (the two branches name their head blocks differently: a name bound in both must keep one shape)
        if g < NQB:
            hq = g * BLOCK_HQ + tl.arange(0, BLOCK_HQ)[:, None]
            _norm_rope_heads(row, hq, hq < HQ, c, s, qw_ptr, eps, cache_ptr, D, HALF, ROT, BLOCK_R, BLOCK_T,
                             NEOX, Q_NORM, False)
        else:
            slot = tl.load(slot_ptr + t).to(tl.int64)
            dst = cache_ptr + slot * (HKV * D)
            hk = tl.arange(0, BLOCK_HKV)[:, None]
            _norm_rope_heads(row + HQ * D, hk, hk < HKV, c, s, kw_ptr, eps, dst, D, HALF, ROT, BLOCK_R, BLOCK_T,
                             NEOX, K_NORM, True)
            d = tl.arange(0, BLOCK_D)[None, :]
            vm = (hk < HKV) & (d < D)
            v = tl.load(row + (HQ + HKV) * D + hk * D + d, mask=vm)
            tl.store(dst + stride_kv + hk * D + d, v.to(cache_ptr.dtype.element_ty), mask=vm)


def _split(qkv, num_heads, num_kv_heads, head_dim):
    T = qkv.shape[0]
    nq, nk = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :nq].view(T, num_heads, head_dim)
    k = qkv[:, nq:nq + nk].view(T, num_kv_heads, head_dim)
    v = qkv[:, nq + nk:].view(T, num_kv_heads, head_dim)
    return q, k, v


def _check(qkv, positions, cos_sin_cache, style, rotary_dim, num_heads, num_kv_heads, head_dim, kv_cache,
           slot_mapping, q_norm_weight, k_norm_weight):
    if style not in ("neox", "interleave"):
        raise FractalError(f"rope style {style!r} is not valid; valid: ['neox', 'interleave']")
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim or cos_sin_cache.shape[-1] != rotary_dim:
        raise FractalError(f"rotary_dim {rotary_dim} must be even, <= head_dim {head_dim} and the width of "
                           f"cos_sin_cache {tuple(cos_sin_cache.shape)}")
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(-1) != 1:
        raise FractalError(f"qkv {tuple(qkv.shape)} (strides {qkv.stride()}) must be [T, {width}] with a "
                           f"contiguous last dim")
    T = qkv.shape[0]
    if positions.shape != (T,) or slot_mapping.shape != (T,):
        raise FractalError(f"positions {tuple(positions.shape)} and slot_mapping {tuple(slot_mapping.shape)} "
                           f"must be [{T}]")
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3:] != (num_kv_heads, head_dim):
        raise FractalError(f"kv_cache {tuple(kv_cache.shape)} must be [2, blocks, block_size, {num_kv_heads}, "
                           f"{head_dim}]")
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w is not None and w.shape != (head_dim,):
            raise FractalError(f"{name} {tuple(w.shape)} must be [{head_dim}]")


def qkv_prep_ref(qkv, positions, cos_sin_cache, style, rotary_dim, num_heads, num_kv_heads, head_dim, kv_cache,
                 slot_mapping, q_norm_weight=None, k_norm_weight=None, eps=1e-6):
    """The three-step path in plain torch (rms_norm_ref, rotary_ref, write_kv_ref), in place on qkv; returns the
    views (q, k, v) [T, H, D]."""
    _check(qkv, positions, cos_sin_cache, style, rotary_dim, num_heads, num_kv_heads, head_dim, kv_cache,
           slot_mapping, q_norm_weight, k_norm_weight)
    q, k, v = _split(qkv, num_heads, num_kv_heads, head_dim)
    qn = q if q_norm_weight is None else rms_norm_ref(q, q_norm_weight, eps)
    kn = k if k_norm_weight is None else rms_norm_ref(k, k_norm_weight, eps)
    q_new, k_new = rotary_ref(positions, qn, kn, cos_sin_cache, style)
    q.copy_(q_new)
    k.copy_(k_new)
    write_kv_ref(kv_cache, k, v, slot_mapping)
    return q, k, v


def launch_config(num_tokens: int, num_heads: int) -> tuple[int, int]:
    """(q heads per program (a power of two), num_warps); the same for every step size (one binary per shape)."""
    return min(next_pow2(num_heads), Q_HEADS_PER_PROGRAM), NUM_WARPS


def qkv_prep_(qkv, positions, cos_sin_cache, style, rotary_dim, num_heads, num_kv_heads, head_dim, kv_cache,
              slot_mapping, q_norm_weight=None, k_norm_weight=None, eps=1e-6):
    """q/k norm (optional) + RoPE in place on qkv, k/v into the paged cache (see the module docstring); returns
    the views (q, k, v) [T, H, D]. One Triton launch on CUDA, the reference elsewhere."""
    args = (qkv, positions, cos_sin_cache, style, rotary_dim, num_heads, num_kv_heads, head_dim, kv_cache,
            slot_mapping, q_norm_weight, k_norm_weight)
    weights = tuple(w for w in (q_norm_weight, k_norm_weight) if w is not None)
    if not use_triton(qkv, positions, cos_sin_cache, kv_cache, slot_mapping, *weights) or not kv_cache.is_contiguous():
        return qkv_prep_ref(*args, eps)
    _check(*args)
    q, k, v = _split(qkv, num_heads, num_kv_heads, head_dim)
    T = qkv.shape[0]
    if T == 0:
        return q, k, v
    cache = cos_sin_cache
    if cache.dtype != torch.float32 or not cache.is_contiguous():
        cache = cache.float().contiguous()
    row_align = 8 if qkv.stride(0) % 8 == 0 else 1
    half = rotary_dim // 2
    per, warps = launch_config(T, num_heads)
    grid = (T, -(-num_heads // per) + 1)
    _qkv_prep_kernel[grid](
        qkv, positions, slot_mapping, cache,
        q_norm_weight if q_norm_weight is not None else qkv,
        k_norm_weight if k_norm_weight is not None else qkv,
        kv_cache, qkv.stride(0) // row_align, kv_cache.stride(0), float(eps),
        HQ=num_heads, HKV=num_kv_heads, D=head_dim, HALF=half, ROT=rotary_dim, ROW_ALIGN=row_align,
        BLOCK_HQ=per, BLOCK_HKV=next_pow2(num_kv_heads), BLOCK_R=next_pow2(half),
        BLOCK_T=next_pow2(max(head_dim - rotary_dim, 1)), BLOCK_D=next_pow2(head_dim),
        NEOX=style == "neox", Q_NORM=q_norm_weight is not None, K_NORM=k_norm_weight is not None,
        num_warps=warps, enable_fp_fusion=False, **pdl_launch(),
    )
    return q, k, v
