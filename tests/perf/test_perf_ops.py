"""The operator model against numbers worked out by hand for tiny configs."""
import pytest

from fractal.perf.floor import step_floor
from fractal.perf.ops import ModelOptions, StepShape, experts_touched
from fractal.perf.step import Efficiency, step_cost
from fractal.spec.gpu import GpuSpec
from fractal.spec.model import load_model_spec
from fractal.spec.parallel import PhasePlan
from fractal.spec.precision import parse_precision

TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}
# round numbers so times can be checked by hand: 1 TFLOP/s, 1 GB/s HBM, 1 GB/s links
GPU = GpuSpec("unit", 1e12, 2e12, 2e12, 80e9, 1e9, 1e9, 1e8, 8)


def test_tiny_dense_params_by_hand():
    m = load_model_spec(TINY)
    per_layer = (64 * 64 + 2 * 64 * 32 + 64 * 64) + 3 * 64 * 128 + 2 * 64  # q,k,v,o + gate/up/down + 2 norms
    assert m.params_total == 2 * per_layer + 100 * 64 * 2 + 64


def test_tiny_dense_decode_by_hand():
    # one sequence, 1 new token after 9 cached: 10 query-key pairs per head
    f = step_floor(TINY, GPU, num_seqs=1, new_tokens_per_seq=1, context_len=9)
    layer_flops = (2 * 64 * (64 + 32 + 32)  # qkv
                   + 4 * 10 * 4 * 16  # QK^T and PV: 2 * 2 * pairs * heads * head_dim
                   + 2 * 64 * 64  # o_proj
                   + 2 * 64 * 256 + 2 * 128 * 64  # gate_up, down
                   + 4 * 64 * 2 + 64 * 2 + 4 * 128)  # 2 RMSNorms (4/elem), 2 residual adds, silu*mul (4/elem)
    head_flops = 4 * 64 + 2 * 64 * 100  # final norm + LM head on one row
    assert f.flops == 2 * layer_flops + head_flops
    layer_w = (64 * 128 + 64 * 64 + 3 * 64 * 128 + 2 * 64) * 2  # bf16 weights read once, norms included
    assert f.weight_bytes == 2 * layer_w + 64 * 2 + 64 * 2 + 64 * 100 * 2  # + embedding row, final norm, LM head
    # KV: write 1 token (2 kv heads x 16 x K,V x 2 bytes) and read all 10 tokens, per layer
    assert f.kv_bytes == 2 * (1 + 10) * 2 * 2 * 16 * 2
    assert f.hbm_bytes == pytest.approx(f.weight_bytes + f.kv_bytes + f.act_bytes)
    assert f.bound == "hbm" and f.comm_bytes == 0
    assert f.hbm_time_s == pytest.approx(f.hbm_bytes / 1e9)
    assert f.compute_time_s == pytest.approx(f.flops / 1e12)


def test_tiny_prefill_causal_pairs_and_mixed_batch():
    m = load_model_spec(TINY)
    p = parse_precision("bf16")
    # prefill of 6 tokens: 6*7/2 = 21 pairs per head; attention core FLOPs = 4 * 21 * 4 heads * 16 per layer
    c = step_cost(m, GPU, p, PhasePlan(), StepShape.uniform(1, 6, 0))
    core = next(o for o in c.ops if o.name == "attn_core")
    assert core.flops == 2 * 4 * 21 * 4 * 16
    # a mixed batch costs the sum of its attention cores and shares the weights once
    f_mix = step_floor(TINY, GPU, num_seqs=2, new_tokens_per_seq=[1, 6], context_len=[9, 0])
    f_dec = step_floor(TINY, GPU, num_seqs=1, new_tokens_per_seq=1, context_len=9)
    f_pre = step_floor(TINY, GPU, num_seqs=1, new_tokens_per_seq=6, context_len=0)
    assert f_mix.weight_bytes == pytest.approx(f_dec.weight_bytes + 6 * 64 * 2)  # embedding rows of 6 more tokens
    assert f_mix.flops == pytest.approx(f_dec.flops + f_pre.flops)  # FLOPs add up: one LM-head row per sequence each
    assert f_mix.kv_bytes == pytest.approx(f_dec.kv_bytes + f_pre.kv_bytes)


def test_tp_allreduce_bytes_by_hand():
    m = load_model_spec("llama-3.1-8b")
    c = step_cost(m, GPU, parse_precision("bf16"), PhasePlan(tp=2), StepShape.uniform(4, 1, 100))
    # per layer two all-reduces (attention, FFN) of 4 tokens x 4096 x 2 bytes; each GPU sends 2*(g-1)/g of it
    assert c.comm_intra_bytes == pytest.approx(32 * 2 * (2 * 0.5 * 4 * 4096 * 2))
    assert c.comm_inter_bytes == 0


def test_tp_across_nodes_splits_traffic():
    m = load_model_spec("llama-3.1-70b")
    c = step_cost(m, GPU, parse_precision("bf16"), PhasePlan(tp=16), StepShape.uniform(1, 1, 10))
    # 16 GPUs on 2 nodes of 8: 7/16 of the payload stays inside the node, 8/16 crosses (article 2.3.4 TP16)
    assert c.comm_inter_bytes / c.comm_intra_bytes == pytest.approx(8 / 7)


