"""Fused add + RMSNorm: the reference against a per-row loop (CPU), the Triton kernel against the reference (GPU)."""
import math

import pytest
import torch

from fractal.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref


def _naive_row(x_row, r_row, w, eps):
    s = [float(torch.tensor(a + b, dtype=torch.bfloat16)) for a, b in zip(x_row, r_row)]
    inv = 1.0 / math.sqrt(sum(v * v for v in s) / len(s) + eps)
    return [float(torch.tensor(v * inv, dtype=torch.bfloat16)) * wi for v, wi in zip(s, w)], s


def test_rmsnorm_reference_matches_loop():
    torch.manual_seed(0)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    r = torch.randn(3, 16, dtype=torch.bfloat16)
    w = torch.rand(16, dtype=torch.bfloat16) + 0.5
    out, res = fused_add_rms_norm_ref(x, r, w, 1e-6)
    for i in range(3):
        want, s = _naive_row(x[i].float().tolist(), r[i].float().tolist(), w.float().tolist(), 1e-6)
        torch.testing.assert_close(res[i].float(), torch.tensor(s), rtol=0, atol=0)
        torch.testing.assert_close(out[i].float(), torch.tensor(want), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(rms_norm_ref(res, w, 1e-6), out, rtol=0, atol=0)


def _poison(shape_numel, device):
    """Leave NaN in the allocator's cache so that a kernel's fresh output starts poisoned."""
    buf = torch.full((shape_numel * 4,), float("nan"), dtype=torch.bfloat16, device=device)
    del buf


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden", [(1, 2048), (7, 4096), (300, 2048), (33, 512), (5, 1000)])
def test_fused_add_rmsnorm_gpu(rows, hidden):
    torch.manual_seed(rows)
    x = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda")
    r = torch.randn(rows, hidden, dtype=torch.bfloat16, device="cuda")
    w = (torch.rand(hidden, device="cuda") + 0.5).to(torch.bfloat16)
    _poison(rows * hidden, "cuda")
    out, res = fused_add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_res = fused_add_rms_norm_ref(x, r, w, 1e-6)
    assert not out.isnan().any() and not res.isnan().any()
    torch.testing.assert_close(res, ref_res, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_rmsnorm_strided_rows_gpu():
    torch.manual_seed(1)
    wide = torch.randn(9, 576, dtype=torch.bfloat16, device="cuda")
    x = wide[:, :512]  # MLA's kv_a output: normalise the latent part only
    w = (torch.rand(512, device="cuda") + 0.5).to(torch.bfloat16)
    _poison(9 * 512, "cuda")
    out = rms_norm(x, w, 1e-6)
    assert not out.isnan().any()
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-6), rtol=1e-2, atol=1e-2)
