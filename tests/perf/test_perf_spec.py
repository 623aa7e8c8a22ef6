"""Specs: parameter counts against published sizes, config loading, GPU table, plan and precision parsing."""
import json

import pytest

from fractal.errors import FractalError
from fractal.spec.gpu import gpu_names, load_gpu
from fractal.spec.model import load_model_spec, model_spec_from_config, shipped_models
from fractal.spec.parallel import PhasePlan, parse_phase_plan, parse_plan
from fractal.spec.precision import dtype_bytes, parse_precision

# published totals / activated (model cards), billions
PUBLISHED = {
    "deepseek-v3": (671, 37),
    "deepseek-v2-lite": (15.7, 2.4),
    "qwen3-30b-a3b": (30.5, 3.3),
    "qwen3-235b-a22b": (235, 22),
    "llama-3.1-8b": (8.03, 8.03),
    "llama-3.1-70b": (70.6, 70.6),
    "mixtral-8x7b": (46.7, 12.9),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    m = load_model_spec(name)
    total, active = PUBLISHED[name]
    assert m.params_total / 1e9 == pytest.approx(total, rel=0.01)
    # model cards differ on whether embeddings count as activated: accept either convention
    emb = m.embedding_params() / 1e9
    a = m.params_activated / 1e9
    assert abs(a - active) / active < 0.03 or abs(a - emb - active) / active < 0.03


def test_deepseek_v3_structure():
    m = load_model_spec("deepseek-r1")  # alias
    assert m.num_layers == 61 and m.num_dense_layers == 3 and m.num_moe_layers == 58
    assert m.attention.kind == "mla" and m.attention.kv_elems_per_token() == 576
    assert m.moe.num_experts == 256 and m.moe.top_k == 8 and m.moe.shared_intermediate == 2048
    assert m.attention.params(m.hidden_size) * 61 / 1e9 == pytest.approx(11.4, rel=0.01)  # article: 11.4 B
    assert m.native_dtype == "fp8" and m.num_mtp_layers == 1
    # one expert = 3 x 7168 x 2048 = 0.044 B (article table)
    assert m.moe.expert_params(m.hidden_size) / 1e9 == pytest.approx(0.044, rel=0.01)


def test_shipped_configs_keep_hf_keys():
    assert set(PUBLISHED) <= set(shipped_models())
    from fractal.spec.model import MODELS_DIR

    cfg = json.loads((MODELS_DIR / "qwen3-30b-a3b.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_experts"] == 128
    assert cfg["moe_intermediate_size"] == 768 and cfg["num_key_value_heads"] == 4


def test_load_from_path_and_dir(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}
    d = tmp_path / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    a, b = load_model_spec(str(d)), load_model_spec(str(d / "config.json"))
    assert a == b and a.attention.kind == "gqa" and a.attention.head_dim == 16
    with pytest.raises(FractalError, match="unknown model"):
        load_model_spec(str(tmp_path / "nope"))
    with pytest.raises(FractalError, match="not supported"):
        model_spec_from_config({**cfg, "model_type": "gpt2"})


def test_gpu_table_has_sources_and_units(tmp_path):
    assert {"h20", "h800", "h100", "h200", "b200", "a100-80gb", "l40s", "rtx4090", "ascend-910b", "mi300x"} <= set(gpu_names())
    from fractal.spec.gpu import gpu_table

    for name, e in gpu_table().items():
        for k in ("bf16_tflops", "fp8_tflops", "int8_tops", "hbm_gb", "hbm_gbps", "intra_node_gbps", "inter_node_gbps"):
            assert e["sources"].get(k), f"{name}.{k} has no source"
    h20 = load_gpu("h20")
    assert h20.peak_flops("fp8") == 296e12 and h20.hbm_bw == 4.0e12 and h20.hbm_bytes == 96e9
    assert h20.intra_node_bw == 900e9 and h20.inter_node_bw == 50e9
    with pytest.raises(FractalError, match="no FP8"):
        load_gpu("a100-80gb").peak_flops("fp8")
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"name": "mine", "bf16_tflops": 100, "hbm_gb": 10, "hbm_gbps": 1000,
                             "intra_node_gbps": 100, "inter_node_gbps": 10, "gpus_per_node": 4}))
    g = load_gpu(str(f))
    assert g.name == "mine" and g.bf16_flops == 100e12 and g.gpus_per_node == 4
    f.write_text(json.dumps({"name": "bad", "bf16_tflops": 1}))
    with pytest.raises(FractalError, match="lacks"):
        load_gpu(str(f))
    with pytest.raises(FractalError, match="unknown GPU"):
        load_gpu("tpu")


def test_plan_strings():
    assert parse_phase_plan("dp8-ep8") == PhasePlan(tp=1, dp=8, ep=8, pp=1)
    assert parse_phase_plan("tp4-pp2").gpus == 8
    d = parse_plan("prefill=tp8-ep8,decode=dp16-ep16,pd=2:1")
    assert d.disaggregated and d.p_instances == 2 and d.d_instances == 1 and d.gpus == 2 * 8 + 16
    assert str(d) == "prefill=tp8-ep8,decode=dp16-ep16,pd=2:1"
    assert not parse_plan("tp8").disaggregated
    for bad, msg in (("tp8-xp2", "bad part"), ("tp0", "bad part"), ("tp2-tp4", "twice"),
                     ("prefill=tp8", "needs both"), ("prefill=tp8,decode=tp8,pd=2", "P:D")):
        with pytest.raises(FractalError, match=msg):
            parse_plan(bad)


def test_plan_validation_messages():
    v3, llama = load_model_spec("deepseek-v3"), load_model_spec("llama-3.1-8b")
    with pytest.raises(FractalError, match="does not divide .* 32 attention heads"):
        parse_phase_plan("tp3").validate(llama)
    with pytest.raises(FractalError, match="needs an MoE model"):
        parse_phase_plan("tp8-ep8").validate(llama)
    with pytest.raises(FractalError, match="must divide tp\\*dp"):
        parse_phase_plan("tp2-ep4").validate(v3)
    with pytest.raises(FractalError, match="routed experts"):
        parse_phase_plan("dp3-ep3").validate(v3)
    parse_phase_plan("dp8-ep8").validate(v3)
    parse_phase_plan("tp8-ep8").validate(v3)


def test_precision():
    assert dtype_bytes("int4") == 0.5 and dtype_bytes("w4a8") == 0.5
    assert dtype_bytes("int4g128") == pytest.approx(0.5 + 2 / 128)
    p = parse_precision("attn=fp8,dense=fp8,moe=w4a8,shared=fp8")
    assert p.weight_bytes("moe") == 0.5 and p.weight_bytes("attn") == 1 and p.act == "fp8"
    assert p.weight_bytes("embed") == 2  # unnamed parts keep the default bf16
    assert parse_precision("bf16").compute_dtype == "bf16"
    with pytest.raises(FractalError, match="unknown dtype"):
        parse_precision("fp4")
    with pytest.raises(FractalError, match="unknown weight part"):
        parse_precision("mlp=fp8")
