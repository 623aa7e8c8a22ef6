"""ModelConfig: everything the torch modules need, parsed once from an HF config.json dict.

Supported architectures (config.json "architectures"[0], or "model_type" when that is missing):
LlamaForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM.
Accepts both RoPE spellings: `rope_parameters` (transformers >= 5) and `rope_theta` + `rope_scaling` (older).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fractal.errors import FractalError
from fractal.layers.attention import GQAConfig
from fractal.layers.mla import MLAConfig
from fractal.layers.moe import MoEConfig
from fractal.layers.rotary import RopeConfig

# architecture -> family (the module that builds it, see registry.py)
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
MODEL_TYPES: dict[str, str] = {family: arch for arch, family in ARCHITECTURES.items()}


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str                      # "llama" | "qwen3" | "qwen3_moe" | "deepseek_v2" | "deepseek_v3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    hidden_act: str
    intermediate_size: int           # dense MLP layers
    mlp_bias: bool
    attention: GQAConfig | MLAConfig
    moe: MoEConfig | None
    moe_layers: tuple[bool, ...]     # per layer: MoE (True) or dense MLP (False)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def uses_mla(self) -> bool:
        return isinstance(self.attention, MLAConfig)


class _Fields:
    """Reads config.json values with errors that name the key and the file."""

    def __init__(self, hf: dict[str, Any], source: str) -> None:
        self.hf, self.source = hf, source

    def req(self, key: str) -> Any:
        if self.hf.get(key) is None:
            raise FractalError(f"{self.source}: required key {key!r} is missing")
        return self.hf[key]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.hf.get(key)
        return default if value is None else value

    def positive_int(self, key: str, default: Any = None) -> int:
        value = self.req(key) if default is None else self.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise FractalError(f"{self.source}: {key} = {value!r} must be a positive integer")
        return value


def resolve_architecture(hf: dict[str, Any], source: str = "config.json") -> str:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else MODEL_TYPES.get(hf.get("model_type", ""))
    if arch not in ARCHITECTURES:
        shown = arch if arch else f"model_type {hf.get('model_type')!r}"
        raise FractalError(f"{source}: architecture {shown!r} is not supported; valid: {sorted(ARCHITECTURES)}")
    return arch


def parse_rope(hf: dict[str, Any], rotary_dim: int, style: str, source: str) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise FractalError(f"{source}: partial_rotary_factor != 1 is not supported")
    max_pos = int(hf.get("max_position_embeddings") or 2048)
    # as HF: a top-level original_max_position_embeddings wins over the one in the RoPE dict
    orig = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos
    factor = params.get("factor")
    if factor is None:
        factor = max_pos / orig if rope_type == "yarn" else 1.0
    if rope_type in ("linear", "llama3") and params.get("factor") is None:
        raise FractalError(f"{source}: rope type {rope_type!r} needs a 'factor'")
    try:
        return RopeConfig(
            rotary_dim=rotary_dim,
            theta=theta,
            rope_type=rope_type,
            factor=float(factor),
            max_position_embeddings=max_pos,
            original_max_position_embeddings=int(orig),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=params.get("mscale"),
            mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"),
            truncate=bool(params.get("truncate", True)),
            style=style,
        )
    except FractalError as e:
        raise FractalError(f"{source}: {e}") from None


def parse_model_config(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """HF config.json dict -> ModelConfig; raises FractalError naming the key at fault."""
    arch = resolve_architecture(hf, source)
    family = ARCHITECTURES[arch]
    f = _Fields(hf, source)
    hidden = f.positive_int("hidden_size")
    num_layers = f.positive_int("num_hidden_layers")
    heads = f.positive_int("num_attention_heads")
    eps = float(f.get("rms_norm_eps", 1e-6))
    act = f.get("hidden_act", "silu")
    if family.startswith("deepseek"):
        attention, moe, moe_layers = _parse_deepseek(f, family, hidden, heads, num_layers, act)
    else:
        attention, moe, moe_layers = _parse_gqa_family(f, family, hidden, heads, num_layers, eps, act)
    eos = f.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=f.positive_int("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        max_position_embeddings=int(f.get("max_position_embeddings", 2048)),
        rms_norm_eps=eps,
        tie_word_embeddings=bool(f.get("tie_word_embeddings", False)),
        hidden_act=act,
        intermediate_size=f.positive_int("intermediate_size"),
        mlp_bias=bool(f.get("mlp_bias", False)),
        attention=attention,
        moe=moe,
        moe_layers=moe_layers,
        bos_token_id=f.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _parse_gqa_family(f: _Fields, family: str, hidden: int, heads: int, num_layers: int, eps: float, act: str):
    if f.get("use_sliding_window", False):
        raise FractalError(f"{f.source}: use_sliding_window = true is not supported")
    kv_heads = f.positive_int("num_key_value_heads", heads)
    if heads % kv_heads:
        raise FractalError(f"{f.source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = f.get("head_dim") or (128 if family == "qwen3" else hidden // heads)
    attention = GQAConfig(
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(head_dim),
        rope=parse_rope(f.hf, int(head_dim), "neox", f.source),
        bias=bool(f.get("attention_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        norm_eps=eps,
    )
    if family != "qwen3_moe":
        return attention, None, (False,) * num_layers
    num_experts = int(f.get("num_experts", f.get("num_local_experts", 0)))  # transformers 5 saves the latter
    if num_experts == 0:
        return attention, None, (False,) * num_layers
    moe = MoEConfig(
        hidden_size=hidden,
        num_experts=num_experts,
        top_k=f.positive_int("num_experts_per_tok"),
        intermediate_size=f.positive_int("moe_intermediate_size"),
        scoring="softmax",
        topk_method="greedy",
        norm_topk_prob=bool(f.get("norm_topk_prob", False)),
        router_fp32=False,
        hidden_act=act,
    )
    mlp_only = set(f.get("mlp_only_layers", []))
    step = f.positive_int("decoder_sparse_step", 1)
    layers = tuple(i not in mlp_only and (i + 1) % step == 0 for i in range(num_layers))
    return attention, moe, layers


def _parse_deepseek(f: _Fields, family: str, hidden: int, heads: int, num_layers: int, act: str):
    v3 = family == "deepseek_v3"
    rope_dim = f.positive_int("qk_rope_head_dim")
    # HF applies interleaved RoPE always in V2 and when rope_interleave (default true) in V3
    style = "interleave" if (not v3 or f.get("rope_interleave", True)) else "neox"
    q_lora = f.get("q_lora_rank")
    attention = MLAConfig(
        hidden_size=hidden,
        num_heads=heads,
        q_lora_rank=int(q_lora) if q_lora else None,
        kv_lora_rank=f.positive_int("kv_lora_rank"),
        qk_nope_head_dim=f.positive_int("qk_nope_head_dim"),
        qk_rope_head_dim=rope_dim,
        v_head_dim=f.positive_int("v_head_dim"),
        rope=parse_rope(f.hf, rope_dim, style, f.source),
        bias=bool(f.get("attention_bias", False)),
    )
    num_experts = int(f.get("n_routed_experts", f.get("num_local_experts", 0)))
    if num_experts == 0:
        return attention, None, (False,) * num_layers
    norm_topk = bool(f.get("norm_topk_prob", v3))
    scaling = float(f.get("routed_scaling_factor", 1.0))
    if not v3 and norm_topk:
        scaling = 1.0  # DeepSeek-V2's reference code scales only when it does not normalise
    topk_method = f.get("topk_method", "noaux_tc" if v3 else "greedy")
    n_shared = int(f.get("n_shared_experts", 0) or 0)
    moe_inter = f.positive_int("moe_intermediate_size")
    moe = MoEConfig(
        hidden_size=hidden,
        num_experts=num_experts,
        top_k=f.positive_int("num_experts_per_tok"),
        intermediate_size=moe_inter,
        shared_intermediate_size=moe_inter * n_shared,
        scoring=f.get("scoring_func", "sigmoid" if v3 else "softmax"),
        topk_method=topk_method,
        n_group=int(f.get("n_group", 1)),
        topk_group=int(f.get("topk_group", 1)),
        norm_topk_prob=norm_topk,
        routed_scaling_factor=scaling,
        correction_bias=topk_method == "noaux_tc",
        router_fp32=True,
        hidden_act=act,
        mlp_bias=bool(f.get("mlp_bias", False)),
    )
    first_dense = int(f.get("first_k_dense_replace", 0))
    freq = f.positive_int("moe_layer_freq", 1)
    layers = tuple(i >= first_dense and i % freq == 0 for i in range(num_layers))
    return attention, moe, layers
