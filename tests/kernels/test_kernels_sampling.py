"""Device sampling: the vectorised rule against a row loop with the same noise (CPU and GPU), plus a
hand-worked top-k / top-p case and the empirical distribution."""
import pytest
import torch

from fractal.kernels.sampling import sample, sample_ref


def _params(B, V, device):
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.9, 0.5][:B], device=device)
    top_k = torch.tensor([0, 5, 0, 20, V, 1][:B], device=device, dtype=torch.int32)
    top_p = torch.tensor([1.0, 1.0, 0.8, 0.5, 0.95, 1.0][:B], device=device)
    return temperature, top_k, top_p


def test_sample_matches_row_loop_cpu():
    torch.manual_seed(0)
    B, V = 6, 50
    logits = torch.randn(B, V) * 3
    noise = torch.empty(B, V).exponential_()
    args = _params(B, V, "cpu")
    assert torch.equal(sample(logits, *args, noise=noise), sample_ref(logits, *args, noise))


def test_sample_hand_worked_cut():
    # probs of [3, 2, 1, 0] logits at T=1 are about [.64, .24, .09, .03]: top_p 0.7 keeps tokens 0 and 1
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    noise = torch.tensor([[10.0, 1e-3, 1e-9, 1e-9]])  # tokens 2 and 3 would win the race if they were kept
    t, k, p = torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.7])
    assert sample(logits, t, k, p, noise=noise).tolist() == [1]
    assert sample(logits, t, torch.tensor([1]), torch.tensor([1.0]), noise=noise).tolist() == [0]


def test_sample_distribution_cpu():
    torch.manual_seed(1)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).repeat(4000, 1)
    t = torch.ones(4000)
    ids = sample(logits, t, torch.zeros(4000, dtype=torch.int32), torch.ones(4000))
    freq = torch.bincount(ids, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.03, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("max_top_k", [None, 64])
def test_sample_gpu(max_top_k):
    torch.manual_seed(2)
    B, V = 6, 151936
    logits = torch.randn(B, V, device="cuda") * 3
    noise = torch.empty(B, V, device="cuda").exponential_()
    t, k, p = _params(B, V, "cuda")
    if max_top_k is not None:  # every row then needs a top_k <= max_top_k
        k = torch.tensor([64, 5, 64, 20, 33, 1], device="cuda", dtype=torch.int32)
    got = sample(logits, t, k, p, noise=noise, max_top_k=max_top_k)
    assert torch.equal(got, sample_ref(logits, t, k, p, noise))
