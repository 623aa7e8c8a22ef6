"""Greedy token + logprob kernel against float32 argmax + logsumexp.

The kernel tests run on CUDA, or on CPU through Triton's interpreter with TRITON_INTERPRET=1; else they skip.
"""
import math

import pytest
import torch

import fractal.kernels.greedy_sample as gs
from fractal.kernels._triton_support import INTERPRET, use_triton
from fractal.kernels.greedy_sample import BLOCK, MAX_PARTIALS, choose_partials, greedy_sample, greedy_sample_ref

_KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
kernels_here = pytest.mark.skipif(_KERNEL_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")
_INTERPRETER_MAX_LOGITS = 4_000_000  # larger cases take seconds each in Triton's CPU interpreter: CUDA only


def _skip_large_on_interpreter(B, V):
    if _KERNEL_DEVICE == "cpu" and B * V > _INTERPRETER_MAX_LOGITS:
        pytest.skip("large shape: CUDA only (slow in the interpreter)")


def _logits(B, V, dtype=torch.bfloat16, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, V, generator=g) * 3).to(dtype).to(device)


def _check(logits, ids, logprob):
    """ids exactly torch.argmax of the float32 logits; logprob within 1e-5 of the float32 reference."""
    B = logits.shape[0]
    assert ids.dtype == torch.int64 and ids.shape == (B,) and ids.device == logits.device
    assert logprob.dtype == torch.float32 and logprob.shape == (B,) and logprob.device == logits.device
    ref_ids, ref_lp = greedy_sample_ref(logits)
    assert torch.equal(ids, logits.float().argmax(dim=-1))
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(logprob, ref_lp, rtol=0, atol=1e-5)


