"""RMSNorm and fused residual-add + RMSNorm: one Triton pass per row instead of 5-7 torch kernels.

Conventions (same rounding as HF's LlamaRMSNorm after a bf16 residual add):
    residual_out = (x + residual) rounded to x.dtype
    out = weight * (residual_out / sqrt(mean(residual_out^2) + eps)).to(x.dtype)
The normalisation runs in float32. x and residual are [..., H] with a contiguous last dim (rows may be strided,
e.g. a slice of a wider projection); weight is [H]. Outputs are new contiguous tensors.
"""
from __future__ import annotations

import torch

from fractal.kernels._triton_support import HAS_TRITON, next_pow2, pdl_launch, use_triton

if HAS_TRITON:
    from fractal.kernels._triton_support import pdl_wait, tl, triton

    @triton.jit
    def _rmsnorm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
        stride_x, stride_r, stride_o, stride_ro,
        H, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
            s = (x + r).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * stride_ro + cols, s, mask=mask)
            x = s.to(tl.float32)
        var = tl.sum(x * x, axis=0) / H
        y = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Plain-torch RMSNorm (HF order of operations)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h.to(x.dtype).float()).to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch (rms_norm(x + residual), x + residual)."""
    s = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(s, weight, eps), s


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 2:
        return t
    return t.reshape(-1, t.shape[-1])


def _launch(x, residual, weight, eps):
    shape = x.shape
    H = shape[-1]
    x2 = _as_rows(x)
    rows = x2.shape[0]
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, H)
    if residual is not None:
        r2 = _as_rows(residual)
        res_out = torch.empty(shape, dtype=x.dtype, device=x.device)
        ro2 = res_out.view(-1, H)
    else:
        r2, res_out, ro2 = x2, None, out2
    if rows == 0:
        return out, res_out
    block = next_pow2(H)
    warps = 1 if block <= 512 else (4 if block <= 4096 else 8)
    _rmsnorm_kernel[(rows,)](
        x2, r2, weight, out2, ro2,
        x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0),
        H, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=warps, **pdl_launch(),
    )
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; Triton on CUDA, the reference elsewhere."""
    if not use_triton(x):
        return rms_norm_ref(x, weight, eps)
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; Triton on CUDA, the reference elsewhere."""
    if not use_triton(x, residual):
        return fused_add_rms_norm_ref(x, residual, weight, eps)
    return _launch(x, residual, weight, eps)
