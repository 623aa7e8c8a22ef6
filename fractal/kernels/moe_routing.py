"""MoE routing in one kernel: score, correction bias, group-limited top-k, renormalise, scale.

Semantics (DeepSeek V2/V3, Qwen3-MoE, Mixtral all fit; same as vLLM's grouped_topk):
    scores  = softmax(logits) or sigmoid(logits)                 (float32, over the E experts)
    choice  = scores + correction_bias (if given), used only to choose experts
    groups  (n_group > 1): group score = max of choice in the group, or with a bias the sum of its top 2;
            keep the topk_group best groups, mask the other experts
    ids     = top_k experts of choice (ties: lowest index first)
    weights = scores[ids] (without the bias); if renormalize: / (sum + 1e-20); then * routed_scaling_factor
Inputs: logits [T, E] (any float dtype, rows may be strided). Outputs: weights float32 [T, top_k],
ids int32 [T, top_k]. The Triton kernel is one program per token; the reference is plain torch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fractal.errors import FractalError
from fractal.kernels._triton_support import HAS_TRITON, next_pow2, pdl_launch, use_triton


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    scoring: str = "softmax"          # "softmax" | "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = False
    routed_scaling_factor: float = 1.0

    def validate(self, num_experts: int) -> None:
        if self.scoring not in ("softmax", "sigmoid"):
            raise FractalError(f"scoring {self.scoring!r} is not valid; valid: ['softmax', 'sigmoid']")
        if self.n_group < 1 or num_experts % self.n_group:
            raise FractalError(f"n_group {self.n_group} must divide the {num_experts} experts")
        if not 1 <= self.topk_group <= self.n_group:
            raise FractalError(f"topk_group {self.topk_group} must be in 1..n_group ({self.n_group})")
        per_group = num_experts // self.n_group
        if not 1 <= self.top_k <= self.topk_group * per_group:
            raise FractalError(
                f"top_k {self.top_k} must be in 1..{self.topk_group * per_group} (topk_group x experts per group)"
            )


if HAS_TRITON:
    from fractal.kernels._triton_support import pdl_wait, tl, triton

    @triton.jit
    def _route_kernel(
        logits_ptr, bias_ptr, w_ptr, id_ptr,
        stride_l, scale,
        G: tl.constexpr, GS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_GS: tl.constexpr,
        TOPK_GROUP: tl.constexpr, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
        SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        g = tl.arange(0, BLOCK_G)[:, None]
        j = tl.arange(0, BLOCK_GS)[None, :]
        valid = (g < G) & (j < GS)
        e = g * GS + j
        x = tl.load(logits_ptr + t * stride_l + e, mask=valid, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            s = tl.sigmoid(x)
        else:
            m = tl.max(tl.max(x, axis=1), axis=0)
            p = tl.exp(x - m)
            p = tl.where(valid, p, 0.0)
            s = p / tl.sum(tl.sum(p, axis=1), axis=0)
        c = s
        if HAS_BIAS:
            c = c + tl.load(bias_ptr + e, mask=valid, other=0.0).to(tl.float32)
        c = tl.where(valid, c, float("-inf"))
        if G > 1:
            m1 = tl.max(c, axis=1)
            if HAS_BIAS:
                i1 = tl.min(tl.where(c == m1[:, None], j, BLOCK_GS), axis=1)
                m2 = tl.max(tl.where(j == i1[:, None], float("-inf"), c), axis=1)
                gscore = m1 + m2
            else:
                gscore = m1
            g1 = tl.arange(0, BLOCK_G)
            gscore = tl.where(g1 < G, gscore, float("-inf"))
            keep = g1 < 0
            for _ in tl.static_range(TOPK_GROUP):
                gm = tl.max(gscore, axis=0)
                gi = tl.min(tl.where(gscore == gm, g1, BLOCK_G), axis=0)
                keep = keep | (g1 == gi)
                gscore = tl.where(g1 == gi, float("-inf"), gscore)
            c = tl.where(keep[:, None], c, float("-inf"))
        kk = tl.arange(0, BLOCK_K)
        ws = tl.zeros([BLOCK_K], dtype=tl.float32)
        ids = tl.zeros([BLOCK_K], dtype=tl.int32)
        big = BLOCK_G * BLOCK_GS
        for i in tl.static_range(TOP_K):
            cm = tl.max(tl.max(c, axis=1), axis=0)
            ci = tl.min(tl.min(tl.where(c == cm, e, big), axis=1), axis=0)
            wi = tl.sum(tl.sum(tl.where(e == ci, s, 0.0), axis=1), axis=0)
            ws = tl.where(kk == i, wi, ws)
            ids = tl.where(kk == i, ci, ids)
            c = tl.where(e == ci, float("-inf"), c)
        if RENORM:
            ws = ws / (tl.sum(ws, axis=0) + 1e-20)
        ws = ws * scale
        kmask = kk < TOP_K
        tl.store(w_ptr + t * TOP_K + kk, ws, mask=kmask)
        tl.store(id_ptr + t * TOP_K + kk, ids, mask=kmask)


def route_ref(
    logits: torch.Tensor, cfg: RoutingConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch routing (the many-kernel path); returns (weights float32 [T, k], ids int32 [T, k])."""
    T, E = logits.shape
    cfg.validate(E)
    x = logits.float()
    scores = torch.sigmoid(x) if cfg.scoring == "sigmoid" else torch.softmax(x, dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()[None, :]
    if cfg.n_group > 1:
        grouped = choice.view(T, cfg.n_group, E // cfg.n_group)
        if correction_bias is not None:
            gscore = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            gscore = grouped.max(dim=-1).values
        gidx = gscore.topk(cfg.topk_group, dim=-1).indices
        gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gidx, True)
        emask = gmask[:, :, None].expand_as(grouped).reshape(T, E)
        choice = choice.masked_fill(~emask, float("-inf"))
    ids = choice.topk(cfg.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if cfg.renormalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * cfg.routed_scaling_factor
    return weights, ids.to(torch.int32)


def route(
    logits: torch.Tensor, cfg: RoutingConfig, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused routing (one Triton kernel on CUDA; the reference elsewhere). See the module docstring."""
    if not use_triton(logits):
        return route_ref(logits, cfg, correction_bias)
    T, E = logits.shape
    cfg.validate(E)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    weights = torch.empty(T, cfg.top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, cfg.top_k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids
    gs = E // cfg.n_group
    bias = correction_bias if correction_bias is not None else logits
    block = next_pow2(max(2, cfg.n_group)) * next_pow2(max(2, gs))
    _route_kernel[(T,)](
        logits, bias, weights, ids, logits.stride(0), float(cfg.routed_scaling_factor),
        G=cfg.n_group, GS=gs, BLOCK_G=next_pow2(max(2, cfg.n_group)), BLOCK_GS=next_pow2(max(2, gs)),
        TOPK_GROUP=cfg.topk_group, TOP_K=cfg.top_k, BLOCK_K=next_pow2(max(2, cfg.top_k)),
        SIGMOID=cfg.scoring == "sigmoid", HAS_BIAS=correction_bias is not None, RENORM=cfg.renormalize,
        num_warps=1 if block <= 128 else (2 if block <= 512 else 4), **pdl_launch(),
    )
    return weights, ids
