"""Router logits kernel (float32 accumulation of 16-bit operands) against the float32 linear.

The kernel tests run on CUDA, or on CPU through Triton's interpreter with TRITON_INTERPRET=1; else they skip.
"""
import pytest
import torch

import fractal.kernels.router_gemm as rg
from fractal.kernels._triton_support import INTERPRET, use_triton
from fractal.kernels.router_gemm import ROUTER_KERNEL_MAX_TOKENS, router_logits, router_logits_ref, uses_fma

_KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
kernels_here = pytest.mark.skipif(_KERNEL_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")


def _nonzero(*shape, dtype=torch.bfloat16, device="cpu", scale=1.0):
    """Random values bounded away from zero (random signs), so that no product is trivially exact."""
    mag = 0.05 + torch.rand(*shape, device=device)
    sign = torch.where(torch.rand(*shape, device=device) < 0.5, -1.0, 1.0)
    return (mag * sign * scale).to(dtype)


def _tol(T, E, H):
    """Relative (to the largest logit) bound: IEEE float32 sums (~1e-7 seen) in the multiply + sum variant and in
    the interpreter; Hopper tensor cores' float32 accumulation (~1e-5 seen at H=7168) in the tl.dot variant."""
    return 1e-6 if uses_fma(T, E, H) or _KERNEL_DEVICE != "cuda" else 3e-5


def _check(y, x, w):
    """y float32 within the tolerance of the exact logits and of the float32 linear."""
    assert y.dtype == torch.float32 and y.shape == (x.shape[0], w.shape[0]) and y.is_contiguous()
    exact = (x.double() @ w.double().T)
    ref32 = router_logits_ref(x, w)
    scale = exact.abs().max().item()
    tol = _tol(x.shape[0], w.shape[0], x.shape[1])
    assert (y.double() - exact).abs().max().item() <= tol * scale
    assert (y - ref32).abs().max().item() <= 2 * tol * scale


def test_reference_is_float32_linear():
    torch.manual_seed(0)
    x, w = _nonzero(5, 256), _nonzero(64, 256, scale=0.02)
    y = router_logits_ref(x, w)
    assert y.dtype == torch.float32
    assert torch.equal(y, torch.nn.functional.linear(x.float(), w.float()))


@pytest.mark.parametrize("T", [1, 5, 300])
def test_cpu_fallback_equals_linear(monkeypatch, T):
    monkeypatch.setattr(rg, "use_triton", lambda *t: False)
    torch.manual_seed(1)
    x, w = _nonzero(T, 512), _nonzero(64, 512, scale=0.02)
    y = router_logits(x, w)
    assert torch.equal(y, torch.nn.functional.linear(x.float(), w.float()))


def test_cpu_without_interpreter_uses_reference():
    x, w = _nonzero(3, 128), _nonzero(16, 128)
    if use_triton(x, w):
        pytest.skip("TRITON_INTERPRET=1: CPU tensors go to the kernel")
    assert torch.equal(router_logits(x, w), torch.nn.functional.linear(x.float(), w.float()))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        router_logits(torch.ones(2, 64), torch.ones(8, 32))


@kernels_here
@pytest.mark.parametrize("H", [2048, 7168])
@pytest.mark.parametrize("E", [64, 160, 256])
@pytest.mark.parametrize("T", [1, 3, 16, 64, 200])
def test_kernel_matches_float32_linear(T, E, H):
    torch.manual_seed(T * 1000 + E + H)
    x = _nonzero(T, H, device=_KERNEL_DEVICE)
    w = _nonzero(E, H, device=_KERNEL_DEVICE, scale=0.02)
    _check(router_logits(x, w), x, w)


@kernels_here
@pytest.mark.parametrize("T", [1, 3, 12, 64])
def test_kernel_strided_rows(T):
    torch.manual_seed(7)
    H, E = 2048, 64
    base = _nonzero(2 * T, H + 96, device=_KERNEL_DEVICE)
    x = base[::2, 32:32 + H]  # row stride 2 * (H + 96), offset start
    assert x.stride() == (2 * (H + 96), 1) and x.storage_offset() == 32
    w = _nonzero(E, H, device=_KERNEL_DEVICE, scale=0.02)
    y = router_logits(x, w)
    _check(y, x, w)
    assert torch.equal(y, router_logits(x.contiguous(), w))  # same kernel, same order


@kernels_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("T", [2, 32])
def test_kernel_other_dtypes(dtype, T):
    torch.manual_seed(3)
    x = _nonzero(T, 1024, dtype=dtype, device=_KERNEL_DEVICE)
    w = _nonzero(96, 1024, dtype=dtype, device=_KERNEL_DEVICE, scale=0.02)
    y = router_logits(x, w)
    if dtype == torch.float16:
        _check(y, x, w)
    else:  # float32 products are rounded: only close to the float32 linear
        torch.testing.assert_close(y, router_logits_ref(x, w), rtol=1e-5, atol=1e-5)


@kernels_here
def test_kernel_odd_sizes_and_determinism():
    torch.manual_seed(5)
    x = _nonzero(37, 1000, device=_KERNEL_DEVICE)  # H not a multiple of the K block, E not of the E block
    w = _nonzero(72, 1000, device=_KERNEL_DEVICE, scale=0.02)
    y = router_logits(x, w)
    _check(y, x, w)
    assert torch.equal(y, router_logits(x, w))
    assert router_logits(x[:0], w).shape == (0, 72)


@kernels_here
@pytest.mark.parametrize("T,E,H", [(1025, 64, 2048), (1100, 256, 1024), (1200, 160, 512)])
def test_kernel_wide_tiles_at_prefill_sizes(T, E, H):
    """T >= DOT_WIDE_MIN_TOKENS: 64 experts per program (E not a multiple of 64 included)."""
    assert T >= rg.DOT_WIDE_MIN_TOKENS and rg._dot_tiles(T, E, H)[1] == min(64, max(16, rg.next_pow2(E)))
    torch.manual_seed(T + E)
    x = _nonzero(T, H, device=_KERNEL_DEVICE)
    w = _nonzero(E, H, device=_KERNEL_DEVICE, scale=0.02)
    _check(router_logits(x, w), x, w)


@kernels_here
def test_large_batch_falls_back_to_linear():
    torch.manual_seed(6)
    T = ROUTER_KERNEL_MAX_TOKENS + 1
    x = _nonzero(T, 256, device=_KERNEL_DEVICE)
    w = _nonzero(64, 256, device=_KERNEL_DEVICE, scale=0.02)
    assert torch.equal(router_logits(x, w), router_logits_ref(x, w))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
def test_fast_router_uses_kernel_on_cuda(T):
    from fractal.layers.gpu_backends import FastRouter, accelerate_model
    from fractal.layers.moe import MoEConfig, Router

    router = Router(MoEConfig(hidden_size=2048, num_experts=64, top_k=6, intermediate_size=64, router_fp32=True))
    torch.manual_seed(T)
    with torch.no_grad():
        router.weight.copy_(_nonzero(64, 2048, scale=0.02, dtype=torch.float32))
    model = torch.nn.Sequential(router).to("cuda", torch.bfloat16)
    accelerate_model(model)
    assert type(router) is FastRouter
    x = _nonzero(T, 2048, device="cuda")
    y = router(x)
    _check(y, x, router.weight)


@kernels_here
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_kernel_rounds_to_16bit_out_dtype(T):
    """out_dtype=bf16 (a 16-bit gate such as Qwen3-MoE's): the float32 sum rounded once, within one bf16 rounding of
    the exact logits (what a bf16 GEMM with float32 accumulation returns)."""
    torch.manual_seed(T + 11)
    x = _nonzero(T, 2048, device=_KERNEL_DEVICE)
    w = _nonzero(128, 2048, device=_KERNEL_DEVICE, scale=0.02)
    y = router_logits(x, w, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and y.shape == (T, 128)
    exact = x.double() @ w.double().T
    scale = exact.abs().max().item()
    # round to nearest on the GPU (<= half a bf16 ulp <= 2^-8 relative); Triton's interpreter truncates (< 1 ulp)
    rel_round = 2.0 ** -8 if _KERNEL_DEVICE == "cuda" else 2.0 ** -7
    bound = exact.abs() * rel_round + _tol(T, 128, 2048) * scale
    assert ((y.double() - exact).abs() <= bound).all()
    assert torch.equal(router_logits_ref(x, w, torch.bfloat16), router_logits_ref(x, w).to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_router_for_16bit_gate():
    """A plain (not float32) router on CUDA is swapped too and returns logits in x's dtype."""
    from fractal.layers.gpu_backends import FastRouter, accelerate_model
    from fractal.layers.moe import MoEConfig, Router

    router = Router(MoEConfig(hidden_size=2048, num_experts=128, top_k=8, intermediate_size=64, router_fp32=False))
    torch.manual_seed(2)
    with torch.no_grad():
        router.weight.copy_(_nonzero(128, 2048, scale=0.02, dtype=torch.float32))
    model = torch.nn.Sequential(router).to("cuda", torch.bfloat16)
    accelerate_model(model)
    assert type(router) is FastRouter and router.weight_fp32 is None
    x = _nonzero(64, 2048, device="cuda")
    y = router(x)
    ref = torch.nn.functional.linear(x, router.weight)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2 ** -7, atol=1e-4)
