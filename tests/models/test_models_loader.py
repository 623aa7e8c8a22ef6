"""Loader: dummy weights, sharded/stacked/extra-tensor checkpoints, dtypes, KV cache spec, and clear errors."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from fractal.errors import FractalError
from fractal.models.loader import load_hf_config, load_model
from fractal.models.testing import FAMILIES, hf_greedy_logits, load_hf_reference, make_tiny_model, run_paged_greedy

PROMPTS = [[5, 6, 7, 8, 9], [3, 4, 10]]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    return make_tiny_model("deepseek_v3", tmp_path_factory.mktemp("v3"), seed=3)


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_dummy_needs_only_config_and_is_deterministic(family, tmp_path):
    src = make_tiny_model(family, tmp_path / "full", seed=0)
    only_cfg = tmp_path / "cfg"
    only_cfg.mkdir()
    shutil.copy(src / "config.json", only_cfg / "config.json")
    a = load_model(only_cfg, dtype=torch.bfloat16, load_format="dummy")
    b = load_model(only_cfg, dtype=torch.bfloat16, load_format="dummy")
    c = load_model(only_cfg, dtype=torch.bfloat16, load_format="dummy", seed=5)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    emb_a, emb_c = a.model.embed_tokens.weight, c.model.embed_tokens.weight
    assert not torch.equal(emb_a, emb_c)
    assert abs(emb_a.float().std().item() - 0.02) < 0.005
    run = run_paged_greedy(a, PROMPTS, max_new_tokens=3, chunk_size=2)
    assert all(torch.isfinite(l).all() for l in run.logits)
    assert run.logits[0].shape == (len(PROMPTS[0]) + 2, 256)


def test_kv_cache_spec_sizes(tmp_path):
    llama = load_model(make_tiny_model("llama", tmp_path / "l"), dtype=torch.float32)
    spec = llama.kv_cache_spec()
    assert (spec.kind, spec.num_layers, spec.token_shape) == ("gqa", 2, (2, 2, 16))
    assert spec.bytes_per_token == 2 * 2 * 2 * 16 * 4  # layers * (k, v) * kv_heads * head_dim * fp32
    caches = spec.allocate(num_blocks=5, block_size=4)
    assert len(caches) == 2 and caches[0].shape == (2, 5, 4, 2, 16)
    v3 = load_model(make_tiny_model("deepseek_v3", tmp_path / "d"), dtype=torch.bfloat16)
    spec = v3.kv_cache_spec()
    assert (spec.kind, spec.token_shape, spec.dtype) == ("mla", (32 + 8,), torch.bfloat16)
    assert spec.bytes_per_token == 2 * 40 * 2  # layers * (kv_lora_rank + rope dim) * bf16: latents only
    assert spec.allocate(3, 4)[1].shape == (3, 4, 40)
    assert spec.num_blocks_for(spec.bytes_per_block(4) * 7 + 1, 4) == 7


def test_bf16_close_to_fp32_and_correction_bias_stays_fp32(v3_dir):
    m32 = load_model(v3_dir, dtype=torch.float32)
    m16 = load_model(v3_dir, dtype="bfloat16")
    bias = m16.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32 and m16.model.layers[1].mlp.experts.w13.dtype == torch.bfloat16
    r32 = run_paged_greedy(m32, PROMPTS, max_new_tokens=1)
    r16 = run_paged_greedy(m16, PROMPTS, max_new_tokens=1)
    for a, b in zip(r16.logits, r32.logits):
        assert rel_err(a, b) < 0.1


def test_stacked_expert_layout_and_extra_tensors(v3_dir, tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2I, H]) plus MTP/inv_freq tensors to skip."""
    d = copy_dir(v3_dir, tmp_path / "stacked")
    sd = load_file(d / "model.safetensors")
    prefix = "model.layers.1.mlp.experts."
    n = sum(1 for k in sd if k.startswith(prefix) and k.endswith("down_proj.weight"))
    gate_up = torch.stack([torch.cat([sd.pop(f"{prefix}{e}.gate_proj.weight"), sd.pop(f"{prefix}{e}.up_proj.weight")])
                           for e in range(n)])
    down = torch.stack([sd.pop(f"{prefix}{e}.down_proj.weight") for e in range(n)])
    sd[prefix + "gate_up_proj"] = gate_up
    sd[prefix + "down_proj"] = down
    sd["model.layers.2.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)  # an MTP layer past num_hidden_layers
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(4)
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    model = load_model(d, dtype=torch.float32)
    hf = load_hf_reference(v3_dir)
    run = run_paged_greedy(model, PROMPTS, max_new_tokens=2)
    for prompt, tokens, logits in zip(PROMPTS, run.tokens, run.logits):
        assert rel_err(logits, hf_greedy_logits(hf, prompt, tokens)) < 1e-4


def test_missing_config_and_bad_json(tmp_path):
    with pytest.raises(FractalError, match="not a directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(FractalError, match="config.json"):
        load_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(FractalError, match="config.json.*JSON"):
        load_model(tmp_path, load_format="dummy")


def test_unknown_architecture_and_bad_options(v3_dir, tmp_path):
    d = copy_dir(v3_dir, tmp_path / "arch")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FractalError, match="MambaForCausalLM.*DeepseekV3ForCausalLM"):
        load_model(d)
    with pytest.raises(FractalError, match="load_format"):
        load_model(v3_dir, load_format="pickle")
    with pytest.raises(FractalError, match="dtype"):
        load_model(v3_dir, dtype="int8")
    with pytest.raises(FractalError, match="mla_mode"):
        load_model(v3_dir, mla_mode="fast")
    cfg = json.loads((v3_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FractalError, match="quantized.*fp8"):
        load_model(d)


def test_missing_shard_tensor_and_shape_mismatch(tmp_path):
    sharded = make_tiny_model("llama", tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    assert len(set(index["weight_map"].values())) > 1
    (sharded / shard).unlink()
    with pytest.raises(FractalError, match=shard):
        load_model(sharded)

    d = make_tiny_model("qwen3", tmp_path / "missing")
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FractalError, match=r"lacks tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load_model(d)

    d = make_tiny_model("qwen3", tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FractalError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \[\d+, \d+\], the model expects"):
        load_model(d)

    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(FractalError, match="model.safetensors.*cannot be read"):
        load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FractalError, match="no model.safetensors.*dummy"):
        load_model(d)


# (shipped config, published total parameters without DeepSeek's MTP module, KV bytes per token in bf16)
REAL_CONFIGS = [
    ("deepseek-v3.json", 671.0e9, 61 * (512 + 64) * 2),
    ("deepseek-v2-lite.json", 15.7e9, 27 * (512 + 64) * 2),
    ("llama-3.1-8b.json", 8.03e9, 32 * 2 * 8 * 128 * 2),
    ("qwen3-30b-a3b.json", 30.5e9, 48 * 2 * 4 * 128 * 2),
]


@pytest.mark.parametrize("name,params,kv_bytes", REAL_CONFIGS)
def test_real_configs_build_with_published_sizes(name, params, kv_bytes):
    from pathlib import Path

    from fractal.models.config import parse_model_config
    from fractal.models.loader import build_model

    path = Path(__file__).resolve().parents[2] / "fractal" / "spec" / "data" / "models" / name
    model = build_model(parse_model_config(json.loads(path.read_text()), str(path)), device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert abs(total - params) / params < 0.005, total
    assert model.kv_cache_spec().bytes_per_token == kv_bytes
