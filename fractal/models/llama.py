"""Llama (incl. Llama-3 RoPE scaling) and Qwen3 dense: GQA attention + gated MLP.

Qwen3 differs from Llama only by the per-head q/k RMSNorm before RoPE (GQAConfig.qk_norm, set by config.py)
and by often tied embeddings; both build the same modules.
"""
from __future__ import annotations

from torch import nn

from fractal.layers.attention import GQAAttention, GQAConfig
from fractal.models.base import CausalLM


class LlamaForCausalLM(CausalLM):
    def make_attention(self, layer_index: int) -> nn.Module:
        assert isinstance(self.config.attention, GQAConfig)
        return GQAAttention(self.config.attention, self.attention_backend)


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Same modules as Llama; config.attention.qk_norm is True."""
