"""RMSNorm, computed in float32 and cast back (same order of operations as HF's LlamaRMSNorm).

The module is also the seam for the fused residual add: `norm(x, residual)` returns
(norm(x + residual), x + residual), the sum rounded once to x's dtype (as HF's `residual + hidden_states`).
Kernel-backed subclasses (fractal/layers/gpu_backends.py) do both in one pass.
"""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * (x / sqrt(mean(x^2) + eps)); the normalisation runs in float32, the scale in x's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or with a residual (norm(x + residual), x + residual)."""
        if residual is None:
            return self.normalize(x)
        s = x + residual
        return self.normalize(s), s

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
