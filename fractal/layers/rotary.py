"""Rotary position embedding (RoPE): default, linear, Llama-3 and YaRN (with DeepSeek's mscale).

Frequencies follow HF transformers' `modeling_rope_utils` exactly (same float32 formulas), so logits match.
Two layouts of the rotated dims:
- "neox": rotate halves, x = [x1 | x2] -> [x1*cos - x2*sin | x2*cos + x1*sin] (Llama, Qwen3).
- "interleave": rotate pairs (x0, x1), (x2, x3), ... (DeepSeek V2/V3 with rope_interleave). The output keeps
  pairs interleaved; q and k use the same layout, so attention scores equal HF's (which de-interleaves in V3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fractal.errors import FractalError

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    rotary_dim: int                 # dims rotated per head (head_dim, or qk_rope_head_dim for MLA)
    theta: float = 10000.0
    rope_type: str = "default"      # one of ROPE_TYPES
    factor: float = 1.0
    max_position_embeddings: int = 2048
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0    # llama3
    high_freq_factor: float = 4.0   # llama3
    beta_fast: float = 32.0         # yarn
    beta_slow: float = 1.0          # yarn
    mscale: float | None = None     # yarn (DeepSeek)
    mscale_all_dim: float | None = None  # yarn (DeepSeek)
    attention_factor: float | None = None  # yarn: explicit cos/sin scale
    truncate: bool = True           # yarn
    style: str = "neox"             # "neox" | "interleave"

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise FractalError(f"rope_type {self.rope_type!r} is not supported; valid: {list(ROPE_TYPES)}")
        if self.style not in ("neox", "interleave"):
            raise FractalError(f"rope style {self.style!r} is not valid; valid: ['neox', 'interleave']")


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale_multiplier(cfg: RopeConfig) -> float:
    """DeepSeek MLA multiplies its softmax scale by mscale(factor, mscale_all_dim)^2 for scaled RoPE."""
    if cfg.rope_type != "default" and cfg.mscale_all_dim:
        m = yarn_get_mscale(cfg.factor, cfg.mscale_all_dim)
        return m * m
    return 1.0


def compute_inv_freq(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [rotary_dim // 2], attention scaling applied to cos/sin)."""
    dim, base = cfg.rotary_dim, cfg.theta
    arange = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float)
    inv_freq = 1.0 / (base ** (arange / dim))
    if cfg.rope_type == "default":
        return inv_freq, 1.0
    if cfg.rope_type == "linear":
        return inv_freq / cfg.factor, 1.0
    orig = cfg.original_max_position_embeddings or cfg.max_position_embeddings
    if cfg.rope_type == "llama3":
        low_wavelen = orig / cfg.low_freq_factor
        high_wavelen = orig / cfg.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / cfg.factor, inv_freq)
        smooth = (orig / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(is_medium, smoothed, scaled), 1.0
    # yarn
    factor = cfg.factor
    if cfg.attention_factor is not None:
        attention = cfg.attention_factor
    elif cfg.mscale and cfg.mscale_all_dim:
        attention = float(yarn_get_mscale(factor, cfg.mscale) / yarn_get_mscale(factor, cfg.mscale_all_dim))
    else:
        attention = yarn_get_mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(cfg.beta_fast), correction_dim(cfg.beta_slow)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (arange / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp
    return interpolation * (1 - extra_factor) + extrapolation * extra_factor, attention


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q [T, Hq, rotary_dim] and k [T, Hk, rotary_dim] at positions [T]."""

    def __init__(self, cfg: RopeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # a plain attribute, not a buffer: models are built on the meta device and then materialised
        self._inv_freq_cpu, self.attention_scaling = compute_inv_freq(cfg)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = self._inv_freq_cpu.to(device)
        return self._inv_freq[device]

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq(positions.device)
        cos = (freqs.cos() * self.attention_scaling).to(dtype)
        sin = (freqs.sin() * self.attention_scaling).to(dtype)
        return cos[:, None, :], sin[:, None, :]  # [T, 1, rotary_dim // 2]

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self._cos_sin(positions, q.dtype)
        rotate = _rotate_neox if self.cfg.style == "neox" else _rotate_interleave
        return rotate(q, cos, sin), rotate(k, cos, sin)


def _rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    cos2, sin2 = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return x * cos2 + torch.cat((-x2, x1), dim=-1) * sin2


def _rotate_interleave(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
