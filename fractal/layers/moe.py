"""Mixture of experts: router, routed experts (stacked weights), shared experts, and the MoE backend seam.

Routing (`TorchMoEBackend.select_experts`), matching HF/DeepSeek numerics:
- scores: softmax (Qwen3-MoE, DeepSeek-V2) or sigmoid (DeepSeek-V3) of the router logits, in float32;
- choice: scores (+ e_score_correction_bias for V3, used for choosing only, never for weighting);
- top-k method: "greedy"; "group_limited_greedy" (V2: group score = max, other groups -> 0);
  "noaux_tc" (V3: group score = sum of the top-2, other groups -> -inf); topk_group of n_group groups kept;
- weights = scores of the chosen experts, normalised if norm_topk_prob, times routed_scaling_factor.
Experts are stored stacked: w13 [E, 2*I, H] (gate rows then up rows), w2 [E, H, I]; the loader fills them
from per-expert HF tensors (`mlp.experts.E.gate_proj.weight` ...) or from stacked ones (`experts.gate_up_proj`).
A faster backend (grouped GEMM, fused routing) registers with `register_moe_backend`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from fractal.errors import FractalError
from fractal.layers.activation import act_and_mul, get_activation
from fractal.layers.mlp import GatedMLP
from fractal.layers.weight_slots import WeightSlot, copy_into

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    num_experts: int
    top_k: int
    intermediate_size: int           # per routed expert (HF moe_intermediate_size)
    shared_intermediate_size: int = 0  # 0 = no shared experts (DeepSeek: moe_intermediate_size * n_shared_experts)
    scoring: str = "softmax"         # "softmax" | "sigmoid"
    topk_method: str = "greedy"      # one of TOPK_METHODS
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False    # DeepSeek-V3 e_score_correction_bias
    router_fp32: bool = False        # router GEMM in float32 (DeepSeek) or in the model dtype (Qwen3-MoE)
    hidden_act: str = "silu"
    mlp_bias: bool = False           # shared experts' biases (DeepSeek-V2 mlp_bias)

    def __post_init__(self) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise FractalError(f"scoring_func {self.scoring!r} is not supported; valid: ['softmax', 'sigmoid']")
        if self.topk_method not in TOPK_METHODS:
            raise FractalError(f"topk_method {self.topk_method!r} is not supported; valid: {list(TOPK_METHODS)}")
        if not 1 <= self.top_k <= self.num_experts:
            raise FractalError(f"num_experts_per_tok {self.top_k} must be in [1, {self.num_experts}]")
        if self.topk_method != "greedy":
            if self.n_group < 1 or self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
                raise FractalError(
                    f"n_group {self.n_group} must divide n_routed_experts {self.num_experts} and topk_group "
                    f"{self.topk_group} must be in [1, n_group]"
                )


class MoEBackend:
    """Routing and expert compute; shapes: x [T, H], router_logits [T, E], weights float32 [T, k], ids [T, k]."""

    name = "base"

    def select_experts(
        self, router_logits: torch.Tensor, cfg: MoEConfig, correction_bias: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def experts(
        self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
        topk_ids: torch.Tensor, hidden_act: str,
    ) -> torch.Tensor:
        """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) -> [T, H] in x's dtype."""
        raise NotImplementedError

    def experts_and_shared(
        self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
        topk_ids: torch.Tensor, hidden_act: str, shared: nn.Module | None,
    ) -> torch.Tensor:
        """experts(...) + shared(x) (the always-on shared experts, a GatedMLP, or None); a backend may fuse them."""
        out = self.experts(x, w13, w2, topk_weights, topk_ids, hidden_act)
        return out if shared is None else out + shared(x)


