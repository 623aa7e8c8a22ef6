"""Chunked-prefill attention over the paged cache and over contiguous varlen K/V.

CPU: the references against a dense per-row loop. GPU: Triton and the SDPA baseline against the references.
Tests marked kernels_here also run the Triton kernel on CPU tensors with TRITON_INTERPRET=1 (small shapes).
"""
import math

import pytest
import torch

from fractal.errors import FractalError
from fractal.kernels._triton_support import INTERPRET
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


# --- split QK operands (MLA nope + rope read in place, no concatenation) -----------------------------------
_KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
kernels_here = pytest.mark.skipif(_KERNEL_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def make_split(query_lens, ctx_lens, hq, hkv, dn, dr, dv, device, dtype, rank=24):
    """Split operands as MLA prefill makes them: q_nope / q_rope column slices of one projection output [T, Hq,
    Dn + Dr]; k / v slices of one [S, Hkv, Dn + Dv] GEMM output; k_rope [S, Dr] a slice of latent cache rows."""
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    T, S = sum(query_lens), sum(seq_lens)
    qp = torch.randn(T, hq, dn + dr, device=device).to(dtype)
    kv = torch.randn(S, hkv, dn + dv, device=device).to(dtype)
    entries = torch.randn(S, rank + dr, device=device).to(dtype)
    return (qp[..., :dn], qp[..., dn:], kv[..., :dn], kv[..., dn:], entries[:, rank:],
            _cu(query_lens, device), _cu(seq_lens, device))


def test_varlen_split_reference_matches_concatenated():
    """CPU: split operands (k_rope shared by all heads) == one concatenated head dim; T != S (cached context)."""
    torch.manual_seed(3)
    q, qr, k, v, kr, cuq, cuk = make_split([3, 1, 6], [0, 5, 2], 4, 2, 12, 8, 10, "cpu", torch.float32)
    full_q = torch.cat((q, qr), dim=-1)
    full_k = torch.cat((k, kr[:, None, :].expand(-1, 2, -1)), dim=-1)
    ref = varlen_attention_ref(full_q, full_k, v, cuq, cuk, 0.2)
    torch.testing.assert_close(varlen_attention_ref(q, k, v, cuq, cuk, 0.2, qr, kr), ref)
    torch.testing.assert_close(varlen_attention(q, k, v, cuq, cuk, 0.2, q_rope=qr, k_rope=kr), ref)


def test_varlen_shape_errors():
    """Mismatched operands raise FractalError before any launch."""
    q, qr, k, v, kr, cuq, cuk = make_split([3], [2], 4, 2, 12, 8, 10, "cpu", torch.float32)
    bad = [
        dict(q_rope=qr),                                     # k_rope missing
        dict(k_rope=kr),                                     # q_rope missing
        dict(q_rope=qr, k_rope=kr[:-1]),                     # k_rope rows != keys
        dict(q_rope=qr, k_rope=kr[:, :4]),                   # rope widths differ
        dict(q_rope=qr[:, :2], k_rope=kr),                   # q_rope heads != q heads
        dict(q_rope=qr, k_rope=kr[:, None, :]),              # k_rope must be [S, R]
        dict(q_rope=qr.double(), k_rope=kr.double()),        # dtype differs from q / k
    ]
    for kw in bad:
        with pytest.raises(FractalError, match="varlen_attention shapes disagree"):
            varlen_attention(q, k, v, cuq, cuk, 0.2, **kw)
    with pytest.raises(FractalError):
        varlen_attention(q, k[:, :, :8], v, cuq, cuk, 0.2)   # q / k head dims differ
    with pytest.raises(FractalError):
        varlen_attention(q, k, v[:-1], cuq, cuk, 0.2)        # k / v rows differ
    with pytest.raises(FractalError):
        varlen_attention(q[:, :3], k, v, cuq, cuk, 0.2)      # Hq % Hkv != 0


SPLIT_CASES = {
    # name: (query_lens, ctx_lens, hq, hkv, dn, dr, dv)
    "mla_dims_prefix": ([3, 70], [64, 0], 2, 2, 128, 64, 128),
    "small_fresh": ([5, 40], [0, 0], 4, 4, 32, 16, 32),
    "gqa_odd_dims_prefix": ([9, 17, 2], [30, 0, 65], 4, 2, 24, 8, 20),
    "with_decode_rows": ([1, 1, 9], [30, 0, 5], 3, 3, 16, 16, 48),
}


@kernels_here
@pytest.mark.parametrize("case", list(SPLIT_CASES))
def test_varlen_split_kernel(case):
    """Triton split path (q_nope / q_rope / k / v strided views, shared k_rope) vs the reference."""
    query_lens, ctx_lens, hq, hkv, dn, dr, dv = SPLIT_CASES[case]
    torch.manual_seed(len(case))
    dtype = torch.bfloat16 if _KERNEL_DEVICE == "cuda" else torch.float32
    q, qr, k, v, kr, cuq, cuk = make_split(query_lens, ctx_lens, hq, hkv, dn, dr, dv, _KERNEL_DEVICE, dtype)
    assert not q.is_contiguous() and not qr.is_contiguous() and not k.is_contiguous() and not kr.is_contiguous()
    scale = (dn + dr) ** -0.5
    ref = varlen_attention_ref(q, k, v, cuq, cuk, scale, qr, kr)
    out = torch.full((q.shape[0], hq, dv), float("nan"), device=_KERNEL_DEVICE, dtype=dtype)
    varlen_attention(q, k, v, cuq, cuk, scale, max_query_len=max(query_lens), out=out, q_rope=qr, k_rope=kr)
    assert not out.isnan().any()
    assert _rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@kernels_here
@pytest.mark.parametrize("d,dv", [(192, 128), (64, 64)])
def test_varlen_single_operand_kernel(d, dv):
    """The single-tensor path (192 = 128 + 64 split inside the kernel) still matches, with a strided v view."""
    torch.manual_seed(d)
    dtype = torch.bfloat16 if _KERNEL_DEVICE == "cuda" else torch.float32
    query_lens, ctx_lens = [4, 33], [20, 0]
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    q = torch.randn(sum(query_lens), 2, d, device=_KERNEL_DEVICE).to(dtype)
    kv = torch.randn(sum(seq_lens), 2, d + dv, device=_KERNEL_DEVICE).to(dtype)
    k, v = kv[..., :d], kv[..., d:]
    cuq, cuk = _cu(query_lens, _KERNEL_DEVICE), _cu(seq_lens, _KERNEL_DEVICE)
    ref = varlen_attention_ref(q, k, v, cuq, cuk, d ** -0.5)
    out = varlen_attention(q, k, v, cuq, cuk, d ** -0.5)
    assert _rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@kernels_here
def test_paged_prefill_kernel_small():
    """Paged GQA prefill through the same kernel (non-split branch)."""
    torch.manual_seed(9)
    dtype = torch.bfloat16 if _KERNEL_DEVICE == "cuda" else torch.float32
    q, cache, qsl, sl, bt, _, _ = make_batch([1, 20, 7], [9, 0, 40], 16, 4, 2, 32, _KERNEL_DEVICE, dtype)
    ref = paged_prefill_attention_ref(q, cache, qsl, sl, bt, 0.25)
    out = paged_prefill_attention(q, cache, qsl, sl, bt, 0.25, max_query_len=20)
    assert _rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@kernels_here
@pytest.mark.parametrize("query_lens,ctx_lens", [([7, 20], [0, 13]), ([1, 1, 12], [9, 30, 4])])
def test_triton_backend_mla_prefill(query_lens, ctx_lens):
    """TritonAttentionBackend.mla_prefill (one k_nope|v GEMM on kv_b_proj's storage, split varlen operands)
    vs the torch backend, with w_uk / w_uv as per-head views of one kv_b weight and as separate tensors."""
    from fractal.layers.attention_backends import TorchAttentionBackend
    from fractal.layers.attention_metadata import AttentionMetadata
    from fractal.layers.gpu_backends import TritonAttentionBackend

    torch.manual_seed(sum(query_lens))
    dev = _KERNEL_DEVICE
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    heads, dn, dr, dv, rank, page = 4, 32, 16, 24, 32, 8
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    need = [math.ceil(n / page) for n in seq_lens]
    perm = torch.randperm(sum(need) + 1).tolist()
    tables, i = [], 0
    for nb in need:
        tables.append(perm[i:i + nb])
        i += nb
    meta = AttentionMetadata.build(query_lens, ctx_lens, tables, page, device=dev)
    kv_cache = torch.randn(sum(need) + 1, page, rank + dr, device=dev).to(dtype)
    T = sum(query_lens)
    qp = torch.randn(T, heads, dn + dr, device=dev).to(dtype)
    q_nope, q_rope = qp[..., :dn], qp[..., dn:]
    w = (torch.randn(heads * (dn + dv), rank, device=dev) * rank ** -0.5).to(dtype)  # kv_b_proj.weight
    wv = w.view(heads, dn + dv, rank)
    w_uk, w_uv = wv[:, :dn], wv[:, dn:]
    scale = (dn + dr) ** -0.5
    ref = TorchAttentionBackend().mla_prefill(q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale)
    backend = TritonAttentionBackend()
    assert backend._kv_b_weight(w_uk, w_uv).data_ptr() == w.data_ptr()  # views of kv_b_proj: no copy
    out = backend.mla_prefill(q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert _rel(out, ref) < tol
    out2 = backend.mla_prefill(q_nope, q_rope, kv_cache, meta, w_uk.clone(), w_uv.clone(), scale)  # cached copy
    assert _rel(out2, ref) < tol
