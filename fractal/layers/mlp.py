"""Gated MLP: down(act(gate(x)) * up(x)), with gate/up fused into one GEMM (HF gate_proj/up_proj rows)."""
from __future__ import annotations

import torch
from torch import nn

from fractal.layers.activation import act_and_mul, get_activation
from fractal.layers.linear import MergedLinear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, ["gate_proj", "up_proj"], [intermediate_size] * 2, bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act = get_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act))
