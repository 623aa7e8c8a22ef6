"""fractal.kernels.gemv: the batch-1 dense GEMV and its SiLU-fused gate/up variant against torch."""
import pytest
import torch
import torch.nn.functional as F

from fractal.kernels import gemv as gemv_mod
from fractal.kernels._triton_support import INTERPRET
from fractal.kernels.gemv import dense_linear, fits, gemv, gemv_silu_and_mul

_DEV = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
kernels_here = pytest.mark.skipif(_DEV is None, reason="needs CUDA or TRITON_INTERPRET=1")


@kernels_here
@pytest.mark.parametrize("T,N,K", [(1, 72, 200), (2, 40, 1100), (1, 24, 64), (3, 130, 2048)])
def test_gemv_matches_linear(T, N, K):
    torch.manual_seed(T * N + K)
    x, w = torch.randn(T, K, device=_DEV), torch.randn(N, K, device=_DEV) / K ** 0.5
    torch.testing.assert_close(gemv(x, w), x @ w.t(), rtol=1e-4, atol=1e-4)


@kernels_here
@pytest.mark.parametrize("T,I,K", [(1, 36, 200), (2, 20, 1100), (1, 64, 2048)])
def test_gemv_silu_and_mul_matches_torch(T, I, K):
    torch.manual_seed(T * I + K)
    x, w = torch.randn(T, K, device=_DEV), torch.randn(2 * I, K, device=_DEV) / K ** 0.5
    g, u = (x @ w.t()).chunk(2, dim=-1)
    torch.testing.assert_close(gemv_silu_and_mul(x, w), F.silu(g) * u, rtol=1e-4, atol=1e-4)


@kernels_here
def test_wide_output_takes_wider_tiles(monkeypatch):
    """More output tiles than the grid axis takes: the tile widens instead of failing to launch."""
    monkeypatch.setattr(gemv_mod, "MAX_GRID_Y", 8)
    torch.manual_seed(0)
    x, w = torch.randn(1, 96, device=_DEV), torch.randn(100, 96, device=_DEV)
    torch.testing.assert_close(gemv(x, w), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_dense_linear_falls_back_where_the_kernel_does_not_apply():
    """Bias, several tokens, float32 or a strided weight: plain F.linear (same numbers)."""
    x, w, b = torch.randn(1, 16), torch.randn(8, 16), torch.randn(8)
    assert not fits(x, w)  # float32 (and on CPU without the interpreter: not CUDA)
    torch.testing.assert_close(dense_linear(x, w, b), F.linear(x, w, b))
    xb = torch.randn(4, 16, dtype=torch.bfloat16)
    assert not fits(xb, w.bfloat16())  # 4 tokens > GEMV_MAX_TOKENS
    assert not fits(xb[:1], w.bfloat16().t().contiguous().t())  # strided weight


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N,K,silu", [(3648, 2048, False), (4096, 14336, False), (2 * 1408, 2048, True),
                                      (151936, 2048, False)])
def test_gemv_bf16_real_shapes_gpu(N, K, silu):
    torch.manual_seed(N)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(N, K, device="cuda") / K ** 0.5).to(torch.bfloat16)
    assert fits(x, w)
    if silu:
        g, u = F.linear(x, w).chunk(2, dim=-1)
        ref, out = F.silu(g) * u, gemv_silu_and_mul(x, w)
    else:
        ref, out = F.linear(x, w), dense_linear(x, w)
    assert ((out.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-2
