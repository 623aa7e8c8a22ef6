"""DeepSeek-V2 and DeepSeek-V3: MLA attention + (after first_k_dense_replace dense layers) MoE with shared experts.

V2: softmax routing, greedy or group_limited_greedy top-k, interleaved RoPE.
V3: sigmoid routing with e_score_correction_bias, noaux_tc group top-k (sum of top-2 per group),
    normalised weights times routed_scaling_factor, q-LoRA, RoPE interleaved when rope_interleave.
Both: YaRN RoPE with mscale on the softmax scale (fractal/layers/rotary.py). The differences are all in the
parsed config (fractal/models/config.py); the modules are shared.
"""
from __future__ import annotations

from torch import nn

from fractal.layers.mla import MLAConfig, MLAttention
from fractal.models.base import CausalLM


class DeepseekV2ForCausalLM(CausalLM):
    def make_attention(self, layer_index: int) -> nn.Module:
        assert isinstance(self.config.attention, MLAConfig)
        return MLAttention(self.config.attention, self.attention_backend, self.mla_mode)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """Same modules as V2; routing and RoPE layout come from the config."""
