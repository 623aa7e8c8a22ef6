"""MLA prologue in one launch (RoPE on q_rope / k_rope + latent-cache write) against the plain-torch reference.

The kernel tests run on CUDA, or on CPU through Triton's interpreter with TRITON_INTERPRET=1; else they skip.
Two kinds of inputs, both random and non-zero:
- "random": full-precision values. q and kv_a (RoPE'd in place) and the rotated k_rope in the cache must equal the
  reference (rotary_ref + write_mla_ref) bit for bit; the normalised latent within one rounding, since its float32
  sum of squares is taken in another order than torch's mean (as for write_mla's kernel). Also close to the
  two launches it replaces (rotary_embedding_ + write_mla): that rotary kernel contracts x1*c - x2*s into FMAs.
- "exact": small dyadic values (k / 2^n) and a dyadic cos/sin table, so that every float32 product and sum before a
  rounding point is exact whatever the order: then kernel == reference bit for bit, q, kv_a and the whole cache,
  which pins the rounding points (what is rounded to which dtype, and when).
q and kv_a are views of one [T, H*(Dn+R) + L + R] projection output, as the model produces them.
"""
import pytest
import torch

from fractal.errors import FractalError
from fractal.kernels._triton_support import INTERPRET, use_triton
from fractal.kernels.kv_write import write_mla
from fractal.kernels.mla_prep import mla_prep_, mla_prep_ref
from fractal.kernels.rotary import build_cos_sin_cache, rotary_embedding_

_KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
kernels_here = pytest.mark.skipif(_KERNEL_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")

V2_LITE = (16, 128, 64, 512)  # H, qk_nope_head_dim, qk_rope_head_dim, kv_lora_rank
V3 = (128, 128, 64, 512)
MAX_POS = 1 << 16
EPS = 1e-6
# 16-bit dtypes on CUDA; float32 in the interpreter (its float -> 16-bit casts truncate, torch rounds to nearest)
DTYPES = [torch.bfloat16, torch.float16] if _KERNEL_DEVICE == "cuda" else [torch.float32]


def _nonzero(*shape, generator, scale=1.0):
    """float32 values of random sign with magnitudes in [0.05, 1.05) * scale."""
    mag = 0.05 + torch.rand(*shape, generator=generator)
    sign = torch.where(torch.rand(*shape, generator=generator) < 0.5, -1.0, 1.0)
    return mag * sign * scale


def _dyadic(*shape, generator, bits):
    """Non-zero k / 2^bits with 1 <= |k| < 2^bits (exact in bf16, fp16, fp32)."""
    k = torch.randint(1, 1 << bits, shape, generator=generator).float()
    sign = torch.where(torch.rand(*shape, generator=generator) < 0.5, -1.0, 1.0)
    return k * sign / (1 << bits)


class Case:
    """Inputs of one call; run(fn) applies fn to fresh copies of the mutable tensors and returns (out, cache)."""

    def __init__(self, shape, T, dtype, device, style="interleave", exact=False, cache_dtype=None, seed=0,
                 num_slots=None, pad=0):
        H, Dn, R, L = shape
        g = torch.Generator().manual_seed(seed)
        self.shape, self.T, self.style = shape, T, style
        width = H * (Dn + R) + L + R + pad  # pad > 0: a wider row (another row stride), the last columns unused
        if exact:
            self.out = _dyadic(T, width, generator=g, bits=6).to(dtype)
            table = _dyadic(MAX_POS, R, generator=g, bits=7)  # any float32 table is a valid cos/sin cache
        else:
            self.out = _nonzero(T, width, generator=g, scale=2.0).to(dtype)
            inv_freq = 1.0 / (10000 ** (torch.arange(0, R, 2).float() / R))
            table = build_cos_sin_cache(inv_freq, MAX_POS, attention_scaling=1.1)
        self.out = self.out.to(device)
        self.cos_sin = table.to(device)
        # unsorted, large, with the table's ends
        pos = torch.randint(0, MAX_POS, (T,), generator=g)
        if T > 0:
            pos[0] = MAX_POS - 1
        if T > 2:
            pos[T // 2] = 0
        self.positions = pos.to(device)
        num_slots = num_slots or 16 * ((T + 40) // 16 + 1)
        self.cache = _nonzero(num_slots // 16, 16, L + R, generator=g, scale=3.0).to(cache_dtype or dtype).to(device)
        self.slots = torch.randperm(num_slots, generator=g)[:T].to(device)
        self.weight = (0.5 + torch.rand(L, generator=g)).to(dtype).to(device)

    def views(self, out):
        H, Dn, R, L = self.shape
        return out[:, :H * (Dn + R)].view(self.T, H, Dn + R), out[:, H * (Dn + R):H * (Dn + R) + L + R]

    def run(self, fn):
        out, cache = self.out.clone(), self.cache.clone()
        q, kv_a = self.views(out)
        if self.T > 1:  # (at T = 1 torch gives the size-1 dim another stride, as in the model)
            assert q.stride() == (out.shape[1], q.shape[2], 1) and kv_a.stride() == (out.shape[1], 1)
        fn(q, kv_a, self.positions, self.cos_sin, self.style, self.weight, EPS, cache, self.slots)
        return out, cache


def two_step(q, kv_a, positions, cos_sin, style, weight, eps, cache, slots):
    """What MLAttention.forward runs today: rotary_embedding_ on the views, then write_mla."""
    R = cos_sin.shape[-1]
    L = weight.shape[0]
    rotary_embedding_(positions, q[..., q.shape[-1] - R:], kv_a[:, None, L:], cos_sin, style)
    write_mla(cache, kv_a[:, :L], weight, eps, kv_a[:, L:], slots)


def _assert_untouched(case, cache):
    flat, before = cache.flatten(0, 1), case.cache.flatten(0, 1)
    keep = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
    keep[case.slots] = False
    assert torch.equal(flat[keep], before[keep])


def _assert_close(got, want, dtype):
    """Within one rounding of dtype, twice (y may round to a neighbour, then y * weight rounds again)."""
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -23}[dtype]
    diff = (got.float() - want.float()).abs()
    assert (diff <= 2 * ulp * want.float().abs() + 1e-6).all(), diff.max().item()


def check_random(case, out, cache):
    """Random inputs: q, kv_a and the cached k_rope bitwise the reference's, the cached latent within one rounding
    (rarely off for 16-bit dtypes); close to the two-step kernels; rows of other slots untouched."""
    H, Dn, R, L = case.shape
    out_ref, cache_ref = case.run(mla_prep_ref)
    assert torch.equal(out, out_ref)  # q_nope and the latent untouched, q_rope and k_rope rotated
    assert torch.equal(cache[..., L:], cache_ref[..., L:])
    _assert_untouched(case, cache)
    lat, lat_ref = cache.flatten(0, 1)[case.slots, :L], cache_ref.flatten(0, 1)[case.slots, :L]
    _assert_close(lat, lat_ref, case.out.dtype)
    if case.out.dtype != torch.float32 and case.T > 0:
        assert (lat != lat_ref).float().mean().item() <= 1e-3
    out2, cache2 = case.run(two_step)
    _assert_close(out, out2, case.out.dtype)
    _assert_close(cache.flatten(0, 1)[case.slots], cache2.flatten(0, 1)[case.slots], case.out.dtype)


def check_exact(case, out, cache):
    """Exact inputs: everything bitwise the reference's."""
    out_ref, cache_ref = case.run(mla_prep_ref)
    assert torch.equal(out, out_ref)
    assert torch.equal(cache, cache_ref)
    _assert_untouched(case, cache)
    if case.T > 0:
        assert not torch.equal(out, case.out)  # something rotated


# ----------------------------------------------------------------------------------------------- any machine

def test_reference_equals_two_step_references():
    """mla_prep_ref is rotary_ref + write_mla_ref: on CPU without the interpreter, the two-step path is that."""
    case = Case((4, 32, 16, 64), 9, torch.float32, "cpu", seed=1)
    out_ref, cache_ref = case.run(mla_prep_ref)
    if not use_triton(case.out):
        out2, cache2 = case.run(two_step)
        assert torch.equal(out_ref, out2) and torch.equal(cache_ref, cache2)
    H, Dn, R, L = case.shape
    q, kv_a = case.views(out_ref)
    q0, kv0 = case.views(case.out)
    assert not torch.equal(q[..., Dn:], q0[..., Dn:]) and torch.equal(q[..., :Dn], q0[..., :Dn])
    assert not torch.equal(kv_a[:, L:], kv0[:, L:]) and torch.equal(kv_a[:, :L], kv0[:, :L])
    assert torch.equal(cache_ref.flatten(0, 1)[case.slots, L:], kv_a[:, L:])
    _assert_untouched(case, cache_ref)


@pytest.mark.parametrize("style", ["interleave", "neox"])
def test_cpu_without_interpreter_uses_reference(style):
    case = Case((4, 32, 16, 64), 5, torch.bfloat16, "cpu", style=style, seed=2)
    if use_triton(case.out):
        pytest.skip("TRITON_INTERPRET=1: CPU tensors go to the kernel")
    out, cache = case.run(mla_prep_)
    out_ref, cache_ref = case.run(mla_prep_ref)
    assert torch.equal(out, out_ref) and torch.equal(cache, cache_ref)


def test_shape_errors():
    case = Case((4, 32, 16, 64), 3, torch.float32, "cpu")
    q, kv_a = case.views(case.out.clone())
    args = dict(positions=case.positions, cos_sin_cache=case.cos_sin, style="interleave", kv_norm_weight=case.weight,
                eps=EPS, kv_cache=case.cache.clone(), slot_mapping=case.slots)
    for fn in (mla_prep_, mla_prep_ref):
        with pytest.raises(FractalError):
            fn(q, kv_a, **{**args, "style": "gptj"})
        with pytest.raises(FractalError):
            fn(q, kv_a, **{**args, "cos_sin_cache": case.cos_sin[:, :8]})  # rotary_dim != R
        with pytest.raises(FractalError):
            fn(q, kv_a, **{**args, "kv_cache": case.cache[..., :-2].clone()})
        with pytest.raises(FractalError):
            fn(q, kv_a[:2], **args)
        with pytest.raises(FractalError):
            fn(q, kv_a, **{**args, "slot_mapping": case.slots[:2]})


# ------------------------------------------------------------------------------- the kernel (CUDA / interpreter)

@kernels_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 64, 300])
@pytest.mark.parametrize("shape", [V2_LITE, V3], ids=["v2lite", "v3"])
def test_kernel_random_inputs(shape, T, dtype):
    case = Case(shape, T, dtype, _KERNEL_DEVICE, seed=T + shape[0])
    check_random(case, *case.run(mla_prep_))


@kernels_here
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 3, 64, 300])
@pytest.mark.parametrize("shape", [V2_LITE, V3], ids=["v2lite", "v3"])
def test_kernel_exact_inputs_bitwise(shape, T, dtype):
    case = Case(shape, T, dtype, _KERNEL_DEVICE, exact=True, seed=100 + T + shape[0])
    check_exact(case, *case.run(mla_prep_))


