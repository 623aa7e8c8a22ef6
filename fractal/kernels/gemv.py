"""Dense linear layers at one token (decode at batch 1) as bandwidth-bound GEMVs, SiLU-and-mul fusable.

What:
    dense_linear(x, weight, bias)   F.linear, with the GEMV below where `fits` (what the fast layers call)
    gemv(x, weight)                 x [T, K], weight [N, K] -> x @ weight^T, [T, N] in x's dtype
    gemv_silu_and_mul(x, gate_up)   gate_up [2I, K] (gate rows 0:I, up rows I:2I) -> silu(x @ gate^T) * (x @ up^T),
                                    [T, I], the SiLU rounded to x's dtype first (as silu_and_mul / torch round it)
Both are the MoE gemv kernels of fractal.kernels.moe_experts in their DENSE mode (one weight, no expert ids): one
program per (token, BLOCK_N output rows) streams its rows of the weight with the whole reduction unrolled, accumulating in
float32. Every token re-reads the weight, so the layers call these only up to GEMV_MAX_TOKENS tokens and cuBLAS above.
Rounding: float32 sums in another order than cuBLAS's, one rounding to the output dtype (gate and up each rounded
before the SiLU, as the two-kernel path rounds its GEMM output).
Why: at batch 1 cuBLAS picks split-K GEMV kernels for these shapes that reach 1.4-2.5 TB/s on the 8-50 MB weights of
DeepSeek-V2-Lite / Qwen3 attention projections and Llama's q/k/v and o_proj, plus a separate split-K reduce and, for
the MLP, a separate SiLU-and-mul kernel; see docs/perf-notes.md round 7 for the measured shapes and configs.
With PDL (Hopper) the first chunk of the weight is loaded before the kernel waits for the previous one: no kernel
writes the weights, only x.
No host sync (CUDA-graph capturable); on CPU or without Triton the torch expressions run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fractal.kernels._triton_support import HAS_TRITON, pdl_launch, use_triton

GEMV_MAX_TOKENS = 1  # above, cuBLAS reads the weight once for all tokens
# (BLOCK_N, BLOCK_K, num_warps). Round 7 (tools/gemv_sweep.py, H100, T=1, 4 weight copies rotated in a CUDA graph,
# us per call ours vs cuBLAS): plain (2, 1024, 2): dsv2lite q+kv_a 7.22 vs 8.63, o_proj 3.35 vs 5.06, qwen3moe qkv
# 9.39 vs 9.93, o_proj 8.11 vs 10.11, llama qkv 19.05 vs 20.82, o_proj 13.93 vs 16.40, down 40.66 vs 44.18 (2.89
# TB/s); SiLU-fused gate/up (4, 1024, 4): llama 76.58 vs 86.39 for cuBLAS + silu_and_mul (3.07 TB/s), dsv2lite's
# dense layer 31.10 vs 36.63. Every shape's best config was within 3 % of these two.
PLAIN_CONFIG = (2, 1024, 2)
GATE_UP_CONFIG = (4, 1024, 4)
MAX_GRID_Y = 65535  # CUDA's limit on the output-tile grid axis: wide outputs (a vocabulary) take wider tiles

if HAS_TRITON:
    from fractal.kernels._triton_support import triton
    from fractal.kernels.moe_experts import _gemv_down_kernel, _gemv_gate_up_kernel

def _fit_grid(n: int, block_n: int) -> int:
    """block_n, doubled until the n output rows take at most MAX_GRID_Y tiles."""
    while triton.cdiv(n, block_n) > MAX_GRID_Y:
        block_n *= 2
    return block_n


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The kernels apply: 2-D 16-bit x of at most GEMV_MAX_TOKENS rows, contiguous weight of x's dtype."""
    return (use_triton(x, weight) and x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_TOKENS
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and weight.is_contiguous() and x.stride(-1) == 1)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the GEMV kernel where it applies (no bias, `fits`)."""
    if bias is None and fits(x, weight):
        return gemv(x, weight)
    return F.linear(x, weight, bias)


def gemv(x: torch.Tensor, weight: torch.Tensor, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x @ weight^T through the GEMV kernel (see module docstring; callers check `fits`)."""
    if not use_triton(x, weight):
        return F.linear(x, weight)
    T, K = x.shape
    N = weight.shape[0]
    bn, bk, nw = config or PLAIN_CONFIG
    bn = _fit_grid(N, bn)
    out = torch.empty(T, N, dtype=x.dtype, device=x.device)
    # DENSE: the ws / ids / n_routed / stride_we arguments are not read
    _gemv_down_kernel[(T, triton.cdiv(N, bn))](
        x, weight, weight, weight, out, N, K, T, x.stride(0), 0, weight.stride(0), out.stride(0),
        I=K, NS=1, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, DENSE=True, **pdl_launch(),
    )
    return out


def gemv_silu_and_mul(x: torch.Tensor, gate_up: torch.Tensor,
                      config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """silu(x @ gate^T) * (x @ up^T) for gate_up = [gate; up] [2I, K] (see module docstring)."""
    if not use_triton(x, gate_up):
        g, u = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.silu(g) * u
    T, K = x.shape
    I = gate_up.shape[0] // 2
    bn, bk, nw = config or GATE_UP_CONFIG
    bn = _fit_grid(I, bn)
    out = torch.empty(T, I, dtype=x.dtype, device=x.device)
    _gemv_gate_up_kernel[(T, triton.cdiv(I, bn))](
        x, gate_up, gate_up, gate_up, out, I, I, T, x.stride(0), 0, gate_up.stride(0), out.stride(0),
        H=K, TOPK=1, NS=1, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, DENSE=True, **pdl_launch(),
    )
    return out
