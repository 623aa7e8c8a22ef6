"""Routed experts: the reference against a per-token loop (CPU), both fast backends against it (GPU)."""
import pytest
import torch
import torch.nn.functional as F

from fractal.kernels.moe_experts import BACKENDS, fused_experts, fused_experts_ref, moe_align


def _naive(hidden, w13, w2, weights, ids):
    I = w2.shape[2]
    out = torch.zeros(hidden.shape, dtype=torch.float64)
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13[e].double() @ hidden[t].double()
            a = F.silu(h[:I]) * h[I:]
            out[t] += float(weights[t, j]) * (w2[e].double() @ a)
    return out


def _inputs(T, E, H, I, k, device, dtype, skew=False):
    hidden = torch.randn(T, H, device=device).to(dtype)
    w13 = (torch.randn(E, 2 * I, H, device=device) / H ** 0.5).to(dtype)
    w2 = (torch.randn(E, H, I, device=device) / I ** 0.5).to(dtype)
    if skew:  # most pairs on expert 1, many experts get nothing
        ids = torch.ones(T, k, dtype=torch.int32, device=device)
        ids[:, 1:] = torch.randint(0, 3, (T, k - 1), device=device, dtype=torch.int32) + 2
    else:
        ids = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(T)]).to(torch.int32)
    weights = torch.rand(T, k, device=device)
    return hidden, w13, w2, weights, ids


def test_experts_reference_matches_loop():
    torch.manual_seed(0)
    args = _inputs(5, 4, 8, 6, 2, "cpu", torch.float32)
    torch.testing.assert_close(fused_experts_ref(*args).double(), _naive(*args), rtol=1e-4, atol=1e-4)


def test_moe_align_groups_rows_by_expert():
    torch.manual_seed(1)
    ids = torch.randint(0, 5, (7, 3), dtype=torch.int32)
    sorted_ids, block_expert = moe_align(ids, 5, 4)
    n = ids.numel()
    flat = ids.reshape(-1)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        rows = [r for r in sorted_ids[b * 4:(b + 1) * 4].tolist() if r < n]
        if e >= 5:
            assert rows == []
        assert all(int(flat[r]) == e for r in rows)
        seen += rows
    assert sorted(seen) == list(range(n))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,E,H,I,k,skew", [(1, 64, 2048, 1408, 6, False), (5, 8, 256, 128, 2, False),
                                            (64, 128, 2048, 768, 8, False), (700, 64, 1024, 512, 6, False),
                                            (300, 16, 512, 256, 4, True)])
def test_experts_gpu(backend, T, E, H, I, k, skew):
    torch.manual_seed(T)
    args = _inputs(T, E, H, I, k, "cuda", torch.bfloat16, skew)
    torch.full((T * H * k * 2,), float("nan"), dtype=torch.bfloat16, device="cuda")  # poison the cache
    out = fused_experts(*args, backend=backend)
    ref = fused_experts_ref(*args)
    assert out.shape == ref.shape and not out.isnan().any()
    assert _rel(out, ref) < 1e-2


