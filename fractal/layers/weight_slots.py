"""Which checkpoint tensor fills which part of which parameter.

A module may define `weight_slots(name) -> Iterable[WeightSlot]` (name = its own dotted path in the model)
to describe HF checkpoint tensors that do not map 1:1 onto its parameters (fused q/k/v, stacked experts).
Modules without it get one slot per direct parameter / persistent buffer under the same name.
A slot with `covers` is an alternative layout: loading it satisfies all the names it covers
(e.g. stacked `experts.gate_up_proj` instead of per-expert `experts.E.gate_proj.weight`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class WeightSlot:
    name: str                       # HF checkpoint tensor name
    shape: tuple[int, ...]          # expected shape of that tensor
    load: Callable[[torch.Tensor], None]  # copies it (cast to the parameter's dtype) into the model
    covers: tuple[str, ...] = ()    # non-empty only for alternative layouts


def copy_into(param: torch.Tensor, index=None, transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """A loader that copies a checkpoint tensor into param[index] (whole param when index is None)."""

    def load(t: torch.Tensor) -> None:
        if transform is not None:
            t = transform(t)
        with torch.no_grad():
            dst = param.data if index is None else param.data[index]
            dst.copy_(t.to(device=dst.device, dtype=dst.dtype))

    return load


def collect_weight_slots(model: nn.Module) -> tuple[dict[str, WeightSlot], dict[str, WeightSlot]]:
    """(primary slots, alternative slots) by HF name, for every weight the model needs."""
    primary: dict[str, WeightSlot] = {}
    alternates: dict[str, WeightSlot] = {}
    for mod_name, module in model.named_modules():
        if hasattr(module, "weight_slots"):
            slots = list(module.weight_slots(mod_name))
        else:
            prefix = f"{mod_name}." if mod_name else ""
            slots = [
                WeightSlot(prefix + n, tuple(p.shape), copy_into(p)) for n, p in module.named_parameters(recurse=False)
            ]
            slots += [
                WeightSlot(prefix + n, tuple(b.shape), copy_into(b))
                for n, b in module.named_buffers(recurse=False)
                if n not in module._non_persistent_buffers_set
            ]
        for slot in slots:
            (alternates if slot.covers else primary)[slot.name] = slot
    return primary, alternates
