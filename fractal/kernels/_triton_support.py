"""Whether the Triton fast paths can run here, decided once without importing Triton on CPU-only machines.

Triton is imported only when CUDA is available, so importing `fractal.kernels.*` on a CPU machine is cheap and
never fails; every public kernel function falls back to its plain-torch reference for CPU tensors.
With TRITON_INTERPRET=1 (and Triton installed) the kernels also run on CPU tensors through Triton's interpreter:
slow, for debugging kernels without a GPU.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

HAS_TRITON = False
triton = None  # type: ignore[assignment]
tl = None  # type: ignore[assignment]

if torch.cuda.is_available() or INTERPRET:
    try:
        import triton  # type: ignore[no-redef]
        import triton.language as tl  # type: ignore[no-redef]

        HAS_TRITON = True
    except Exception:  # pragma: no cover - depends on the machine
        HAS_TRITON = False


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on a CUDA device and Triton is importable."""
    return HAS_TRITON and (INTERPRET or all(t.is_cuda for t in tensors))


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())