# (exact cases keep L a power of two: torch's CUDA mean multiplies by 1/L, the kernel divides by L)
ODD = [((5, 32, 24, 96), 11, False), ((5, 32, 24, 64), 11, True), ((3, 16, 8, 40), 4, False),
       ((3, 16, 8, 32), 4, True), ((1, 0, 64, 512), 7, True), ((1, 0, 64, 512), 7, False)]


@kernels_here
@pytest.mark.parametrize("style", ["interleave", "neox"])
@pytest.mark.parametrize("shape,T,exact", [(V2_LITE, 37, False), (V2_LITE, 37, True)] + ODD)
def test_kernel_styles_and_odd_sizes(style, shape, T, exact):
    """neox and interleave; sizes that are not powers of two (5 heads; R = 24, 8 so half = 12, 4: the two-load path
    of interleave; L = 96, 40), one head, no q_nope."""
    case = Case(shape, T, DTYPES[0], _KERNEL_DEVICE, style=style, exact=exact, seed=7 + T)
    (check_exact if exact else check_random)(case, *case.run(mla_prep_))


@kernels_here
@pytest.mark.parametrize("exact", [False, True])
def test_kernel_wider_cache_dtype(exact):
    """A cache dtype wider than the inputs: the latent and k_rope are rounded to the input dtype first."""
    dtype = torch.bfloat16 if _KERNEL_DEVICE == "cuda" else torch.float32
    cache_dtype = torch.float32 if _KERNEL_DEVICE == "cuda" else torch.float64
    case = Case(V2_LITE, 33, dtype, _KERNEL_DEVICE, exact=exact, cache_dtype=cache_dtype, seed=5)
    (check_exact if exact else check_random)(case, *case.run(mla_prep_))


