"""RoPE in place: the reference against an element loop (CPU), the Triton kernel against the reference (GPU)."""
import math

import pytest
import torch

from fractal.kernels.rotary import build_cos_sin_cache, rotary_embedding_, rotary_ref


def _naive(x, pos, inv_freq, style):
    out = x.clone().double()
    half = len(inv_freq)
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            for i in range(half):
                ang = pos[t] * inv_freq[i]
                c, s = math.cos(ang), math.sin(ang)
                a, b = (i, i + half) if style == "neox" else (2 * i, 2 * i + 1)
                x0, x1 = float(x[t, h, a]), float(x[t, h, b])
                out[t, h, a] = x0 * c - x1 * s
                out[t, h, b] = x1 * c + x0 * s
    return out


@pytest.mark.parametrize("style", ["neox", "interleave"])
def test_rotary_reference_matches_loop(style):
    torch.manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    cache = build_cos_sin_cache(inv_freq, 64)
    q = torch.randn(3, 2, 12)  # head_dim 12, rotary_dim 8: the last 4 dims stay
    k = torch.randn(3, 1, 12)
    pos = torch.tensor([0, 5, 63])
    q2, k2 = rotary_ref(pos, q, k, cache, style)
    torch.testing.assert_close(q2.double(), _naive(q, pos.tolist(), inv_freq.tolist(), style), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k2.double(), _naive(k, pos.tolist(), inv_freq.tolist(), style), rtol=1e-5, atol=1e-5)
    q3, k3 = q.clone(), k.clone()
    rotary_embedding_(pos, q3, k3, cache, style)  # CPU path: in place through the reference
    torch.testing.assert_close(q3, q2, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("style", ["neox", "interleave"])
@pytest.mark.parametrize("tokens,hq,hk,head_dim,rot", [(1, 32, 8, 128, 128), (77, 32, 4, 128, 128),
                                                        (300, 16, 1, 64, 64), (9, 5, 3, 96, 64)])
def test_rotary_gpu(style, tokens, hq, hk, head_dim, rot):
    torch.manual_seed(tokens)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2, device="cuda").float() / rot))
    cache = build_cos_sin_cache(inv_freq, 8192, attention_scaling=1.1)
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    q = torch.randn(tokens, hq, head_dim, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(tokens, hk, head_dim, dtype=torch.bfloat16, device="cuda")
    q_ref, k_ref = rotary_ref(pos, q, k, cache, style)
    rotary_embedding_(pos, q, k, cache, style)
    torch.testing.assert_close(q, q_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(k, k_ref, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_rotary_strided_views_gpu():
    """DeepSeek: q_pe is q[..., 128:192] of a [T, H, 192] tensor; k_pe a [T, 1, 64] slice of a [T, 576] row."""
    torch.manual_seed(3)
    T = 40
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2, device="cuda").float() / 64))
    cache = build_cos_sin_cache(inv_freq, 4096)
    pos = torch.randint(0, 4096, (T,), device="cuda")
    q_full = torch.randn(T, 16, 192, dtype=torch.bfloat16, device="cuda")
    kv_full = torch.randn(T, 576, dtype=torch.bfloat16, device="cuda")
    q_pe, k_pe = q_full[..., 128:], kv_full[:, None, 512:]
    q_ref, k_ref = rotary_ref(pos, q_pe, k_pe, cache, "interleave")
    nope_before = q_full[..., :128].clone()
    rotary_embedding_(pos, q_pe, k_pe, cache, "interleave")
    torch.testing.assert_close(q_full[..., 128:], q_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(kv_full[:, None, 512:], k_ref, rtol=1e-2, atol=1e-2)
    assert torch.equal(q_full[..., :128], nope_before)
