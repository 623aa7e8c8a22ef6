"""Absorbed MLA decode: the reference against a dense loop (CPU), the Triton kernel against it (GPU)."""
import math

import pytest
import torch

from fractal.kernels.mla_decode import mla_decode, mla_decode_ref


def make_latent(seq_lens, page, width, device, dtype):
    need = [math.ceil(n / page) for n in seq_lens]
    num_blocks = sum(need) + 2
    cache = torch.randn(num_blocks, page, width, device=device).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    tables, dense, i = [], [], 0
    for n, nb in zip(seq_lens, need):
        blocks = perm[i:i + nb]
        i += nb
        tables.append(blocks + [perm[-1]] * (max(need) - nb + 1))
        dense.append(cache[blocks].reshape(nb * page, width)[:n])
    return cache, torch.tensor(tables, dtype=torch.int32, device=device), \
        torch.tensor(seq_lens, dtype=torch.int32, device=device), dense


def test_mla_reference_matches_dense_loop():
    torch.manual_seed(0)
    L, R, H = 8, 4, 3
    seq_lens = [1, 9, 14]
    cache, bt, sl, dense = make_latent(seq_lens, 4, L + R, "cpu", torch.float32)
    ql, qr = torch.randn(3, H, L), torch.randn(3, H, R)
    out = mla_decode_ref(ql, qr, cache, bt, sl, 0.2)
    for b in range(3):
        c, kr = dense[b][:, :L].double(), dense[b][:, L:].double()
        for h in range(H):
            p = torch.softmax((c @ ql[b, h].double() + kr @ qr[b, h].double()) * 0.2, dim=0)
            torch.testing.assert_close(out[b, h].double(), p @ c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mla_decode(ql, qr, cache, bt, sl, 0.2), out)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("heads,page", [(16, 64), (128, 16), (20, 32)])
@pytest.mark.parametrize("seq_lens", [[1], [17, 300, 1, 1000], [4097, 33], [3] * 30 + [900]])
def test_mla_decode_gpu(heads, page, seq_lens):
    torch.manual_seed(heads + len(seq_lens))
    L, R = 512, 64
    cache, bt, sl, _ = make_latent(seq_lens, page, L + R, "cuda", torch.bfloat16)
    B = len(seq_lens)
    ql = torch.randn(B, heads, L, device="cuda", dtype=torch.bfloat16)
    qr = torch.randn(B, heads, R, device="cuda", dtype=torch.bfloat16)
    scale = 0.1352  # 192 ** -0.5 * yarn mscale^2 is about this
    ref = mla_decode_ref(ql, qr, cache, bt, sl, scale)
    for bound in (max(seq_lens), 8192):
        out = torch.full_like(ql, float("nan"))
        mla_decode(ql, qr, cache, bt, sl, scale, max_seq_len=bound, out=out)
        assert not out.isnan().any()
        assert _rel(out, ref) < 1e-2, bound