def test_reference_is_argmax_and_logsumexp():
    x = _logits(4, 1000)
    ids, lp = greedy_sample_ref(x)
    xf = x.float()
    assert torch.equal(ids, xf.argmax(-1))
    assert torch.equal(lp, xf[torch.arange(4), ids] - torch.logsumexp(xf, -1))
    torch.testing.assert_close(lp, torch.log_softmax(xf, -1).max(-1).values, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B", [0, 1, 5])
def test_cpu_fallback_equals_reference(monkeypatch, dtype, B):
    monkeypatch.setattr(gs, "use_triton", lambda *t: False)
    x = _logits(B, 3000, dtype)
    ids, lp = greedy_sample(x)
    ref_ids, ref_lp = greedy_sample_ref(x)
    assert ids.shape == (B,) and lp.shape == (B,) and lp.dtype == torch.float32
    assert torch.equal(ids, ref_ids) and torch.equal(lp, ref_lp)


def test_cpu_without_interpreter_uses_reference():
    x = _logits(3, 500)
    if use_triton(x):
        pytest.skip("TRITON_INTERPRET=1: CPU tensors go to the kernel")
    ids, lp = greedy_sample(x)
    ref_ids, ref_lp = greedy_sample_ref(x)
    assert torch.equal(ids, ref_ids) and torch.equal(lp, ref_lp)


def test_bad_shape_raises():
    with pytest.raises(ValueError):
        greedy_sample(torch.zeros(8))
    with pytest.raises(ValueError):
        greedy_sample(torch.zeros(2, 0))


@pytest.mark.parametrize("V", [1, 1000, 50257, 102400, 151936])
@pytest.mark.parametrize("B", [1, 3, 64, 257, 512, 4096])
def test_choose_partials(B, V):
    P, tpc = choose_partials(B, V)
    tiles = math.ceil(V / BLOCK)
    assert 1 <= P <= min(MAX_PARTIALS, tiles)
    assert (P - 1) * tpc < tiles <= P * tpc  # every chunk has a tile, the chunks cover the row
    want = min(math.ceil(gs.PROGRAMS_PER_SM * gs.NUM_SMS / B), MAX_PARTIALS, tiles)
    assert 2 * P >= want  # rounding chunks to whole tiles loses at most half of the wanted programs


@kernels_here
@pytest.mark.parametrize("V", [1000, 32000, 50257, 102400, 151936])
@pytest.mark.parametrize("B", [1, 3, 64, 257])
def test_kernel_matches_reference(B, V):
    _skip_large_on_interpreter(B, V)
    x = _logits(B, V, device=_KERNEL_DEVICE, seed=B * 7 + V)
    _check(x, *greedy_sample(x))


@kernels_here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("B,V", [(1, 102400), (3, 50257), (64, 32000)])
def test_kernel_dtypes(dtype, B, V):
    x = _logits(B, V, dtype, device=_KERNEL_DEVICE, seed=V)
    _check(x, *greedy_sample(x))


@kernels_here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B", [1, 5, 33])
def test_kernel_strided_rows(dtype, B):
    V = 50257
    wide = _logits(B, V + 135, dtype, device=_KERNEL_DEVICE, seed=B)
    x = wide[:, 3:3 + V]  # odd row stride, unaligned start
    assert x.stride() == (V + 135, 1) and x.storage_offset() == 3
    ids, lp = greedy_sample(x)
    _check(x, ids, lp)
    ids_c, lp_c = greedy_sample(x.contiguous())
    assert torch.equal(ids, ids_c) and torch.equal(lp, lp_c)  # same partials, same order


@kernels_here
@pytest.mark.parametrize("B", [1, 64, 257])
def test_kernel_ties_pick_lowest_index(B):
    """The same max at two positions: in one tile, in one lane of two tiles, in two chunks, at the row's ends."""
    V = 102400
    _skip_large_on_interpreter(B, V)
    P, tpc = choose_partials(B, V)
    chunk = tpc * BLOCK
    pairs = [(5, 900), (7, 7 + BLOCK), (100, 3 * BLOCK + 5), (chunk - 1, chunk), (3, chunk + 3), (0, V - 1),
             (V - 2, V - 1), (BLOCK + 11, 40000)]
    x = _logits(B, V, device=_KERNEL_DEVICE, seed=B)
    want = []
    for b in range(B):
        lo, hi = pairs[b % len(pairs)]
        if b % 2:
            lo, hi = hi, lo  # the order of placement is irrelevant
        x[b, lo] = 30.0
        x[b, hi] = 30.0
        want.append(min(lo, hi))
    ids, lp = greedy_sample(x)
    assert ids.tolist() == want
    _check(x, ids, lp)


@kernels_here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_constant_rows(dtype):
    V = 50257
    x = torch.full((3, V), 1.5, dtype=dtype, device=_KERNEL_DEVICE)
    ids, lp = greedy_sample(x)
    assert ids.tolist() == [0, 0, 0]
    torch.testing.assert_close(lp, torch.full((3,), -math.log(V), device=x.device), rtol=0, atol=1e-5)
    _check(x, ids, lp)


@kernels_here
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_neg_inf_entries(dtype):
    V = 102400
    B = 6
    x = _logits(B, V, dtype, device=_KERNEL_DEVICE, seed=11)
    g = torch.Generator().manual_seed(12)
    ninf = float("-inf")
    x[0].masked_fill_((torch.rand(V, generator=g) < 0.95).to(x.device), ninf)  # sparse allowed vocab
    x[1, : V // 2] = ninf  # whole chunks of -inf before the max
    x[2, BLOCK:] = ninf  # whole chunks of -inf after it
    x[3] = ninf
    x[3, 77777] = -2.0  # one finite logit: probability 1
    x[4, :-1] = ninf
    x[4, -1] = 4.0  # only the last one
    x[5, ::2] = ninf  # every other lane
    ids, lp = greedy_sample(x)
    assert not torch.isnan(lp).any()
    assert ids[3].item() == 77777 and ids[4].item() == V - 1
    assert lp[3].item() == 0.0 and lp[4].item() == 0.0
    _check(x, ids, lp)


@kernels_here
def test_kernel_all_neg_inf_row_gives_id_zero():
    x = _logits(2, 5000, device=_KERNEL_DEVICE)
    x[1] = float("-inf")
    ids, lp = greedy_sample(x)
    assert ids.tolist()[1] == 0 == x[1].float().argmax().item()
    assert lp[1].item() == float("inf")  # the reference gives -inf - -inf = nan
    _check(x[:1], ids[:1], lp[:1])


@kernels_here
def test_kernel_empty_batch_and_tiny_vocab():
    ids, lp = greedy_sample(torch.zeros(0, 1000, dtype=torch.bfloat16, device=_KERNEL_DEVICE))
    assert ids.shape == (0,) and ids.dtype == torch.int64 and lp.shape == (0,) and lp.dtype == torch.float32
    x = _logits(4, 1, device=_KERNEL_DEVICE)
    ids, lp = greedy_sample(x)
    assert ids.tolist() == [0] * 4 and lp.abs().max().item() == 0.0
    x = _logits(4, 3, device=_KERNEL_DEVICE)
    _check(x, *greedy_sample(x))


@pytest.mark.gpu
def test_no_recompile_across_batch_sizes():
    from fractal.kernels._triton_support import compiled_variant_keys

    V = 102400
    greedy_sample(_logits(2, V, device="cuda"))
    before = compiled_variant_keys()
    for B in (1, 3, 64, 257, 512, 1000):
        x = _logits(B, V, device="cuda", seed=B)
        _check(x, *greedy_sample(x))
    assert compiled_variant_keys() == before


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 64])
def test_cuda_graph_capture_and_replay(B):
    V = 102400
    static = _logits(B, V, device="cuda", seed=1)
    greedy_sample(static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids, lp = greedy_sample(static)
    for seed in (2, 3):
        x = _logits(B, V, device="cuda", seed=seed)
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        _check(x, ids, lp)
