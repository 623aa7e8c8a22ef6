"""GQA self-attention (Llama, Qwen3, Qwen3-MoE) over the paged KV cache.

Fused qkv projection (HF q_proj/k_proj/v_proj load into its rows), optional per-head q/k RMSNorm before RoPE
(Qwen3), RoPE, write of the new tokens' K/V at `attn_metadata.slot_mapping`, attention through the backend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fractal.layers.attention_backends import AttentionBackend
from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.linear import MergedLinear
from fractal.layers.norm import RMSNorm
from fractal.layers.rotary import RopeConfig, RotaryEmbedding


@dataclass(frozen=True)
class GQAConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    bias: bool = False           # q/k/v/o biases (HF attention_bias)
    qk_norm: bool = False        # Qwen3: RMSNorm over head_dim on q and k before RoPE
    norm_eps: float = 1e-6


class GQAAttention(nn.Module):
    def __init__(self, cfg: GQAConfig, backend: AttentionBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, ["q_proj", "k_proj", "v_proj"], [h * d, kv * d, kv * d], cfg.bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.norm_eps)
            self.k_norm = RMSNorm(d, cfg.norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope)
        self.scale = d ** -0.5

    def kv_token_shape(self) -> tuple[int, ...]:
        return (2, self.cfg.num_kv_heads, self.cfg.head_dim)

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        cfg = self.cfg
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        self.backend.write_kv(kv_cache, k, v, meta.slot_mapping)
        out = self.backend.gqa_attention(q, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, cfg.num_heads * cfg.head_dim))
