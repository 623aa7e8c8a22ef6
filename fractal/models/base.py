"""The decoder-only skeleton every family shares; families pick the attention module (GQA or MLA).

Parameter names mirror HF (`model.embed_tokens`, `model.layers.N.self_attn...`, `model.norm`, `lm_head`) so that
checkpoint names map onto them; fused weights (qkv, gate_up, stacked experts) declare their HF names through
`weight_slots` (fractal/layers/weight_slots.py).

Model interface (what the engine calls):
- forward(input_ids [T], positions [T], attn_metadata, kv_caches) -> hidden_states [T, hidden]; the batch is
  flattened (see fractal/layers/attention_metadata.py); each layer writes its new K/V (or MLA latents) into
  kv_caches[layer] at attn_metadata.slot_mapping, then attends over cached context + new tokens, causally.
- compute_logits(hidden_states [N, hidden], upcast=True) -> float32 [N, vocab] (model dtype with upcast=False).
- kv_cache_spec() -> KVCacheSpec (layout, dtype, bytes per token; allocate()).
"""
from __future__ import annotations

import torch
from torch import nn

from fractal.errors import FractalError
from fractal.layers.attention_backends import AttentionBackend
from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.kv_cache_spec import KVCacheSpec
from fractal.layers.mlp import GatedMLP
from fractal.layers.moe import MoE, MoEBackend
from fractal.layers.norm import RMSNorm
from fractal.models.config import ModelConfig


class DecoderLayer(nn.Module):
    """x + attn(norm(x)), then h + mlp(norm(h)) — the same additions as HF, carried as a residual stream.

    forward takes and returns (hidden, residual): the residual add of each block is done by the next norm
    (`RMSNorm(x, residual)`: one fused kernel on the GPU path), so the layer's output is mlp_out with the
    running residual beside it; CausalLM.forward applies the final norm the same way. residual None (first
    layer): the input is the residual.
    """

    def __init__(self, self_attn: nn.Module, mlp: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(hidden_size, eps)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = x, self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Base class; subclasses implement make_attention(layer_index)."""

    # the lm_head product (accelerate_model sets a GEMV kernel for one-token batches on the GPU path)
    logits_linear = staticmethod(nn.functional.linear)

    def __init__(
        self, config: ModelConfig, attention_backend: AttentionBackend, moe_backend: MoEBackend, mla_mode: str = "auto"
    ) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.moe_backend = moe_backend
        self.mla_mode = mla_mode
        layers = [
            DecoderLayer(self.make_attention(i), self.make_mlp(i), config.hidden_size, config.rms_norm_eps)
            for i in range(config.num_layers)
        ]
        self.model = DecoderModel(config, layers)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def make_attention(self, layer_index: int) -> nn.Module:
        raise NotImplementedError

    def make_mlp(self, layer_index: int) -> nn.Module:
        cfg = self.config
        if cfg.moe is not None and cfg.moe_layers[layer_index]:
            return MoE(cfg.moe, self.moe_backend)
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        if len(kv_caches) != self.config.num_layers:
            raise FractalError(f"kv_caches has {len(kv_caches)} tensors; the model has {self.config.num_layers} layers")
        if input_ids.shape[0] != positions.shape[0] or input_ids.shape[0] != attn_metadata.num_tokens:
            raise FractalError(
                f"input_ids ({input_ids.shape[0]}), positions ({positions.shape[0]}) and attn_metadata "
                f"({attn_metadata.num_tokens} tokens) must have the same number of tokens"
            )
        h = self.model.embed_tokens(input_ids)
        residual = None
        for layer, cache in zip(self.model.layers, kv_caches):
            h, residual = layer(positions, h, cache, attn_metadata, residual)
        if residual is None:  # no layers
            return self.model.norm(h)
        return self.model.norm(h, residual)[0]

    def compute_logits(self, hidden_states: torch.Tensor, upcast: bool = True) -> torch.Tensor:
        """[N, vocab] logits: float32, or in the model's dtype with upcast=False (for a reader that converts
        while it reads, e.g. the greedy sampling kernel; the float32 logits are the same numbers)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = self.logits_linear(hidden_states, weight)
        return logits.float() if upcast else logits

    def kv_cache_spec(self) -> KVCacheSpec:
        attn = self.model.layers[0].self_attn
        return KVCacheSpec(
            kind="mla" if self.config.uses_mla else "gqa",
            num_layers=self.config.num_layers,
            token_shape=attn.kv_token_shape(),
            dtype=self.model.embed_tokens.weight.dtype,
        )
