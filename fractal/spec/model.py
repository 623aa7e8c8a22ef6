"""ModelSpec: the shapes that cost resources, read from an HF `config.json`.

Supported `model_type`s: llama, mistral, qwen2, qwen3 (dense GQA), mixtral, qwen2_moe, qwen3_moe (GQA +
MoE), deepseek_v2, deepseek_v3 (MLA + fine-grained/shared experts, dense-first layers). Parameter
counts are exact for the modelled tensors (matmul weights, norms, router, embeddings, LM head); the
DeepSeek MTP module (`num_nextn_predict_layers`) is reported separately and not counted.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fractal.errors import FractalError

MODELS_DIR = Path(__file__).parent / "data" / "models"


@dataclass(frozen=True)
class AttentionSpec:
    """kind: "mha", "gqa" or "mla". For MLA, head_dim = qk_nope + qk_rope and kv is the shared latent."""

    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    qk_norm: bool = False
    bias: bool = False

    def params(self, hidden: int) -> int:
        h = self.num_heads
        if self.kind == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = hidden * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * qk
            else:
                q = hidden * h * qk
            kv_a = hidden * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv_b = self.kv_lora_rank * h * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv_a + kv_b + h * self.v_head_dim * hidden
        q = hidden * h * self.head_dim
        kv = 2 * hidden * self.num_kv_heads * self.head_dim
        o = h * self.head_dim * hidden
        bias = (h + 2 * self.num_kv_heads) * self.head_dim if self.bias else 0
        return q + kv + o + bias + (2 * self.head_dim if self.qk_norm else 0)

    def kv_elems_per_token(self) -> int:
        """KV-cache elements per token per layer (MLA: latent + rope key; GQA: K and V of all kv heads)."""
        if self.kind == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class MoESpec:
    """Routed experts (SwiGLU, width expert_intermediate) plus always-on shared experts of total
    width shared_intermediate. n_group/topk_group: DeepSeek group-limited routing."""

    num_experts: int
    top_k: int
    expert_intermediate: int
    num_shared_experts: int = 0
    shared_intermediate: int = 0
    n_group: int = 1
    topk_group: int = 1

    def expert_params(self, hidden: int) -> int:
        return 3 * hidden * self.expert_intermediate

    def shared_params(self, hidden: int) -> int:
        return 3 * hidden * self.shared_intermediate

    def router_params(self, hidden: int) -> int:
        return hidden * self.num_experts


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer. moe_layers[i] says whether layer i is MoE (else dense FFN)."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    attention: AttentionSpec
    dense_intermediate: int
    moe: MoESpec | None
    moe_layers: tuple[bool, ...]
    tie_word_embeddings: bool = False
    num_mtp_layers: int = 0
    native_dtype: str = "bf16"  # dtype the checkpoint ships in (fp8 for DeepSeek-V3's block-quantised weights)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    def dense_ffn_params(self) -> int:
        return 3 * self.hidden_size * self.dense_intermediate

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def param_breakdown(self) -> dict[str, int]:
        """Total parameters by part (norms folded into their part)."""
        d = self.hidden_size
        attn = self.attention.params(d) * self.num_layers
        norms = (2 * self.num_layers + 1) * d
        out = {"embedding": self.embedding_params(), "lm_head": self.lm_head_params(), "attention": attn,
               "dense_ffn": self.dense_ffn_params() * self.num_dense_layers, "norms": norms,
               "moe_routed": 0, "moe_shared": 0, "router": 0}
        if self.moe:
            n = self.num_moe_layers
            out["moe_routed"] = self.moe.num_experts * self.moe.expert_params(d) * n
            out["moe_shared"] = self.moe.shared_params(d) * n
            out["router"] = self.moe.router_params(d) * n
        return out

    @property
    def params_total(self) -> int:
        return sum(self.param_breakdown().values())

    @property
    def params_activated(self) -> int:
        """Parameters touched per token: everything except the routed experts not chosen."""
        b = self.param_breakdown()
        total = sum(b.values())
        if self.moe:
            unused = (self.moe.num_experts - self.moe.top_k) * self.moe.expert_params(self.hidden_size)
            total -= unused * self.num_moe_layers
        return total


def _get(cfg: dict, key: str, default=None, *, required: bool = False):
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if required:
        raise FractalError(f"config.json lacks {key!r} (model_type {cfg.get('model_type')!r})")
    return default


def model_spec_from_config(cfg: dict, name: str | None = None) -> ModelSpec:
    """Build a ModelSpec from an HF config dict."""
    mt = str(cfg.get("model_type", "")).lower()
    name = name or str(cfg.get("_name_or_path") or mt or "model")
    d = int(_get(cfg, "hidden_size", required=True))
    layers = int(_get(cfg, "num_hidden_layers", required=True))
    heads = int(_get(cfg, "num_attention_heads", required=True))
    vocab = int(_get(cfg, "vocab_size", required=True))
    kv_heads = int(_get(cfg, "num_key_value_heads", heads))
    tie = bool(cfg.get("tie_word_embeddings", False))
    inter = int(_get(cfg, "intermediate_size", 0))
    moe, moe_layers, mtp = None, [False] * layers, 0
    if mt in ("deepseek_v2", "deepseek_v3"):
        nope = int(_get(cfg, "qk_nope_head_dim", required=True))
        rope = int(_get(cfg, "qk_rope_head_dim", required=True))
        attn = AttentionSpec("mla", heads, heads, nope + rope, int(_get(cfg, "v_head_dim", required=True)),
                             q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=int(_get(cfg, "kv_lora_rank", required=True)),
                             qk_nope_head_dim=nope, qk_rope_head_dim=rope)
        n_routed = cfg.get("n_routed_experts")
        if n_routed:
            mi = int(_get(cfg, "moe_intermediate_size", required=True))
            n_shared = int(cfg.get("n_shared_experts") or 0)
            moe = MoESpec(int(n_routed), int(_get(cfg, "num_experts_per_tok", required=True)), mi, n_shared, n_shared * mi,
                          int(cfg.get("n_group") or 1), int(cfg.get("topk_group") or 1))
            first, freq = int(cfg.get("first_k_dense_replace") or 0), int(cfg.get("moe_layer_freq") or 1)
            moe_layers = [i >= first and i % freq == 0 for i in range(layers)]
        mtp = int(cfg.get("num_nextn_predict_layers") or 0)
    elif mt in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"):
        hd = int(_get(cfg, "head_dim", d // heads))
        kind = "mha" if kv_heads == heads else "gqa"
        attn = AttentionSpec(kind, heads, kv_heads, hd, hd, qk_norm=mt.startswith("qwen3"),
                             bias=bool(cfg.get("attention_bias", mt == "qwen2" or mt == "qwen2_moe")))
        if mt == "mixtral":
            moe = MoESpec(int(_get(cfg, "num_local_experts", required=True)), int(_get(cfg, "num_experts_per_tok", required=True)), inter)
            moe_layers = [True] * layers
        elif mt in ("qwen2_moe", "qwen3_moe"):
            mi = int(_get(cfg, "moe_intermediate_size", required=True))
            shared = int(cfg.get("shared_expert_intermediate_size") or 0)
            moe = MoESpec(int(_get(cfg, "num_experts", required=True)), int(_get(cfg, "num_experts_per_tok", required=True)), mi,
                          1 if shared else 0, shared)
            step = int(cfg.get("decoder_sparse_step") or 1)
            only = set(cfg.get("mlp_only_layers") or [])
            moe_layers = [(i not in only) and (i + 1) % step == 0 for i in range(layers)]
    else:
        raise FractalError(f"model_type {mt!r} is not supported; valid: llama, mistral, qwen2, qwen3, mixtral, "
                           "qwen2_moe, qwen3_moe, deepseek_v2, deepseek_v3")
    if not any(moe_layers):
        moe = None
    elif inter == 0 and not all(moe_layers):
        raise FractalError("config.json lacks 'intermediate_size' needed by its dense layers")
    q = cfg.get("quantization_config") or {}
    native = "fp8" if str(q.get("quant_method", "")).lower() == "fp8" else (
        "fp16" if str(cfg.get("torch_dtype", "")) == "float16" else "bf16")
    return ModelSpec(name, mt, d, layers, vocab, attn, inter, moe, tuple(moe_layers), tie, mtp, native)


def shipped_models() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.json"))


_MODEL_ALIASES = {"deepseek-r1": "deepseek-v3", "r1": "deepseek-v3", "v3": "deepseek-v3",
                  "mixtral-8x7b-v0.1": "mixtral-8x7b", "llama-3.1-8b-instruct": "llama-3.1-8b",
                  "llama-3.1-70b-instruct": "llama-3.1-70b"}


def load_model_spec(name_or_path) -> ModelSpec:
    """A shipped model by name (see `shipped_models()`), an HF config dict, a path to a config.json,
    or a directory containing one."""
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    if isinstance(name_or_path, dict):
        return model_spec_from_config(name_or_path)
    key = str(name_or_path).strip()
    low = _MODEL_ALIASES.get(key.lower(), key.lower())
    if (MODELS_DIR / f"{low}.json").is_file():
        return model_spec_from_config(json.loads((MODELS_DIR / f"{low}.json").read_text()), name=low)
    path = Path(key)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise FractalError(f"{str(path)!r} is not valid JSON: {exc}") from None
        return model_spec_from_config(cfg, name=path.parent.name or path.stem)
    raise FractalError(f"unknown model {key!r}; choose from {', '.join(shipped_models())}, "
                       "or give a config.json path or a model directory")
