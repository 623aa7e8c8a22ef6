"""Fused MoE routing: the reference against a per-token loop (CPU), the Triton kernel against the reference (GPU)."""
import math

import pytest
import torch

from fractal.kernels.moe_routing import RoutingConfig, route, route_ref

CONFIGS = {
    # name: (num_experts, cfg, with_bias)
    "qwen3_moe": (128, RoutingConfig(top_k=8, renormalize=True), False),
    "deepseek_v2_lite": (64, RoutingConfig(top_k=6), False),
    "deepseek_v2_groups": (160, RoutingConfig(top_k=6, n_group=8, topk_group=3, routed_scaling_factor=16.0), False),
    "deepseek_v3": (256, RoutingConfig(top_k=8, scoring="sigmoid", n_group=8, topk_group=4, renormalize=True,
                                       routed_scaling_factor=2.5), True),
    "mixtral": (8, RoutingConfig(top_k=2, renormalize=True), False),
}


def _naive(logits_row, cfg, bias):
    E = len(logits_row)
    if cfg.scoring == "softmax":
        m = max(logits_row)
        ex = [math.exp(x - m) for x in logits_row]
        scores = [v / sum(ex) for v in ex]
    else:
        scores = [1 / (1 + math.exp(-x)) for x in logits_row]
    choice = [s + (bias[i] if bias is not None else 0.0) for i, s in enumerate(scores)]
    allowed = set(range(E))
    if cfg.n_group > 1:
        gs = E // cfg.n_group
        gscores = []
        for g in range(cfg.n_group):
            vals = sorted(choice[g * gs:(g + 1) * gs], reverse=True)
            gscores.append(vals[0] + vals[1] if bias is not None else vals[0])
        keep = sorted(range(cfg.n_group), key=lambda g: -gscores[g])[: cfg.topk_group]
        allowed = {e for e in range(E) if e // gs in keep}
    ids = sorted(allowed, key=lambda e: -choice[e])[: cfg.top_k]
    w = [scores[e] for e in ids]
    if cfg.renormalize:
        w = [v / (sum(w) + 1e-20) for v in w]
    return [v * cfg.routed_scaling_factor for v in w], ids


def _inputs(name, tokens, device):
    E, cfg, with_bias = CONFIGS[name]
    logits = torch.randn(tokens, E, device=device) * 2
    bias = torch.randn(E, device=device) * 0.1 if with_bias else None
    return logits, cfg, bias


def _sorted_pairs(w, ids):
    order = ids.argsort(dim=-1)
    return w.gather(1, order), ids.gather(1, order)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_route_reference_matches_loop(name):
    torch.manual_seed(0)
    logits, cfg, bias = _inputs(name, 4, "cpu")
    w, ids = route_ref(logits, cfg, bias)
    assert w.dtype == torch.float32 and ids.dtype == torch.int32
    for t in range(4):
        want_w, want_ids = _naive(logits[t].double().tolist(), cfg, None if bias is None else bias.double().tolist())
        assert ids[t].tolist() == want_ids
        torch.testing.assert_close(w[t].double(), torch.tensor(want_w, dtype=torch.float64), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tokens", [1, 37, 1024])
def test_route_gpu(name, tokens):
    torch.manual_seed(tokens)
    logits, cfg, bias = _inputs(name, tokens, "cuda")
    logits = logits.to(torch.bfloat16)
    torch.full((tokens * 64,), float("nan"), device="cuda")  # poison the allocator's cache
    w, ids = route(logits, cfg, bias)
    w_ref, ids_ref = route_ref(logits, cfg, bias)
    assert not w.isnan().any()
    w, ids = _sorted_pairs(w, ids.long())
    w_ref, ids_ref = _sorted_pairs(w_ref, ids_ref.long())
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-6)
