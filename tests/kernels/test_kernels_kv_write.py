"""KV-cache writes (GQA: K and V in one launch; MLA: latent RMSNorm fused into the write) against plain torch."""
import pytest
import torch

from fractal.kernels.kv_write import write_kv, write_kv_ref, write_mla, write_mla_ref
from fractal.kernels.rmsnorm import rms_norm_ref


def test_write_mla_ref_matches_norm_then_copy():
    torch.manual_seed(0)
    cache = torch.randn(5, 4, 24)
    lat, kr, w = torch.randn(3, 16), torch.randn(3, 8), torch.randn(16)
    slots = torch.tensor([7, 0, 19])
    write_mla_ref(cache, lat, w, 1e-6, kr, slots)
    flat = cache.flatten(0, 1)
    h = lat / torch.sqrt(lat.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    torch.testing.assert_close(flat[slots, :16], h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat[slots, 16:], kr, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("T,hkv,d,dtype", [(1, 8, 128, torch.bfloat16), (37, 4, 128, torch.bfloat16),
                                            (5, 2, 64, torch.float32)])
def test_write_kv_gpu(T, hkv, d, dtype):
    torch.manual_seed(T)
    hq = 4 * hkv
    cache = torch.randn(2, 20, 16, hkv, d, device="cuda").to(dtype)
    want = cache.clone()
    qkv = torch.randn(T, (hq + 2 * hkv) * d, device="cuda").to(dtype)  # k, v as strided views, like the model
    k = qkv[:, hq * d:(hq + hkv) * d].view(T, hkv, d)
    v = qkv[:, (hq + hkv) * d:].view(T, hkv, d)
    slots = torch.randperm(320, device="cuda")[:T]
    write_kv(cache, k, v, slots)
    write_kv_ref(want, k, v, slots)
    assert torch.equal(cache, want)


@pytest.mark.gpu
@pytest.mark.parametrize("T,L,R,dtype", [(1, 512, 64, torch.bfloat16), (50, 512, 64, torch.bfloat16),
                                          (7, 64, 16, torch.float32)])
def test_write_mla_gpu(T, L, R, dtype):
    torch.manual_seed(T + L)
    cache = torch.randn(20, 16, L + R, device="cuda").to(dtype)
    want = cache.clone()
    proj = torch.randn(T, L + R, device="cuda").to(dtype)  # latent and k_rope as views of kv_a_proj's output
    lat, kr = proj.split([L, R], dim=-1)
    w = (torch.rand(L, device="cuda") + 0.5).to(dtype)
    slots = torch.randperm(320, device="cuda")[:T]
    write_mla(cache, lat, w, 1e-6, kr, slots)
    write_mla_ref(want, lat, w, 1e-6, kr, slots)
    flat, ref = cache.flatten(0, 1), want.flatten(0, 1)
    assert torch.equal(flat[:, L:], ref[:, L:])
    torch.testing.assert_close(flat[slots, :L].float(), rms_norm_ref(lat, w, 1e-6).float(), rtol=1e-2, atol=1e-2)
    untouched = torch.ones(flat.shape[0], dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert torch.equal(flat[untouched], ref[untouched])
