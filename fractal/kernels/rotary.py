"""RoPE applied in place to q and k at given positions, from a precomputed cos/sin cache.

cos_sin_cache: float32 [max_position, rotary_dim] = [cos | sin], each half [rotary_dim // 2], already multiplied
by the RoPE type's attention scaling (build it with `build_cos_sin_cache`).
q: [T, Hq, head_dim], k: [T, Hk, head_dim] (k may be None); the first `rotary_dim` dims of each head rotate,
the rest are left as they are. Rows and heads may be strided (views of wider tensors); the last dim must be
contiguous. Styles (same names as fractal.layers.rotary):
    "neox":       x = [x1 | x2] -> [x1*cos - x2*sin | x2*cos + x1*sin]          (Llama, Qwen3)
    "interleave": pairs (x[2i], x[2i+1]) -> (x0*cos - x1*sin, x1*cos + x0*sin)   (DeepSeek V2/V3)
Arithmetic in float32, rounded once to q's dtype.
"""
from __future__ import annotations

import torch

from fractal.errors import FractalError
from fractal.kernels._triton_support import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    from fractal.kernels._triton_support import tl, triton

    @triton.jit
    def _rope_one(x_ptr, stride_h, n_heads, c, s, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_R: tl.constexpr, NEOX: tl.constexpr):
        h = tl.arange(0, BLOCK_H)[:, None]
        if (not NEOX) and (BLOCK_R == HALF):
            # interleaved pairs: one contiguous load of the rotated dims, pairs split in registers
            r = tl.arange(0, 2 * BLOCK_R)[None, :]
            mask = (h < n_heads) & (r < 2 * HALF)
            p = x_ptr + h * stride_h + r
            x = tl.load(p, mask=mask, other=0.0).to(tl.float32)
            x1, x2 = tl.split(tl.reshape(x, [BLOCK_H, BLOCK_R, 2]))
            o = tl.join(x1 * c - x2 * s, x2 * c + x1 * s)
            tl.store(p, tl.reshape(o, [BLOCK_H, 2 * BLOCK_R]).to(x_ptr.dtype.element_ty), mask=mask)
        else:
            i = tl.arange(0, BLOCK_R)[None, :]
            mask = (h < n_heads) & (i < HALF)
            if NEOX:
                p1 = x_ptr + h * stride_h + i
                p2 = p1 + HALF
            else:
                p1 = x_ptr + h * stride_h + 2 * i
                p2 = p1 + 1
            x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
            tl.store(p1, (x1 * c - x2 * s).to(x_ptr.dtype.element_ty), mask=mask)
            tl.store(p2, (x2 * c + x1 * s).to(x_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        pos_ptr, cache_ptr, q_ptr, k_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
        HQ, HK,
        HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
        NEOX: tl.constexpr, HAS_K: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        i = tl.arange(0, BLOCK_R)[None, :]
        c = tl.load(cache_ptr + pos * stride_cache + i, mask=i < HALF, other=0.0)
        s = tl.load(cache_ptr + pos * stride_cache + HALF + i, mask=i < HALF, other=0.0)
        _rope_one(q_ptr + t * stride_qt, stride_qh, HQ, c, s, HALF, BLOCK_HQ, BLOCK_R, NEOX)
        if HAS_K:
            _rope_one(k_ptr + t * stride_kt, stride_kh, HK, c, s, HALF, BLOCK_HK, BLOCK_R, NEOX)


def build_cos_sin_cache(inv_freq: torch.Tensor, max_position: int, attention_scaling: float = 1.0) -> torch.Tensor:
    """float32 [max_position, 2 * len(inv_freq)] = [cos | sin] * attention_scaling (HF's float32 formulas)."""
    t = torch.arange(max_position, dtype=torch.float32, device=inv_freq.device)
    freqs = t[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1).contiguous()


def _check(q: torch.Tensor, cos_sin_cache: torch.Tensor, style: str) -> int:
    if style not in ("neox", "interleave"):
        raise FractalError(f"rope style {style!r} is not valid; valid: ['neox', 'interleave']")
    rot = cos_sin_cache.shape[-1]
    if rot % 2 or rot > q.shape[-1]:
        raise FractalError(f"cos_sin_cache width {rot} must be even and <= head_dim {q.shape[-1]}")
    return rot


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    rot = 2 * cos.shape[-1]
    xr = x[..., :rot].float()
    if style == "neox":
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


def rotary_ref(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None, cos_sin_cache: torch.Tensor, style: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Plain-torch RoPE; returns new (q, k)."""
    rot = _check(q, cos_sin_cache, style)
    cs = cos_sin_cache.index_select(0, positions.long())
    cos, sin = cs[:, None, : rot // 2], cs[:, None, rot // 2:]
    return _rotate_ref(q, cos, sin, style), (None if k is None else _rotate_ref(k, cos, sin, style))


def rotary_embedding_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None, cos_sin_cache: torch.Tensor, style: str
) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place at positions int [T]."""
    rot = _check(q, cos_sin_cache, style)
    tensors = (q, positions, cos_sin_cache) + ((k,) if k is not None else ())
    if not use_triton(*tensors) or q.stride(-1) != 1 or (k is not None and k.stride(-1) != 1):
        q_new, k_new = rotary_ref(positions, q, k, cos_sin_cache, style)
        q.copy_(q_new)
        if k is not None:
            k.copy_(k_new)
        return
    T = q.shape[0]
    if T == 0:
        return
    cache = cos_sin_cache if cos_sin_cache.dtype == torch.float32 else cos_sin_cache.float()
    kk = k if k is not None else q
    half = rot // 2
    _rope_kernel[(T,)](
        positions, cache, q, kk,
        q.stride(0), q.stride(1), kk.stride(0), kk.stride(1), cache.stride(0),
        q.shape[1], kk.shape[1],
        HALF=half, BLOCK_R=next_pow2(half), BLOCK_HQ=next_pow2(q.shape[1]), BLOCK_HK=next_pow2(kk.shape[1]),
        NEOX=style == "neox", HAS_K=k is not None, num_warps=4,
    )
