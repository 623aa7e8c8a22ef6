"""How much Programmatic Dependent Launch (PDL) saves per kernel boundary inside a CUDA graph (Hopper).

    python3 tools/pdl_probe.py

Two chains of 200 dependent Triton kernels, each captured in a CUDA graph with and without PDL:
- "tiny": each kernel reads a 2,048-element bf16 vector and writes x + 1 (launch-bound, like a decode step's
  norms, RoPE, routing at batch 1);
- "gemv": each kernel reads a [2048, 2048] bf16 weight (the 8 MB identity) and the previous kernel's output
  vector and writes W @ x (bandwidth-bound, like the batch-1 projections).
With PDL each kernel waits (griddepcontrol.wait) before touching memory, and lets its dependent launch early
(griddepcontrol.launch_dependents). Prints us per kernel and whether the chain's result is right.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fractal.kernels.cuda_graphs import replay_us


@triton.jit
def _tiny(x_ptr, y_ptr, n, BLOCK: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
    tl.store(y_ptr + offs, (x + 1.0).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _gemv(w_ptr, x_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = tl.arange(0, BLOCK_K)
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = tl.load(w_ptr + n[:, None] * K + k0 + kk[None, :]).to(tl.float32)
        x = tl.load(x_ptr + k0 + kk).to(tl.float32)
        acc += w * x[None, :]
    tl.store(y_ptr + n, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty))


def _chain(kind: str, pdl: bool, length: int, bufs, w):
    for i in range(length):
        src, dst = bufs[i % 2], bufs[(i + 1) % 2]
        if kind == "tiny":
            _tiny[(1,)](src, dst, src.numel(), BLOCK=2048, PDL=pdl, launch_pdl=pdl, num_warps=4)
        else:
            N, K = w.shape
            _gemv[(N // 16,)](w, src, dst, N, K, BLOCK_N=16, BLOCK_K=256, PDL=pdl, launch_pdl=pdl, num_warps=4)


def measure(kind: str, pdl: bool, length: int = 200, reps: int = 20) -> tuple[float, bool]:
    dev = "cuda"
    K = 2048
    # identity weight (8 MB): the chain keeps x, so the result checks every kernel ran in order
    w = torch.eye(K, device=dev, dtype=torch.bfloat16) if kind == "gemv" else None
    bufs = [torch.zeros(K, device=dev, dtype=torch.bfloat16) for _ in range(2)]
    x0 = torch.arange(K, device=dev, dtype=torch.float32).remainder(7).to(torch.bfloat16)
    bufs[0].copy_(x0)
    _chain(kind, pdl, length, bufs, w)  # compile
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            _chain(kind, pdl, length, bufs, w)
    torch.cuda.synchronize()
    bufs[0].copy_(x0)
    g.replay()
    torch.cuda.synchronize()
    expect = x0.float() + (length if kind == "tiny" else 0)
    ok = torch.equal(bufs[length % 2].float(), expect.to(torch.bfloat16).float())
    return replay_us(g, reps) / length, ok


def main() -> None:
    print(f"{'chain':<6}{'PDL':>5}{'us/kernel':>11}  result")
    for kind in ("tiny", "gemv"):
        for pdl in (False, True):
            us, ok = measure(kind, pdl)
            print(f"{kind:<6}{str(pdl):>5}{us:>11.2f}  {'right' if ok else 'WRONG'}")


if __name__ == "__main__":
    main()
