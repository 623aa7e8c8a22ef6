"""Qwen3-MoE: Qwen3 attention (q/k norm) + softmax top-k MoE without shared experts.

Which layers are MoE comes from config.json (`mlp_only_layers`, `decoder_sparse_step`), parsed into
ModelConfig.moe_layers; the others use a dense gated MLP of `intermediate_size`.
"""
from __future__ import annotations

from fractal.models.llama import LlamaForCausalLM


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """GQA attention from Llama/Qwen3; MoE layers chosen by CausalLM.make_mlp from config.moe_layers."""
