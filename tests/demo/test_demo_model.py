"""The shipped demo model (fractal/demo/model) loads with plain transformers and predicts held-out code.

References are independent of fractal: Hugging Face ``AutoTokenizer`` / ``DeepseekV2ForCausalLM``
and hand-written expectations. The held-out loss bound (2.70 nats/token) sits above the 2.52
measured on ``heldout_sample.json`` when the model was trained (docs/demo-model.md); an untrained
model scores about log(8192) = 9.0 there.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "fractal" / "demo" / "model"
HELDOUT = Path(__file__).with_name("heldout_sample.json")
HELDOUT_LOSS_BOUND = 2.70  # nats/token; measured 2.52 (fp32 compute on the bf16 weights)
SPECIAL = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    loaded = transformers.DeepseekV2ForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    return loaded.eval()


def test_shipped_files_fit_the_size_budget():
    names = sorted(p.name for p in MODEL_DIR.iterdir())
    for required in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert required in names
    weights = [MODEL_DIR / n for n in names if n.endswith(".safetensors")]
    assert weights, names
    assert all(p.stat().st_size < 15 * 10**6 for p in weights)
    total = sum(p.stat().st_size for p in MODEL_DIR.iterdir())
    assert total < 25 * 10**6, total


def test_config_is_mla_with_shared_expert_moe(model):
    cfg = model.config
    assert cfg.model_type == "deepseek_v2"
    assert cfg.q_lora_rank is None and cfg.kv_lora_rank == 64
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (32, 16, 32)
    assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_shared_experts) == (8, 2, 2)
    assert cfg.first_k_dense_replace == 1 and cfg.num_hidden_layers == 6
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 1, 2)
    # 8192*256*2 (embeddings, head) + 6 attention blocks + 1 dense MLP + 5 MoE blocks + norms
    assert sum(p.numel() for p in model.parameters()) == 11_015_808
    assert type(model.model.layers[1].mlp).__name__ == "DeepseekV2Moe"


def test_tokenizer_special_tokens_and_round_trip(tokenizer):
    assert tokenizer.convert_tokens_to_ids(SPECIAL) == list(range(6))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == tuple(SPECIAL[:3])
    text = "def f(x):\n\treturn {'é': x ** 2}  # ünïcode ✓\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == 0 and 0 not in ids[1:]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template_uses_the_role_tokens(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = ("<|bos|><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.<|eos|>"
                "<|user|>\nWhat is 2+2?\n<|assistant|>\n")
    assert rendered == expected
    ids = tokenizer(rendered, add_special_tokens=False).input_ids
    assert ids[:2] == [0, 3] and ids.count(5) == 2 and ids.count(1) == 1


def test_heldout_loss_is_below_the_measured_bound(tokenizer, model):
    samples = json.loads(HELDOUT.read_text())["samples"]
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids = tokenizer(sample["text"], return_tensors="pt").input_ids
            logits = model(input_ids=ids).logits[0]
            total += torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    loss = total / count
    assert count > 1000
    assert loss < HELDOUT_LOSS_BOUND, f"held-out loss {loss:.3f} nats/token (perplexity {math.exp(loss):.1f})"


def test_greedy_completion_indents_a_function_body(tokenizer, model):
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    completion = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert completion.startswith("\n    "), repr(completion)
