"""The Triton attention / MoE backends against fractal.layers' plain-torch backends, through their interfaces."""
import math
import random

import pytest
import torch

from fractal.kernels.backends import TritonAttentionBackend, TritonMoEBackend, gather_token_slots
from fractal.layers.attention_backends import TorchAttentionBackend
from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.moe import MoEConfig, TorchMoEBackend


def _meta(query_lens, ctx_lens, block_size, num_blocks, device):
    rng = random.Random(len(query_lens) * 31 + sum(ctx_lens))
    free = list(range(num_blocks))
    rng.shuffle(free)  # non-contiguous block tables
    tables = []
    for q, c in zip(query_lens, ctx_lens):
        n = math.ceil((q + c) / block_size)
        tables.append([free.pop() for _ in range(n)])
    return AttentionMetadata.build(query_lens, ctx_lens, tables, block_size, device=device)


def test_gather_token_slots_cpu():
    meta = _meta([2, 1], [3, 5], 4, 10, "cpu")
    slots, cu = gather_token_slots(meta)
    want = []
    for i, n in enumerate(meta.seq_lens_cpu):
        want += [int(meta.block_tables[i, p // 4]) * 4 + p % 4 for p in range(n)]
    assert slots.tolist() == want and cu.tolist() == [0, 5, 11]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


MIXED = ([1, 1, 300, 1, 64], [700, 5, 0, 2048, 1000])
DECODE = ([1] * 12, [1, 17, 300, 4000, 64, 999, 2, 3, 4096, 128, 129, 5])


@pytest.mark.gpu
@pytest.mark.parametrize("batch", ["mixed", "decode"])
def test_triton_gqa_backend_gpu(batch):
    torch.manual_seed(0)
    qls, ctxs = MIXED if batch == "mixed" else DECODE
    meta = _meta(qls, ctxs, 16, 1200, "cuda")
    cache = torch.randn(2, 1200, 16, 8, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(meta.num_tokens, 32, 128, device="cuda", dtype=torch.bfloat16)
    ref = TorchAttentionBackend().gqa_attention(q, cache, meta, 128 ** -0.5)
    out = TritonAttentionBackend().gqa_attention(q, cache, meta, 128 ** -0.5)
    assert _rel(out, ref) < 1e-2
    bounded = TritonAttentionBackend(decode_seq_len_bound=8192).gqa_attention(q, cache, meta, 128 ** -0.5)
    assert _rel(bounded, ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("batch", ["mixed", "decode"])
def test_triton_mla_backend_gpu(batch):
    torch.manual_seed(1)
    qls, ctxs = MIXED if batch == "mixed" else DECODE
    meta = _meta(qls, ctxs, 16, 1200, "cuda")
    H, L, R, Dn, Dv = 16, 512, 64, 128, 128
    cache = torch.randn(1200, 16, L + R, device="cuda", dtype=torch.bfloat16)
    q_nope = torch.randn(meta.num_tokens, H, Dn, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(meta.num_tokens, H, R, device="cuda", dtype=torch.bfloat16)
    w_uk = (torch.randn(H, Dn, L, device="cuda") / L ** 0.5).to(torch.bfloat16)
    w_uv = (torch.randn(H, Dv, L, device="cuda") / L ** 0.5).to(torch.bfloat16)
    scale = 192 ** -0.5
    torch_b, triton_b = TorchAttentionBackend(), TritonAttentionBackend()
    ref = torch_b.mla_prefill(q_nope, q_rope, cache, meta, w_uk, w_uv, scale)
    assert _rel(triton_b.mla_prefill(q_nope, q_rope, cache, meta, w_uk, w_uv, scale), ref) < 2e-2
    if batch == "decode":
        ref_d = torch_b.mla_decode(q_nope, q_rope, cache, meta, w_uk, w_uv, scale)
        assert _rel(triton_b.mla_decode(q_nope, q_rope, cache, meta, w_uk, w_uv, scale), ref_d) < 2e-2


MOE_CFGS = {
    "dsv2lite": MoEConfig(hidden_size=512, num_experts=64, top_k=6, intermediate_size=256),
    "qwen3moe": MoEConfig(hidden_size=512, num_experts=128, top_k=8, intermediate_size=128, norm_topk_prob=True),
    "dsv3": MoEConfig(hidden_size=512, num_experts=256, top_k=8, intermediate_size=64, scoring="sigmoid",
                      topk_method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
                      routed_scaling_factor=2.5, correction_bias=True),
    "dsv2_groups": MoEConfig(hidden_size=512, num_experts=160, top_k=6, intermediate_size=64,
                             topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MOE_CFGS))
@pytest.mark.parametrize("T", [1, 40, 600])
def test_triton_moe_backend_gpu(name, T):
    torch.manual_seed(T)
    cfg = MOE_CFGS[name]
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
    logits = torch.randn(T, E, device="cuda")
    bias = torch.randn(E, device="cuda") * 0.1 if cfg.correction_bias else None
    w_ref, ids_ref = TorchMoEBackend().select_experts(logits, cfg, bias)
    w, ids = TritonMoEBackend().select_experts(logits, cfg, bias)
    o_ref, o = ids_ref.long().argsort(-1), ids.long().argsort(-1)
    assert torch.equal(ids_ref.long().gather(1, o_ref), ids.long().gather(1, o))
    torch.testing.assert_close(w.gather(1, o), w_ref.gather(1, o_ref), rtol=1e-5, atol=1e-6)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    w13 = (torch.randn(E, 2 * I, H, device="cuda") / H ** 0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, H, I, device="cuda") / I ** 0.5).to(torch.bfloat16)
    ref = TorchMoEBackend().experts(x, w13, w2, w_ref, ids_ref, "silu")
    assert _rel(TritonMoEBackend().experts(x, w13, w2, w, ids, "silu"), ref) < 1e-2
