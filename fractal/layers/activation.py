"""Activations by HF name, and the gated MLP activation act(gate) * up."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fractal.errors import FractalError

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function HF calls `name` (config.json's hidden_act)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise FractalError(f"hidden_act {name!r} is not supported; valid: {sorted(_ACTIVATIONS)}") from None


def act_and_mul(gate_up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """gate_up [..., 2*I] laid out [gate | up] -> act(gate) * up [..., I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return act(gate) * up