@kernels_here
def test_kernel_slots_strides_and_empty_batch():
    """Every slot is written as write_mla writes it (slot 0 and the last one included); wider rows (row strides not
    a multiple of 16 bytes too); T = 0 is a no-op."""
    case = Case(V2_LITE, 6, DTYPES[0], _KERNEL_DEVICE, seed=9, num_slots=64)
    case.slots = torch.tensor([63, 0, 17, 3, 40, 62], device=_KERNEL_DEVICE)
    check_random(case, *case.run(mla_prep_))
    for pad in (8, 3, 1):
        for exact in (False, True):
            case = Case(V2_LITE, 5, DTYPES[0], _KERNEL_DEVICE, seed=pad, exact=exact, pad=pad)
            (check_exact if exact else check_random)(case, *case.run(mla_prep_))
    empty = Case(V2_LITE, 0, DTYPES[0], _KERNEL_DEVICE, seed=10)
    out, cache = empty.run(mla_prep_)
    assert torch.equal(cache, empty.cache)


@kernels_here
def test_kernel_other_layouts_take_the_reference():
    """A non-contiguous cache is not the kernel's layout: the reference runs (the same numbers)."""
    case = Case(V2_LITE, 5, DTYPES[0], _KERNEL_DEVICE, seed=11)
    H, Dn, R, L = case.shape
    big = torch.zeros(case.cache.shape[0], 16, L + R + 8, dtype=case.cache.dtype, device=_KERNEL_DEVICE)
    results = []
    for fn in (mla_prep_, mla_prep_ref):
        out = case.out.clone()
        big.zero_()
        strided = big[..., :L + R]
        strided.copy_(case.cache)
        q, kv_a = case.views(out)
        fn(q, kv_a, case.positions, case.cos_sin, case.style, case.weight, EPS, strided, case.slots)
        results.append((out, big.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


# ------------------------------------------------------------------------------------------------- GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("shape", [V2_LITE, V3], ids=["v2lite", "v3"])
def test_cuda_graph_replay(shape):
    """Captured once, replayed with new values in the static inputs: the same as eager calls."""
    T = 8
    static = Case(shape, T, torch.bfloat16, "cuda", seed=20)
    out, cache = static.out.clone(), static.cache.clone()
    pos, slots = static.positions.clone(), static.slots.clone()
    q, kv_a = static.views(out)
    args = (q, kv_a, pos, static.cos_sin, static.style, static.weight, EPS, cache, slots)
    mla_prep_(*args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mla_prep_(*args)
    for seed in (21, 22):
        new = Case(shape, T, torch.bfloat16, "cuda", seed=seed)
        new.cos_sin, new.weight = static.cos_sin, static.weight
        out.copy_(new.out)
        cache.copy_(new.cache)
        pos.copy_(new.positions)
        slots.copy_(new.slots)
        graph.replay()
        torch.cuda.synchronize()
        out2, cache2 = new.run(mla_prep_)
        assert torch.equal(out, out2) and torch.equal(cache, cache2)
        check_random(new, out, cache)


@pytest.mark.gpu
def test_no_recompile_across_steps():
    """One binary per model shape and dtype: step sizes, positions, slots (unaligned slices of longer buffers) and
    row strides (multiples of 16 bytes) reuse it."""
    from fractal.kernels._triton_support import compiled_variants_by_kernel

    label = "mla_prep._mla_prep_kernel"

    def step(T, pad, seed):
        case = Case(V2_LITE, T, torch.bfloat16, "cuda", seed=seed, pad=pad)
        case.positions = torch.cat((case.positions, case.positions))[T - 1:2 * T - 1]
        case.slots = torch.cat((case.slots, case.slots))[T - 1:2 * T - 1]
        check_random(case, *case.run(mla_prep_))

    for T in (1, 64):
        step(T, 0, T)
    torch.cuda.synchronize()
    n = compiled_variants_by_kernel().get(label, 0)
    assert n >= 1
    for i, T in enumerate((2, 3, 7, 33, 300, 1000)):
        step(T, 8 * i, 100 + i)
    torch.cuda.synchronize()
    assert compiled_variants_by_kernel().get(label, 0) == n