def test_experts_with_shared_reference_on_cpu():
    """CPU: fused_experts(shared=..., add=...) equals routed reference + the shared gated MLP (+ add)."""
    torch.manual_seed(3)
    hidden, w13, w2, weights, ids = _inputs(4, 6, 16, 8, 2, "cpu", torch.float32)
    s13, s2 = torch.randn(32, 16) / 4, torch.randn(16, 16) / 4
    extra = torch.randn(4, 16)
    want = fused_experts_ref(hidden, w13, w2, weights, ids).double()
    sh = (F.silu(hidden.double() @ s13[:16].double().t()) * (hidden.double() @ s13[16:].double().t())) @ s2.double().t()
    got = fused_experts(hidden, w13, w2, weights, ids, shared=(s13, s2), add=extra)
    torch.testing.assert_close(got.double(), want + sh + extra.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("T,E,H,I,k,ns", [(1, 64, 2048, 1408, 6, 2), (3, 8, 256, 128, 2, 1), (8, 16, 512, 64, 4, 3)])
def test_experts_gemv_with_shared_gpu(T, E, H, I, k, ns):
    """Shared expert as ns pseudo-experts inside the gemv launches, against routed ref + a plain gated MLP."""
    torch.manual_seed(T + ns)
    hidden, w13, w2, weights, ids = _inputs(T, E, H, I, k, "cuda", torch.bfloat16)
    s13 = (torch.randn(2 * ns * I, H, device="cuda") / H ** 0.5).to(torch.bfloat16)
    s2 = (torch.randn(H, ns * I, device="cuda") / (ns * I) ** 0.5).to(torch.bfloat16)
    out = fused_experts(hidden, w13, w2, weights, ids, backend="gemv", shared=(s13, s2))
    ref = fused_experts_ref(hidden, w13, w2, weights, ids) + F.linear(
        F.silu(F.linear(hidden, s13[: ns * I])) * F.linear(hidden, s13[ns * I:]), s2)
    assert not out.isnan().any() and _rel(out, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_experts_add_gpu(backend):
    """add= is summed in the combine kernel: routed (rounded) + add, as `out + shared(x)` rounds."""
    torch.manual_seed(11)
    args = _inputs(40, 16, 512, 256, 4, "cuda", torch.bfloat16)
    extra = torch.randn(40, 512, device="cuda").to(torch.bfloat16)
    out = fused_experts(*args, backend=backend, add=extra)
    assert _rel(out, fused_experts_ref(*args) + extra) < 1e-2


# --- round 3: two-launch alignment + fused gate/up(SiLU) GEMM (moe_fused_gemm) -----------------------------
from fractal.kernels._triton_support import INTERPRET  # noqa: E402
from fractal.kernels.moe_fused_gemm import fused_moe_mlp, moe_align_ref, moe_align_triton, num_blocks  # noqa: E402

_KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
kernels_here = pytest.mark.skipif(_KERNEL_DEVICE is None, reason="needs CUDA or TRITON_INTERPRET=1")


def _skewed_ids(T, E, k, device):
    """Distinct experts per token drawn from a skewed distribution: many experts get no pair at all."""
    p = torch.rand(T, E, device=device) * torch.linspace(0.05, 1.0, E, device=device) ** 4
    return p.topk(k, dim=-1).indices.to(torch.int32)


def test_moe_align_ref_block_bound_and_padding():
    """CPU: sorted_ids length is num_blocks * block_m, every pair once in its expert's blocks, padding = n."""
    torch.manual_seed(2)
    for T, E, k, bm in ((1, 64, 6, 16), (37, 16, 4, 16), (200, 64, 6, 32), (50, 8, 2, 64)):
        ids = _skewed_ids(T, E, k, "cpu")
        s, be = moe_align_ref(ids, E, bm)
        n = ids.numel()
        assert s.numel() == num_blocks(n, E, bm) * bm == be.numel() * bm
        counts = torch.bincount(ids.reshape(-1).long(), minlength=E)
        assert int(((counts + bm - 1) // bm).sum()) <= be.numel()
        rows = s[s < n]
        assert sorted(rows.tolist()) == list(range(n))
        blk = torch.arange(s.numel()) // bm
        assert (ids.reshape(-1)[rows.long()] == be[blk[s < n]]).all()


@kernels_here
@pytest.mark.parametrize("T,E,k,bm", [(1, 64, 6, 16), (5, 8, 2, 16), (64, 64, 6, 16), (256, 64, 6, 32),
                                      (64, 128, 8, 16), (300, 128, 8, 32), (700, 64, 6, 64), (33, 256, 8, 16)])
def test_moe_align_triton_matches_ref(T, E, k, bm):
    """The two-launch alignment equals the torch reference exactly (stable order, padding, block experts)."""
    torch.manual_seed(T * 7 + E)
    ids = _skewed_ids(T, E, k, _KERNEL_DEVICE)
    s, be = moe_align_triton(ids, E, bm)
    s_ref, be_ref = moe_align_ref(ids, E, bm)
    assert torch.equal(s.cpu(), s_ref.cpu()) and torch.equal(be.cpu(), be_ref.cpu())


@kernels_here
@pytest.mark.parametrize("T,E,H,I,k,skew", [(3, 8, 64, 32, 2, False), (40, 16, 128, 64, 4, True),
                                            (20, 32, 96, 48, 6, False)])
def test_fused_moe_mlp_matches_loop(T, E, H, I, k, skew):
    """Unweighted per-pair expert outputs (gate/up + SiLU fused, down) against a float64 loop; odd N/K tails."""
    torch.manual_seed(T + E)
    dt = torch.bfloat16 if _KERNEL_DEVICE == "cuda" else torch.float32
    hidden, w13, w2, weights, ids = _inputs(T, E, H, I, k, _KERNEL_DEVICE, dt, skew)
    y = torch.full((T * k, H), float("nan"), dtype=dt, device=_KERNEL_DEVICE)
    y = fused_moe_mlp(hidden, w13, w2, ids, gate_up_config=(32, 32, 4, 2), down_config=(32, 32, 4, 2))
    want = torch.zeros(T * k, H, dtype=torch.float64)
    for p in range(T * k):
        e = int(ids.reshape(-1)[p])
        h = w13[e].double().cpu() @ hidden[p // k].double().cpu()
        want[p] = w2[e].double().cpu() @ (F.silu(h[:I]) * h[I:])
    assert not y.isnan().any() and _rel(y.cpu(), want) < (1e-2 if dt == torch.bfloat16 else 1e-3)


@kernels_here
def test_triton_backend_matches_reference_with_add():
    torch.manual_seed(5)
    dt = torch.bfloat16 if _KERNEL_DEVICE == "cuda" else torch.float32
    args = _inputs(24, 16, 64, 32, 4, _KERNEL_DEVICE, dt, skew=True)
    extra = torch.randn(24, 64, device=_KERNEL_DEVICE).to(dt)
    out = fused_experts(*args, backend="triton", add=extra)
    ref = fused_experts_ref(*[a.cpu() for a in args]) + extra.cpu()
    assert _rel(out.cpu(), ref) < (1e-2 if dt == torch.bfloat16 else 1e-3)


# --- round 4: large-T config (128-row blocks, 8 warps, GROUP_M swizzle) -----------------------------------
from fractal.kernels import moe_experts as _moe_experts  # noqa: E402
from fractal.kernels.moe_fused_gemm import (LARGE_BLOCK_M, MID64_DOWN_CONFIG, MID64_GATE_UP_CONFIG,  # noqa: E402
                                            launch_configs)


def _pair_outputs_ref(hidden, w13, w2, ids):
    k = ids.shape[1]
    I = w2.shape[2]
    want = torch.zeros(ids.numel(), w2.shape[1], dtype=torch.float64)
    for p in range(ids.numel()):
        e = int(ids.reshape(-1)[p])
        h = w13[e].double().cpu() @ hidden[p // k].double().cpu()
        want[p] = w2[e].double().cpu() @ (F.silu(h[:I]) * h[I:])
    return want


@kernels_here
@pytest.mark.parametrize("bm,gu,dn,gm", [(128, (64, 64, 8, 3), (128, 64, 8, 3), 8),
                                         (128, (128, 64, 8, 3), (256, 64, 8, 3), 8),
                                         (64, (128, 64, 8, 3), (128, 64, 4, 4), 8),
                                         (64, (64, 128, 4, 4), (64, 64, 4, 3), 0),  # the 64-row mid configs
                                         (64, (64, 128, 4, 4), (64, 64, 4, 3), 1),  # ... expert-major order
                                         (16, (32, 32, 4, 2), (32, 32, 4, 2), 3),   # partial last group
                                         (16, (32, 32, 4, 2), (32, 32, 4, 2), 1)])
def test_fused_moe_mlp_large_configs_and_swizzle(bm, gu, dn, gm):
    """Large blocks and the GROUP_M tile order give every pair its expert's output (float64 loop reference)."""
    torch.manual_seed(bm + gm)
    dt = torch.bfloat16 if _KERNEL_DEVICE == "cuda" else torch.float32
    hidden, w13, w2, weights, ids = _inputs(40, 4, 96, 80, 2, _KERNEL_DEVICE, dt)
    y = fused_moe_mlp(hidden, w13, w2, ids, block_m=bm, gate_up_config=gu, down_config=dn, group_m=gm)
    assert _rel(y.cpu(), _pair_outputs_ref(hidden, w13, w2, ids)) < (1e-2 if dt == torch.bfloat16 else 1e-3)


def test_launch_configs_pick_large_blocks_by_rows_per_expert():
    assert launch_configs(64 * 6 * 256, 64)[0] == LARGE_BLOCK_M
    assert launch_configs(1536, 64)[0] == 32
    assert launch_configs(64 * 6 * 32, 64)[1] != launch_configs(64 * 6 * 128, 64)[1]   # 192 vs 768 rows/expert
    # round 9: the expert-major tile order at every size
    assert {launch_configs(n, 64)[3] for n in (6, 384, 1536, 3072, 64 * 6 * 32, 64 * 6 * 256)} == {1}


def test_block_m_by_rows_per_expert():
    """Round 9's thresholds: 16-row blocks up to 12 mean rows per expert, 32 up to 24, 64 up to 48, then 128."""
    assert launch_configs(64 * 12, 64)[0] == 16 and launch_configs(128 * 13, 128)[0] == 32
    assert launch_configs(64 * 24, 64)[0] == 32 and launch_configs(64 * 24 + 1, 64)[0] == 64
    assert launch_configs(128 * 48, 128)[0] == 64 and launch_configs(128 * 48 + 1, 128)[0] == LARGE_BLOCK_M
    assert launch_configs(64 * 48, 64)[1:] == (MID64_GATE_UP_CONFIG, MID64_DOWN_CONFIG, 1)


@kernels_here
def test_triton_backend_large_default_config(monkeypatch):
    """fused_experts picks the triton backend past grouped_mm's range when TRITON_LARGE_MIN_PAIRS says so, and
    its large config (mean 100 pairs per expert -> 128-row blocks) matches the reference."""
    monkeypatch.setattr(_moe_experts, "TRITON_LARGE_MIN_PAIRS", 400)
    monkeypatch.setattr(_moe_experts, "TRITON_MAX_PAIRS", 100)
    assert _moe_experts.default_backend(400) == "triton" and _moe_experts.default_backend(399) == "grouped_mm"
    torch.manual_seed(9)
    dt = torch.bfloat16 if _KERNEL_DEVICE == "cuda" else torch.float32
    args = _inputs(100, 4, 64, 48, 4, _KERNEL_DEVICE, dt)
    assert launch_configs(400, 4)[0] == LARGE_BLOCK_M
    out = fused_experts(*args, backend="triton")
    assert _rel(out.cpu(), fused_experts_ref(*[a.cpu() for a in args])) < (1e-2 if dt == torch.bfloat16 else 1e-3)


@kernels_here
@pytest.mark.parametrize("T,E,H,I,k,ns", [(1, 8, 200, 72, 2, 2), (3, 6, 1100, 40, 3, 0), (2, 4, 64, 24, 2, 1)])
def test_gemv_unrolled_matches_reference(T, E, H, I, k, ns):
    """The gemv kernels (reduction length unrolled at compile time, masked tails where H or I is not a multiple of
    the tile) against the routed reference plus the shared gated MLP."""
    torch.manual_seed(T * 10 + ns)
    dev = _KERNEL_DEVICE
    hidden, w13, w2, weights, ids = _inputs(T, E, H, I, k, dev, torch.float32)
    shared = None
    ref = fused_experts_ref(hidden, w13, w2, weights, ids)
    if ns:
        s13, s2 = torch.randn(2 * ns * I, H, device=dev) / H ** 0.5, torch.randn(H, ns * I, device=dev) / (ns * I) ** 0.5
        shared = (s13, s2)
        ref = ref + F.linear(F.silu(F.linear(hidden, s13[: ns * I])) * F.linear(hidden, s13[ns * I:]), s2)
    out = fused_experts(hidden, w13, w2, weights, ids, backend="gemv", shared=shared)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
