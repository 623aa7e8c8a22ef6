"""Fused q/k norm + RoPE + KV-cache write (qkv_prep_) against the three-step reference path.

The kernel tests run on CUDA, or on CPU through Triton's interpreter with TRITON_INTERPRET=1; else they skip.
Exactness: without the q/k norm the kernel is bitwise the reference (RoPE's products are not contracted into FMAs).
With the norm, the float32 sum of squares is summed in another order than torch's mean, so a normalised value on a
rounding boundary of the dtype may round the other way: a 1-ulp flip of a few elements, checked as such.
Triton's interpreter rounds float32 -> bfloat16 by truncation (not to nearest even): under it, bf16 results are
only checked to a few ulps.
"""
import pytest
import torch

import fractal.kernels.qkv_prep as qp
from fractal.errors import FractalError
from fractal.kernels._triton_support import INTERPRET, compiled_variants_by_kernel, use_triton
from fractal.kernels.kv_write import write_kv_ref
from fractal.kernels.qkv_prep import qkv_prep_, qkv_prep_ref
from fractal.kernels.rotary import build_cos_sin_cache, rotary_ref
from fractal.layers.norm import RMSNorm

_KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
kernels_here = pytest.mark.skipif(_KERNEL_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")

MAX_POS = 8192

# name: (Hq, Hkv, D, rotary_dim, style, q/k norm)
SHAPES = {
    "llama8b": (32, 8, 128, 128, "neox", False),
    "qwen3": (32, 4, 128, 128, "neox", True),
    "partial_rotary": (16, 2, 128, 64, "neox", False),
    "interleave": (16, 4, 64, 64, "interleave", False),
    # non-power-of-two heads and head_dim, partial interleaved rotary (half 16), norm over the whole head
    "odd_interleave_norm": (12, 3, 96, 32, "interleave", True),
}
DTYPES = [torch.bfloat16, torch.float16] + ([torch.float32] if _KERNEL_DEVICE == "cpu" else [])


def _nonzero(*shape, dtype=torch.bfloat16, device="cpu", scale=1.0):
    """Random values bounded away from zero (random signs)."""
    mag = 0.05 + torch.rand(*shape, device=device)
    sign = torch.where(torch.rand(*shape, device=device) < 0.5, -1.0, 1.0)
    return (mag * sign * scale).to(dtype)


def _cos_sin(rot, device):
    inv_freq = 1.0 / (1000000 ** (torch.arange(0, rot, 2, device=device).float() / rot))
    return build_cos_sin_cache(inv_freq, MAX_POS, attention_scaling=1.05)


def _case(T, hq, hkv, d, rot, norm, dtype, device, cache_dtype=None, seed=0):
    torch.manual_seed(seed)
    width = (hq + 2 * hkv) * d
    qkv = _nonzero(T, width, dtype=dtype, device=device, scale=2.0)
    pos = torch.randint(0, MAX_POS, (T,), device=device)
    pos[0] = MAX_POS - 1  # the last row of the cos/sin cache
    block_size = 16
    num_blocks = (2 * T) // block_size + 4
    cache = _nonzero(2, num_blocks, block_size, hkv, d, dtype=cache_dtype or dtype, device=device)
    slots = torch.randperm(num_blocks * block_size, device=device)[:T]  # scattered, unsorted
    qw = _nonzero(d, dtype=dtype, device=device, scale=1.5) if norm else None
    kw = _nonzero(d, dtype=dtype, device=device, scale=1.5) if norm else None
    return qkv, pos, _cos_sin(rot, device), cache, slots, qw, kw


def _mode(dtype, norm):
    """How equal the kernel must be to the reference (see the module docstring)."""
    if dtype == torch.bfloat16 and _KERNEL_DEVICE == "cpu":
        return "ulps"  # the interpreter truncates to bf16
    if norm:
        return "flips" if dtype != torch.float32 else "ulps"
    return "exact"


def _assert_matches(out, ref, mode, dtype=None):
    """mode "exact": bitwise; "flips": a few elements (<= 1%) off by a rounding flip of `dtype` (default out's);
    "ulps": within a few ulps of `dtype` at the largest magnitude, any number of elements."""
    if mode == "exact":
        assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {out.numel()} differ"
        return
    eps = torch.finfo(dtype or out.dtype).eps
    diff = (out.float() - ref.float()).abs()
    scale = ref.float().abs().amax().clamp_min(1.0).item()
    assert diff.max().item() <= 4 * eps * scale, (diff.max().item(), scale)
    if mode == "flips":
        frac = (out != ref).float().mean().item()
        assert frac <= 0.01, frac


def _run_and_check(qkv, pos, cs, cache, slots, qw, kw, hq, hkv, d, rot, style, mode):
    qkv0, cache0 = qkv.clone(), cache.clone()
    want, want_cache = qkv.clone(), cache.clone()
    q, k, v = qkv_prep_(qkv, pos, cs, style, rot, hq, hkv, d, cache, slots, qw, kw)
    qkv_prep_ref(want, pos, cs, style, rot, hq, hkv, d, want_cache, slots, qw, kw)
    T = qkv.shape[0]
    nq, nk = hq * d, hkv * d
    assert q.shape == (T, hq, d) and k.shape == (T, hkv, d) and v.shape == (T, hkv, d)
    assert q.data_ptr() == qkv.data_ptr() and k.data_ptr() == qkv[:, nq:].data_ptr()
    _assert_matches(qkv[:, :nq], want[:, :nq], mode)
    _assert_matches(qkv[:, nq:nq + nk], want[:, nq:nq + nk], mode)
    assert torch.equal(qkv[:, nq + nk:], qkv0[:, nq + nk:])  # v is read only
    if rot < d and qw is None:  # un-normed heads: the dims past rotary_dim are untouched
        assert torch.equal(q[..., rot:], qkv0[:, :nq].view(T, hq, d)[..., rot:])
        assert torch.equal(k[..., rot:], qkv0[:, nq:nq + nk].view(T, hkv, d)[..., rot:])
    flat, flat_want, flat0 = cache.flatten(1, 2), want_cache.flatten(1, 2), cache0.flatten(1, 2)
    # the cache holds exactly the kernel's own k (cast to the cache dtype) and v
    assert torch.equal(flat[0, slots], k.to(cache.dtype))
    assert torch.equal(flat[1, slots], v.to(cache.dtype))
    _assert_matches(flat[0, slots], flat_want[0, slots], mode, qkv.dtype)
    untouched = torch.ones(flat.shape[1], dtype=torch.bool, device=flat.device)
    untouched[slots] = False
    assert torch.equal(flat[:, untouched], flat0[:, untouched])


# --- reference and fallback (always run) ------------------------------------------------------------------


@pytest.mark.parametrize("style", ["neox", "interleave"])
def test_reference_is_module_norm_then_rope_then_write(style):
    """The reference equals the torch modules' path: RMSNorm module (bf16 weight), rotary_ref, write_kv_ref."""
    hq, hkv, d, rot = 4, 2, 32, 32
    qkv, pos, cs, cache, slots, qw, kw = _case(7, hq, hkv, d, rot, True, torch.bfloat16, "cpu")
    want, want_cache = qkv.clone(), cache.clone()
    qkv_prep_ref(qkv, pos, cs, style, rot, hq, hkv, d, cache, slots, qw, kw, 1e-6)
    qn, kn = RMSNorm(d, 1e-6).to(torch.bfloat16), RMSNorm(d, 1e-6).to(torch.bfloat16)
    qn.weight.data.copy_(qw)
    kn.weight.data.copy_(kw)
    q0, k0, v0 = want.split([hq * d, hkv * d, hkv * d], dim=-1)
    q1, k1 = rotary_ref(pos, qn(q0.reshape(7, hq, d)), kn(k0.reshape(7, hkv, d)), cs, style)
    write_kv_ref(want_cache, k1, v0.reshape(7, hkv, d), slots)
    assert torch.equal(qkv, torch.cat((q1.flatten(1), k1.flatten(1), v0), dim=-1))
    assert torch.equal(cache, want_cache)


def test_reference_matches_float64_math():
    """Semantics sanity check: norm then neox RoPE on part of the head, in float64, to bf16 rounding."""
    hq, hkv, d, rot = 2, 1, 16, 8
    qkv, pos, cs, cache, slots, qw, kw = _case(3, hq, hkv, d, rot, True, torch.bfloat16, "cpu")
    x = qkv.double().view(3, hq + 2 * hkv, d)
    q_in = x[:, :hq]
    qkv_prep_ref(qkv, pos, cs, "neox", rot, hq, hkv, d, cache, slots, qw, kw, 1e-6)
    n = q_in / torch.sqrt(q_in.pow(2).mean(-1, keepdim=True) + 1e-6) * qw.double()
    c, s = cs.double()[pos][:, None, : rot // 2], cs.double()[pos][:, None, rot // 2:]
    x1, x2 = n[..., : rot // 2], n[..., rot // 2: rot]
    want = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s, n[..., rot:]), dim=-1)
    torch.testing.assert_close(qkv.view(3, -1, d)[:, :hq].double(), want, rtol=3e-2, atol=3e-2)


def test_cpu_without_interpreter_uses_reference():
    hq, hkv, d, rot = 8, 2, 64, 64
    qkv, pos, cs, cache, slots, qw, kw = _case(5, hq, hkv, d, rot, True, torch.bfloat16, "cpu")
    if use_triton(qkv):
        pytest.skip("TRITON_INTERPRET=1: CPU tensors go to the kernel")
    want, want_cache = qkv.clone(), cache.clone()
    qkv_prep_(qkv, pos, cs, "neox", rot, hq, hkv, d, cache, slots, qw, kw)
    qkv_prep_ref(want, pos, cs, "neox", rot, hq, hkv, d, want_cache, slots, qw, kw)
    assert torch.equal(qkv, want) and torch.equal(cache, want_cache)


@pytest.mark.parametrize("bad", ["style", "rot_vs_cache", "rot_odd", "width", "positions", "cache", "weight"])
def test_bad_arguments_raise(bad):
    hq, hkv, d, rot = 4, 2, 32, 32
    qkv, pos, cs, cache, slots, qw, kw = _case(3, hq, hkv, d, rot, True, torch.float32, "cpu")
    args = dict(qkv=qkv, positions=pos, cos_sin_cache=cs, style="neox", rotary_dim=rot, num_heads=hq,
                num_kv_heads=hkv, head_dim=d, kv_cache=cache, slot_mapping=slots, q_norm_weight=qw,
                k_norm_weight=kw)
    if bad == "style":
        args["style"] = "gptj"
    elif bad == "rot_vs_cache":
        args["rotary_dim"] = 16
    elif bad == "rot_odd":
        args["rotary_dim"], args["cos_sin_cache"] = 15, cs[:, :15]
    elif bad == "width":
        args["qkv"] = qkv[:, :-d]
    elif bad == "positions":
        args["positions"] = pos[:2]
    elif bad == "cache":
        args["kv_cache"] = cache[:, :, :, :1]
    else:
        args["k_norm_weight"] = kw[:-1]
    for fn in (qkv_prep_, qkv_prep_ref):
        with pytest.raises(FractalError):
            fn(**args)


# --- the kernel (CUDA, or the interpreter) ----------------------------------------------------------------


@kernels_here
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("T", [1, 5, 64, 300])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_matches_reference(shape, T, dtype):
    hq, hkv, d, rot, style, norm = SHAPES[shape]
    qkv, pos, cs, cache, slots, qw, kw = _case(T, hq, hkv, d, rot, norm, dtype, _KERNEL_DEVICE, seed=T)
    _run_and_check(qkv, pos, cs, cache, slots, qw, kw, hq, hkv, d, rot, style, _mode(dtype, norm))


@kernels_here
@pytest.mark.parametrize("per,warps", [(1, 1), (2, 8), (4, 2), (16, 4), (32, 8)])
@pytest.mark.parametrize("shape", ["qwen3", "odd_interleave_norm", "partial_rotary"])
def test_kernel_other_launch_configs(monkeypatch, shape, per, warps):
    """Every q-heads-per-program / warps choice gives the same result (the grid's split is free to tune)."""
    monkeypatch.setattr(qp, "launch_config", lambda T, H: (per, warps))
    hq, hkv, d, rot, style, norm = SHAPES[shape]
    qkv, pos, cs, cache, slots, qw, kw = _case(5, hq, hkv, d, rot, norm, torch.float16, _KERNEL_DEVICE, seed=per)
    _run_and_check(qkv, pos, cs, cache, slots, qw, kw, hq, hkv, d, rot, style, _mode(torch.float16, norm))


@kernels_here
@pytest.mark.parametrize("offset,extra", [(32, 64), (3, 5)], ids=["aligned_stride", "odd_stride_and_offset"])
@pytest.mark.parametrize("shape", ["qwen3", "odd_interleave_norm", "llama8b"])
def test_kernel_strided_rows(shape, offset, extra):
    """qkv as a view of a wider tensor (row stride != width, storage offset): only the view's q/k change."""
    hq, hkv, d, rot, style, norm = SHAPES[shape]
    T, dtype = 37, torch.float16
    _, pos, cs, cache, slots, qw, kw = _case(T, hq, hkv, d, rot, norm, dtype, _KERNEL_DEVICE, seed=11)
    width = (hq + 2 * hkv) * d
    wide = _nonzero(T, width + offset + extra, dtype=dtype, device=_KERNEL_DEVICE)
    qkv = wide[:, offset:offset + width]
    assert qkv.stride(0) == width + offset + extra and qkv.storage_offset() == offset
    before = wide.clone()
    _run_and_check(qkv, pos, cs, cache, slots, qw, kw, hq, hkv, d, rot, style, _mode(dtype, norm))
    assert torch.equal(wide[:, :offset], before[:, :offset])
    assert torch.equal(wide[:, offset + width:], before[:, offset + width:])


@kernels_here
@pytest.mark.parametrize("norm", [False, True])
def test_kernel_cache_dtype_differs(norm):
    """A float32 cache gets the bf16 k and v widened, as write_kv does."""
    hq, hkv, d, rot = 16, 4, 128, 128
    qkv, pos, cs, cache, slots, qw, kw = _case(9, hq, hkv, d, rot, norm, torch.bfloat16, _KERNEL_DEVICE,
                                               cache_dtype=torch.float32, seed=5)
    _run_and_check(qkv, pos, cs, cache, slots, qw, kw, hq, hkv, d, rot, "neox", _mode(torch.bfloat16, norm))


@kernels_here
def test_kernel_int32_positions_and_slot_slices_and_empty():
    hq, hkv, d, rot, style, norm = SHAPES["qwen3"]
    qkv, pos, cs, cache, slots, qw, kw = _case(6, hq, hkv, d, rot, norm, torch.float16, _KERNEL_DEVICE, seed=2)
    pos_buf = torch.cat((pos.new_zeros(3), pos)).int()[3:]  # int32, at an offset of 12 bytes
    slot_buf = torch.cat((slots.new_zeros(1), slots))[1:]  # at an offset of 8 bytes
    _run_and_check(qkv, pos_buf, cs, cache, slot_buf, qw, kw, hq, hkv, d, rot, style, _mode(torch.float16, norm))
    q, k, v = qkv_prep_(qkv[:0], pos[:0], cs, style, rot, hq, hkv, d, cache, slots[:0], qw, kw)
    assert q.shape == (0, hq, d) and k.shape == (0, hkv, d) and v.shape == (0, hkv, d)


@pytest.mark.gpu
def test_no_recompile_across_steps():
    """Step sizes, positions, slots, row strides (multiples of 8) and buffer offsets reuse the binaries."""
    hq, hkv, d, rot, style, norm = SHAPES["qwen3"]
    label = "qkv_prep._qkv_prep_kernel"

    def step(T, extra, seed):
        qkv, pos, cs, cache, slots, qw, kw = _case(T, hq, hkv, d, rot, norm, torch.bfloat16, "cuda", seed=seed)
        wide = _nonzero(T, qkv.shape[1] + extra, device="cuda")
        pos2 = torch.cat((pos, pos))[T - 1:2 * T - 1]  # unaligned slices of longer buffers
        slots2 = torch.cat((slots, slots))[T - 1:2 * T - 1]
        qkv_prep_(wide[:, :qkv.shape[1]], pos2, cs, style, rot, hq, hkv, d, cache, slots2, qw, kw)

    for T in (1, 64):  # the binary (maybe compiled by an earlier test already)
        step(T, 0, T)
    torch.cuda.synchronize()
    n = compiled_variants_by_kernel().get(label, 0)
    assert n >= 1
    for i, T in enumerate((2, 3, 7, 33, 63, 65, 100, 257, 1000, 4097)):
        step(T, 8 * i, 100 + i)
    torch.cuda.synchronize()
    assert compiled_variants_by_kernel().get(label, 0) == n


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 24])
def test_cuda_graph_capture_and_replay(T):
    hq, hkv, d, rot, style, norm = SHAPES["qwen3"]
    qkv, pos, cs, cache, slots, qw, kw = _case(T, hq, hkv, d, rot, norm, torch.bfloat16, "cuda", seed=3)
    s_qkv, s_pos, s_slots, s_cache = qkv.clone(), pos.clone(), slots.clone(), cache.clone()
    qkv_prep_(s_qkv.clone(), s_pos, cs, style, rot, hq, hkv, d, s_cache.clone(), s_slots, qw, kw)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qkv_prep_(s_qkv, s_pos, cs, style, rot, hq, hkv, d, s_cache, s_slots, qw, kw)
    for seed in (7, 8):
        qkv2, pos2, _, cache2, slots2, _, _ = _case(T, hq, hkv, d, rot, norm, torch.bfloat16, "cuda", seed=seed)
        s_qkv.copy_(qkv2)
        s_pos.copy_(pos2)
        s_slots.copy_(slots2)
        s_cache.copy_(cache2)
        graph.replay()
        qkv_prep_ref(qkv2, pos2, cs, style, rot, hq, hkv, d, cache2, slots2, qw, kw)
        _assert_matches(s_qkv, qkv2, "flips")
        assert torch.equal(s_cache[1], cache2[1])
        _assert_matches(s_cache[0], cache2[0], "flips")
