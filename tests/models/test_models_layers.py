"""Layer-level checks against independent references: HF's RoPE init functions and routers, SDPA, dense MoE."""
import random

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from fractal.errors import FractalError
from fractal.layers.attention_backends import get_attention_backend
from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.moe import MoEConfig, get_moe_backend
from fractal.models.config import parse_model_config
from fractal.models.testing import tiny_hf_config

ROPE_CASES = [
    ("llama", dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=8192)),
    ("llama", dict(rope_type="linear", rope_theta=10000.0, factor=2.0)),
    ("deepseek_v3", dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, original_max_position_embeddings=4096,
                         beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)),
    ("deepseek_v2", dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                         mscale=1.0, mscale_all_dim=0.5)),
    ("deepseek_v2", dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128)),
]


@pytest.mark.parametrize("family,rope", ROPE_CASES)
def test_rope_frequencies_match_hf(family, rope):
    from fractal.layers.rotary import compute_inv_freq

    hf_cfg = tiny_hf_config(family, rope_parameters=dict(rope), max_position_embeddings=16384)
    hf_inv, hf_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_cfg)
    ours = parse_model_config(hf_cfg.to_dict()).attention.rope
    inv, scale = compute_inv_freq(ours)
    torch.testing.assert_close(inv, hf_inv.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(hf_scale, rel=1e-6)


def _route_both(family, hf_router_cls, overrides, tokens=64, seed=0):
    hf_cfg = tiny_hf_config(family, **overrides)
    ours = parse_model_config(hf_cfg.to_dict()).moe
    torch.manual_seed(seed)
    router = hf_router_cls(hf_cfg)
    with torch.no_grad():
        router.weight.normal_(0, 0.3)
        bias = None
        if hasattr(router, "e_score_correction_bias"):
            router.e_score_correction_bias.normal_(0, 0.1)
            bias = router.e_score_correction_bias
    x = torch.randn(tokens, hf_cfg.hidden_size)
    with torch.no_grad():
        _, hf_w, hf_ids = router(x)
    logits = torch.nn.functional.linear(x.float(), router.weight.float())
    w, ids = get_moe_backend("cpu").select_experts(logits, ours, bias)
    order_hf, order = hf_ids.argsort(-1), ids.argsort(-1)
    assert torch.equal(hf_ids.gather(1, order_hf), ids.gather(1, order))
    torch.testing.assert_close(w.gather(1, order), hf_w.float().gather(1, order_hf), rtol=1e-5, atol=1e-6)


def test_router_deepseek_v3_sigmoid_bias_groups_matches_hf():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    _route_both("deepseek_v3", DeepseekV3TopkRouter, {})
    _route_both("deepseek_v3", DeepseekV3TopkRouter, dict(n_group=2, topk_group=1, num_experts_per_tok=2))


@pytest.mark.parametrize("method,groups", [("greedy", (None, None)), ("group_limited_greedy", (2, 1)),
                                           ("group_limited_greedy", (4, 2))])
def test_router_deepseek_v2_matches_hf(method, groups):
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    n_group, topk_group = groups
    _route_both("deepseek_v2", DeepseekV2TopkRouter, dict(topk_method=method, n_group=n_group, topk_group=topk_group))


@pytest.mark.parametrize("norm", [True, False])
def test_router_qwen3_moe_matches_hf(norm):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    _route_both("qwen3_moe", Qwen3MoeTopKRouter, dict(norm_topk_prob=norm))


def test_moe_experts_match_dense_computation():
    torch.manual_seed(0)
    e, i, h, t, k = 6, 8, 12, 20, 2
    w13, w2, x = torch.randn(e, 2 * i, h), torch.randn(e, h, i), torch.randn(t, h)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    weights = torch.rand(t, k)
    out = get_moe_backend("cpu").experts(x, w13, w2, weights, ids, "silu")
    dense = torch.zeros(t, e)
    dense.scatter_(1, ids, weights)
    ref = torch.zeros(t, h)
    for j in range(e):  # every expert on every token, weighted by a dense (mostly zero) matrix
        gate, up = (x @ w13[j].T).chunk(2, dim=-1)
        ref += dense[:, j:j + 1] * ((torch.nn.functional.silu(gate) * up) @ w2[j].T)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_paged_gqa_attention_matches_sdpa():
    torch.manual_seed(0)
    heads, kv_heads, dim, bs = 4, 2, 8, 4
    ctx_lens, q_lens = [0, 5, 9, 3], [6, 1, 3, 1]
    num_blocks = sum(-(-(c + q) // bs) for c, q in zip(ctx_lens, q_lens)) + 1
    ids = list(range(1, num_blocks))
    random.Random(0).shuffle(ids)
    tables, at = [], 0
    for c, q in zip(ctx_lens, q_lens):
        n = -(-(c + q) // bs)
        tables.append(ids[at:at + n])
        at += n
    backend = get_attention_backend("cpu")
    cache = torch.zeros(2, num_blocks, bs, kv_heads, dim)
    full_k = [torch.randn(c + q, kv_heads, dim) for c, q in zip(ctx_lens, q_lens)]
    full_v = [torch.randn(c + q, kv_heads, dim) for c, q in zip(ctx_lens, q_lens)]
    # the cached context arrives in an earlier step, the new tokens now
    prev = AttentionMetadata.build(ctx_lens, [0] * 4, tables, bs)
    backend.write_kv(cache, torch.cat([k[:c] for k, c in zip(full_k, ctx_lens)]),
                     torch.cat([v[:c] for v, c in zip(full_v, ctx_lens)]), prev.slot_mapping)
    meta = AttentionMetadata.build(q_lens, ctx_lens, tables, bs)
    backend.write_kv(cache, torch.cat([k[c:] for k, c in zip(full_k, ctx_lens)]),
                     torch.cat([v[c:] for v, c in zip(full_v, ctx_lens)]), meta.slot_mapping)
    q = torch.randn(sum(q_lens), heads, dim)
    out = backend.gqa_attention(q, cache, meta, dim ** -0.5)
    row = 0
    for c, n, k, v in zip(ctx_lens, q_lens, full_k, full_v):
        mask = torch.arange(c + n)[None, :] <= (torch.arange(n)[:, None] + c)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[row:row + n].transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1),
            v.repeat_interleave(2, 1).transpose(0, 1), attn_mask=mask,
        ).transpose(0, 1)
        torch.testing.assert_close(out[row:row + n], ref, rtol=1e-5, atol=1e-5)
        row += n


def test_backend_names_are_checked():
    with pytest.raises(FractalError, match="attention backend 'flash9'"):
        get_attention_backend("cpu", "flash9")
    with pytest.raises(FractalError, match="MoE backend"):
        get_moe_backend("cpu", "nope")
    with pytest.raises(FractalError, match="topk_method"):
        MoEConfig(hidden_size=4, num_experts=4, top_k=2, intermediate_size=4, topk_method="best")
