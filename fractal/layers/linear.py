"""Linear layers that know the HF checkpoint names of their weights.

`MergedLinear` fuses several HF projections that read the same input (q/k/v, gate/up) into one GEMM;
its rows are the parts stacked in order. `weight_slots(prefix)` tells the loader which checkpoint
tensor fills which rows (see fractal/layers/weight_slots.py).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from fractal.layers.weight_slots import WeightSlot, copy_into


class MergedLinear(nn.Module):
    """y = x @ W^T (+ b) where W = cat([W_part0, W_part1, ...]) along the output dim.

    `parts` are the HF module names (e.g. ["q_proj", "k_proj", "v_proj"]) and `sizes` their output sizes.
    """

    def __init__(self, in_features: int, parts: list[str], sizes: list[int], bias: bool = False) -> None:
        super().__init__()
        assert len(parts) == len(sizes)
        self.in_features = in_features
        self.parts = list(parts)
        self.sizes = list(sizes)
        self.out_features = sum(sizes)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Output [..., sum(sizes)] -> one tensor per part."""
        return tuple(y.split(self.sizes, dim=-1))

    def weight_slots(self, name: str) -> Iterator[WeightSlot]:
        """`name` is this module's path ("model.layers.0.self_attn.qkv_proj"); HF names hang off its parent."""
        prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
        start = 0
        for part, size in zip(self.parts, self.sizes):
            rows = slice(start, start + size)
            yield WeightSlot(f"{prefix}{part}.weight", (size, self.in_features), copy_into(self.weight, rows))
            if self.bias is not None:
                yield WeightSlot(f"{prefix}{part}.bias", (size,), copy_into(self.bias, rows))
            start += size

    def extra_repr(self) -> str:
        return f"in={self.in_features}, parts={dict(zip(self.parts, self.sizes))}, bias={self.bias is not None}"
