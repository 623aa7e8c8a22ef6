"""Chunked-prefill attention over the paged cache and over contiguous varlen K/V.

CPU: the references against a dense per-row loop. GPU: Triton and the SDPA baseline against the references.
"""
import math

import pytest
import torch

from fractal.kernels.prefill_attention import (
    paged_prefill_attention,
    paged_prefill_attention_ref,
    sdpa_prefill_attention,
    varlen_attention,
    varlen_attention_ref,
)


def make_batch(query_lens, ctx_lens, page, hq, hkv, d, device, dtype):
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    need = [math.ceil(n / page) for n in seq_lens]
    num_blocks = sum(need) + 2
    cache = torch.randn(2, num_blocks, page, hkv, d, device=device).to(dtype)
    perm = torch.randperm(num_blocks).tolist()
    tables, dense, i = [], [], 0
    for n, nb in zip(seq_lens, need):
        blocks = perm[i:i + nb]
        i += nb
        tables.append(blocks + [perm[-1]] * (max(need) - nb + 1))
        dense.append(cache[:, blocks].reshape(2, nb * page, hkv, d)[:, :n])
    q = torch.randn(sum(query_lens), hq, d, device=device).to(dtype)
    qsl = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return (q, cache, qsl, torch.tensor(seq_lens, dtype=torch.int32, device=device),
            torch.tensor(tables, dtype=torch.int32, device=device), dense, seq_lens)


def test_prefill_reference_matches_dense_loop():
    torch.manual_seed(0)
    query_lens, ctx_lens = [3, 1, 5], [0, 6, 4]
    q, cache, qsl, sl, bt, dense, seq_lens = make_batch(query_lens, ctx_lens, 4, 4, 2, 8, "cpu", torch.float32)
    out = paged_prefill_attention_ref(q, cache, qsl, sl, bt, 0.3)
    row = 0
    for s, (ql, ctx) in enumerate(zip(query_lens, ctx_lens)):
        for j in range(ql):
            for h in range(4):
                k, v = dense[s][0][: ctx + j + 1, h // 2].double(), dense[s][1][: ctx + j + 1, h // 2].double()
                p = torch.softmax((k @ q[row, h].double()) * 0.3, dim=0)
                torch.testing.assert_close(out[row, h].double(), p @ v, rtol=1e-5, atol=1e-5)
            row += 1
    torch.testing.assert_close(paged_prefill_attention(q, cache, qsl, sl, bt, 0.3), out)
    # contiguous varlen reference on the same data
    k = torch.cat([x[0] for x in dense])
    v = torch.cat([x[1] for x in dense])
    cuk = torch.tensor([0] + list(torch.tensor(seq_lens).cumsum(0).tolist()), dtype=torch.int32)
    torch.testing.assert_close(varlen_attention_ref(q, k, v, qsl, cuk, 0.3), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa_prefill_attention(q, cache, qsl, sl, bt, 0.3, query_lens, seq_lens), out,
                               rtol=1e-5, atol=1e-5)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


CASES = {
    "fresh": ([512, 512, 300], [0, 0, 0]),
    "chunk_after_prefix": ([256, 1000], [512, 37]),
    "mixed_with_decodes": ([1, 1, 129, 1, 64], [700, 5, 0, 2048, 1000]),
    "single_8k": ([2048], [0]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hq,hkv,d,page", [(32, 8, 128, 16), (16, 16, 64, 32), (32, 4, 128, 64)])
def test_paged_prefill_gpu(case, hq, hkv, d, page):
    torch.manual_seed(hq + page)
    query_lens, ctx_lens = CASES[case]
    q, cache, qsl, sl, bt, _, seq_lens = make_batch(query_lens, ctx_lens, page, hq, hkv, d, "cuda", torch.bfloat16)
    ref = paged_prefill_attention_ref(q, cache, qsl, sl, bt, d ** -0.5)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, cache, qsl, sl, bt, d ** -0.5, max_query_len=max(query_lens), out=out)
    assert not out.isnan().any()
    assert _rel(out, ref) < 1e-2
    base = sdpa_prefill_attention(q, cache, qsl, sl, bt, d ** -0.5, query_lens, seq_lens)
    assert _rel(base, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fresh", "chunk_after_prefix", "mixed_with_decodes", "single_8k"])
def test_varlen_mla_shapes_gpu(case):
    """MLA prefill: 16 heads, qk dim 192 (128 nope + 64 rope), v dim 128, keys contiguous per sequence."""
    torch.manual_seed(5)
    query_lens, ctx_lens = CASES[case]
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    q = torch.randn(sum(query_lens), 16, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(seq_lens), 16, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(sum(seq_lens), 16, 128, device="cuda", dtype=torch.bfloat16)
    cuq = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    cuk = torch.tensor([0] + torch.tensor(seq_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    ref = varlen_attention_ref(q, k, v, cuq, cuk, 192 ** -0.5)
    out = torch.full((q.shape[0], 16, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    varlen_attention(q, k, v, cuq, cuk, 192 ** -0.5, max_query_len=max(query_lens), out=out)
    assert not out.isnan().any()
    assert _rel(out, ref) < 1e-2
