"""Multi-head Latent Attention (DeepSeek V2/V3) over a latent-only paged cache.

Per token the cache holds kv_lora_rank + qk_rope_head_dim numbers: the compressed KV latent (after
kv_a_layernorm) and the RoPE'd shared key. Queries: q_proj, or q-LoRA (q_a_proj -> q_a_layernorm -> q_b_proj).
Two ways to attend, same result (see attention_backends.py):
- "absorb": q_nope @ W_UK into latent space, attend over latents, output through W_UV (cheap decode).
- "mha": expand per-head keys/values from the cached latents (prefill, chunked prefill, prefix reuse).
"auto" picks absorb for decode-only batches and mha otherwise.
Softmax scale = qk_head_dim^-0.5 * mscale(factor, mscale_all_dim)^2 for YaRN-scaled RoPE (as HF/DeepSeek).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fractal.errors import FractalError
from fractal.layers.attention_backends import MLA_MODES, AttentionBackend
from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.norm import RMSNorm
from fractal.layers.rotary import RopeConfig, RotaryEmbedding, softmax_scale_multiplier


@dataclass(frozen=True)
class MLAConfig:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig             # rotary_dim == qk_rope_head_dim
    bias: bool = False           # HF attention_bias: q_a_proj, kv_a_proj_with_mqa, o_proj
    latent_norm_eps: float = 1e-6  # q_a_layernorm / kv_a_layernorm (HF uses the default, not rms_norm_eps)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MLAttention(nn.Module):
    input_linear = staticmethod(nn.functional.linear)  # the fused input GEMM (a GEMV kernel on the GPU path)
    def __init__(self, cfg: MLAConfig, backend: AttentionBackend, mode: str = "auto") -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        self.mode = check_mla_mode(mode)
        h = cfg.num_heads
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.hidden_size, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.hidden_size, cfg.q_lora_rank, bias=cfg.bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.latent_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.latent_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, cfg.hidden_size, bias=cfg.bias)
        self.rotary = RotaryEmbedding(cfg.rope)
        self.scale = cfg.qk_head_dim ** -0.5 * softmax_scale_multiplier(cfg.rope)
        # (weight, bias | None, split sizes) once fuse_input_projections() ran; None: two separate GEMMs
        self.fused_input: tuple[torch.Tensor, torch.Tensor | None, list[int]] | None = None

    def fuse_input_projections(self) -> None:
        """One GEMM instead of two for the projections that read x (q_proj or q_a_proj, and kv_a_proj_with_mqa):
        their weights become row slices of one [N1 + N2, hidden] tensor (no extra memory), so a decode step
        launches one kernel less per layer. Same numbers: each output column is the same dot product."""
        first = self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj
        second = self.kv_a_proj_with_mqa
        n1, n2 = first.out_features, second.out_features
        with torch.no_grad():
            weight = torch.cat([first.weight, second.weight], dim=0)
            first.weight.data, second.weight.data = weight[:n1], weight[n1:]
            bias = None
            if first.bias is not None or second.bias is not None:
                bias = torch.cat([lin.bias if lin.bias is not None else weight.new_zeros(lin.out_features)
                                  for lin in (first, second)])
                if first.bias is not None:
                    first.bias.data = bias[:n1]
                if second.bias is not None:
                    second.bias.data = bias[n1:]
        self.fused_input = (weight, bias, [n1, n2])

    def rope_and_cache(self, positions, q, kv_a, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on q's and kv_a's rope parts, and the cache write of [kv_a_layernorm(latent) | k_rope];
        returns (q_nope, q_rope)."""
        cfg = self.cfg
        q_nope, q_rope = q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        latent, k_rope = kv_a.split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        q_rope, k_rope = self.rotary(positions, q_rope, k_rope[:, None, :])
        # the latent is used only through the cache: its RMSNorm goes with the write (one kernel on the GPU path)
        self.backend.write_mla(kv_cache, latent, k_rope[:, 0, :], meta.slot_mapping, norm=self.kv_a_layernorm)
        return q_nope, q_rope

    def kv_token_shape(self) -> tuple[int, ...]:
        return (self.cfg.kv_lora_rank + self.cfg.qk_rope_head_dim,)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj.weight split per head: (W_UK [H, Dn, L], W_UV [H, Dv, L])."""
        cfg = self.cfg
        w = self.kv_b_proj.weight.view(cfg.num_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
        return w[:, : cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        cfg = self.cfg
        if self.fused_input is not None:
            weight, bias, sizes = self.fused_input
            q, kv_a = self.input_linear(x, weight, bias).split(sizes, dim=-1)
        else:
            q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_a_proj(x)
            kv_a = self.kv_a_proj_with_mqa(x)
        if cfg.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(-1, cfg.num_heads, cfg.qk_head_dim)
        q_nope, q_rope = self.rope_and_cache(positions, q, kv_a, kv_cache, meta)
        w_uk, w_uv = self.absorbed_weights()
        absorb = self.mode == "absorb" or (self.mode == "auto" and meta.is_decode_only)
        attend = self.backend.mla_decode if absorb else self.backend.mla_prefill
        out = attend(q_nope, q_rope, kv_cache, meta, w_uk, w_uv, self.scale)
        return self.o_proj(out.reshape(-1, cfg.num_heads * cfg.v_head_dim))


def check_mla_mode(mode: str) -> str:
    if mode not in MLA_MODES:
        raise FractalError(f"mla_mode {mode!r} is not valid; valid: {list(MLA_MODES)}")
    return mode