class TorchMoEBackend(MoEBackend):
    """Reference: top-k routing in float32, then a loop over the experts that received tokens."""

    name = "torch"

    def select_experts(self, router_logits, cfg, correction_bias):
        if cfg.scoring == "softmax":
            scores = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        else:
            scores = router_logits.float().sigmoid()
        choice = scores if correction_bias is None else scores + correction_bias.float()
        if cfg.topk_method != "greedy":
            grouped = choice.view(-1, cfg.n_group, cfg.num_experts // cfg.n_group)
            if cfg.topk_method == "noaux_tc":
                group_scores, fill = grouped.topk(2, dim=-1)[0].sum(dim=-1), float("-inf")
            else:
                group_scores, fill = grouped.max(dim=-1).values, 0.0
            keep_groups = torch.topk(group_scores, k=cfg.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, cfg.num_experts)
            choice = choice.masked_fill(~expert_mask, fill)
        topk_ids = torch.topk(choice, k=cfg.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, topk_ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, topk_ids

    def experts(self, x, w13, w2, topk_weights, topk_ids, hidden_act):
        act = get_activation(hidden_act)
        k = topk_ids.shape[1]
        flat_ids = topk_ids.flatten()
        order = flat_ids.argsort(stable=True)
        counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
        flat_weights = topk_weights.flatten().float()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        offset = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            picks = order[offset:offset + count]
            offset += count
            tokens = picks // k
            h = act_and_mul(nn.functional.linear(x[tokens], w13[expert]), act)
            y = nn.functional.linear(h, w2[expert])
            out.index_add_(0, tokens, y.float() * flat_weights[picks, None])
        return out.to(x.dtype)


_BACKENDS: dict[str, Callable[[], MoEBackend]] = {"torch": TorchMoEBackend}
_DEFAULT_BY_DEVICE_TYPE: dict[str, str] = {"cpu": "torch", "cuda": "torch"}


def register_moe_backend(name: str, factory: Callable[[], MoEBackend], default_for: str | None = None) -> None:
    _BACKENDS[name] = factory
    if default_for is not None:
        _DEFAULT_BY_DEVICE_TYPE[default_for] = name


def get_moe_backend(device: torch.device | str = "cpu", name: str | None = None) -> MoEBackend:
    """The MoE backend called `name`, or the default for the device type (plain torch unless one was registered)."""
    chosen = name or _DEFAULT_BY_DEVICE_TYPE.get(torch.device(device).type, "torch")
    if chosen not in _BACKENDS:
        raise FractalError(f"MoE backend {chosen!r} is not known; valid: {sorted(_BACKENDS)}")
    return _BACKENDS[chosen]()


class Router(nn.Module):
    """HF `mlp.gate`: weight [E, H] and, for DeepSeek-V3, e_score_correction_bias [E] (kept in float32)."""

    keep_fp32 = ("e_score_correction_bias",)

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.fp32 = cfg.router_fp32
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size), requires_grad=False)
        if cfg.correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32:
            return nn.functional.linear(x.float(), self.weight.float())
        return nn.functional.linear(x, self.weight)


class Experts(nn.Module):
    """Routed experts stacked: w13 [E, 2*I, H] (gate then up), w2 [E, H, I]."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        e, i, h = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, i), requires_grad=False)

    def weight_slots(self, name: str) -> Iterator[WeightSlot]:
        e, two_i, h = self.w13.shape
        i = two_i // 2
        names_13, names_2 = [], []
        for x in range(e):
            gate, up, down = (f"{name}.{x}.{p}_proj.weight" for p in ("gate", "up", "down"))
            yield WeightSlot(gate, (i, h), copy_into(self.w13, (x, slice(0, i))))
            yield WeightSlot(up, (i, h), copy_into(self.w13, (x, slice(i, 2 * i))))
            yield WeightSlot(down, (h, i), copy_into(self.w2, x))
            names_13 += [gate, up]
            names_2.append(down)
        # stacked layout of HF transformers' in-memory experts (gate_up_proj [E, 2I, H], down_proj [E, H, I])
        yield WeightSlot(f"{name}.gate_up_proj", (e, 2 * i, h), copy_into(self.w13), tuple(names_13))
        yield WeightSlot(f"{name}.down_proj", (e, h, i), copy_into(self.w2), tuple(names_2))


class MoE(nn.Module):
    """Routed experts (weighted by the router) plus optional always-on shared experts."""

    def __init__(self, cfg: MoEConfig, backend: MoEBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = backend
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        if cfg.shared_intermediate_size > 0:
            self.shared_experts = GatedMLP(cfg.hidden_size, cfg.shared_intermediate_size, cfg.hidden_act, cfg.mlp_bias)
        else:
            self.shared_experts = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.backend.select_experts(self.gate(x), self.cfg, self.gate.e_score_correction_bias)
        return self.backend.experts_and_shared(x, self.experts.w13, self.experts.w2, weights, ids,
                                               self.cfg.hidden_act, self.shared_experts)
