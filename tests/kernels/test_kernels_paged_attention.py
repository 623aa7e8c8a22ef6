"""Paged GQA decode attention: the reference against a dense per-head loop (CPU), Triton against it (GPU)."""
import math

import pytest
import torch

from fractal.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref


def make_paged(seq_lens, page, hkv, d, device, dtype, extra_blocks=3):
    """Random K/V in a paged cache with shuffled (non-contiguous) block tables; also the dense K/V per sequence."""
    need = [math.ceil(n / page) for n in seq_lens]
    num_blocks = sum(need) + extra_blocks
    cache = torch.randn(2, num_blocks, page, hkv, d, device=device).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    width = max(need) + 2
    tables, dense, i = [], [], 0
    for n, nb in zip(seq_lens, need):
        blocks = perm[i:i + nb]
        i += nb
        tables.append(blocks + [perm[-1]] * (width - nb))  # padding points at a real, unrelated block
        flat = cache[:, blocks].reshape(2, nb * page, hkv, d)[:, :n]
        dense.append(flat)
    bt = torch.tensor(tables, dtype=torch.int32, device=device)
    return cache, bt, torch.tensor(seq_lens, dtype=torch.int32, device=device), dense


def test_decode_reference_matches_dense_loop():
    torch.manual_seed(0)
    seq_lens, hq, hkv, d = [1, 7, 20], 4, 2, 8
    cache, bt, sl, dense = make_paged(seq_lens, 4, hkv, d, "cpu", torch.float32)
    q = torch.randn(3, hq, d)
    out = paged_decode_attention_ref(q, cache, bt, sl, 0.3)
    for b, n in enumerate(seq_lens):
        for h in range(hq):
            k, v = dense[b][0][:, h // 2].double(), dense[b][1][:, h // 2].double()
            p = torch.softmax((k @ q[b, h].double()) * 0.3, dim=0)
            torch.testing.assert_close(out[b, h].double(), p @ v, rtol=1e-5, atol=1e-5)
    # the public entry falls back to the reference on CPU
    torch.testing.assert_close(paged_decode_attention(q, cache, bt, sl, 0.3), out)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,page", [(32, 8, 128, 16), (32, 4, 128, 16), (16, 16, 64, 32), (8, 1, 128, 64)])
@pytest.mark.parametrize("seq_lens", [[1], [17, 300, 1, 1000], [4097, 33, 2048], [5] * 40 + [700]])
def test_decode_gpu(hq, hkv, d, page, seq_lens):
    torch.manual_seed(len(seq_lens) * 7 + hq)
    cache, bt, sl, _ = make_paged(seq_lens, page, hkv, d, "cuda", torch.bfloat16)
    q = torch.randn(len(seq_lens), hq, d, device="cuda", dtype=torch.bfloat16)
    ref = paged_decode_attention_ref(q, cache, bt, sl, d ** -0.5)
    for bound in (max(seq_lens), 8192):  # exact bound, and a loose fixed bound as under CUDA graphs
        out = torch.full_like(q, float("nan"))
        paged_decode_attention(q, cache, bt, sl, d ** -0.5, max_seq_len=bound, out=out)
        assert not out.isnan().any()
        assert _rel(out, ref) < 1e-2, bound