def test_moe_weights_read_at_batch_one():
    m = load_model_spec("deepseek-v2-lite")
    c = step_cost(m, GPU, parse_precision("bf16"), PhasePlan(), StepShape.uniform(1, 1, 50))
    routed = next(o for o in c.ops if o.name == "experts(routed)")
    # one token reads exactly its top-6 experts in each of the 26 MoE layers
    assert routed.weight_bytes == pytest.approx(26 * 6 * 3 * 2048 * 1408 * 2)
    shared = next(o for o in c.ops if o.name == "experts(shared)")
    assert shared.weight_bytes == pytest.approx(26 * 3 * 2048 * 2816 * 2)


def test_experts_touched():
    assert experts_touched(256, 8, 8, 1, 1.0) == pytest.approx(1.0)  # article: 8/EP per rank
    assert experts_touched(256, 8, 8, 1, 8.0) == pytest.approx(8.0)  # worst case: all on one rank
    assert experts_touched(256, 8, 8, 10_000, 1.0) == pytest.approx(32.0)  # large batch: every local expert


def test_ep_dispatch_bytes_by_hand():
    m = load_model_spec("deepseek-v3")
    p = parse_precision("fp8")
    c = step_cost(m, GPU, p, PhasePlan(dp=8, ep=8), StepShape.uniform(1, 1, 100))
    # article formula 27 with the local share removed: 58 layers x 2 (dispatch+combine) x 8 experts x 7168 x 2 bytes x 7/8
    assert c.comm_intra_bytes == pytest.approx(58 * 2 * 8 * 7168 * 2 * 7 / 8)
    c16 = step_cost(m, GPU, p, PhasePlan(dp=16, ep=16), StepShape.uniform(1, 1, 100))
    # EP16 on two nodes: 7/16 of the destinations inside the node, 8/16 outside (article: "half cross-node")
    assert c16.comm_inter_bytes == pytest.approx(58 * 2 * 8 * 7168 * 2 * 8 / 16)
    hot = step_cost(m, GPU, p, PhasePlan(dp=8, ep=8), StepShape.uniform(1, 1, 100), opts=ModelOptions(imbalance=8))
    r_hot = next(o for o in hot.ops if o.name == "experts(routed)")
    r_bal = next(o for o in c.ops if o.name == "experts(routed)")
    assert r_hot.flops == pytest.approx(8 * r_bal.flops)


def test_mla_modes_flops_by_hand():
    m = load_model_spec("deepseek-v3")
    p = parse_precision("fp8")
    a = m.attention
    shape = StepShape.uniform(1, 1, 3809)  # 3810 pairs: the article's s' = 3260 + 550
    c = step_cost(m, GPU, p, PhasePlan(), shape, opts=ModelOptions(mla_mode="absorb"))
    core = next(o for o in c.ops if o.name == "attn_core(absorb)")
    assert core.flops == pytest.approx(61 * 2 * 3810 * 128 * (2 * 512 + 64))  # article formula 3
    pre = step_cost(m, GPU, p, PhasePlan(), StepShape.uniform(1, 3260, 0))
    core = next(o for o in pre.ops if o.name == "attn_core(mha)")
    pairs = 3260 * 3261 / 2  # exact causal; the article's s'=s/2 gives 3260*1630
    assert core.flops == pytest.approx(61 * 2 * pairs * 128 * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim))


def test_overlap_rules_order():
    m = load_model_spec("deepseek-v3")
    p = parse_precision("fp8")
    shape, plan = StepShape.uniform(32, 1, 3810), PhasePlan(dp=8, ep=8)
    t = {r: step_cost(m, GPU, p, plan, shape, overlap=r).step_time_s for r in ("full", "op", "none")}
    assert t["full"] <= t["op"] <= t["none"]
    c = step_cost(m, GPU, p, plan, shape, overlap="none")
    assert t["none"] == pytest.approx(c.compute_time_s + c.hbm_time_s + c.comm_time_s)
    slow = step_cost(m, GPU, p, plan, shape, eff=Efficiency(hbm=0.5), overlap="none")
    assert slow.hbm_time_s == pytest.approx(2 * c.hbm_time_s)


def test_pd_kv_push_overlaps_the_step():
    m = load_model_spec("llama-3.1-8b")
    p = parse_precision("bf16")
    shape = StepShape.uniform(1, 1000, 0)
    base = step_cost(m, GPU, p, PhasePlan(), shape)
    push = step_cost(m, GPU, p, PhasePlan(), shape, kv_transfer_tokens=1000)
    kv = next(o for o in push.ops if o.name == "pd_kv_transfer")
    assert kv.comm_inter == 1000 * 32 * 2 * 8 * 128 * 2  # K and V of 8 kv heads x 128, bf16, 32 layers
    assert push.step_time_s == pytest.approx(max(base.step_time_s, kv.comm_s))
