"""Drop-in fast backends for fractal.layers' seams: `TritonAttentionBackend` and `TritonMoEBackend`.

They implement the same interfaces as the plain-torch references in fractal.layers.attention_backends and
fractal.layers.moe (same shapes, any mix of prefill and decode rows) with the kernels of this package, and fall
back to the reference for what the kernels do not cover (CPU tensors; an activation other than SiLU; a routing
rule whose group score does not follow the usual bias convention; an absorbed-MLA batch that is not decode-only).
`register_fast_backends()` registers both under the name "triton" and makes them the CUDA default.

CUDA graphs: decode kernels size their split-K grid from a host bound on the sequence length. Under graph
capture that bound must not change between replays: construct `TritonAttentionBackend(decode_seq_len_bound=
max_model_len)` (or set the attribute before capturing); eager runs use the batch's own max_seq_len.
"""
from __future__ import annotations

import torch

from fractal.kernels.mla_decode import mla_decode
from fractal.kernels.moe_experts import fused_experts
from fractal.kernels.moe_routing import RoutingConfig, route
from fractal.kernels.paged_attention import paged_decode_attention
from fractal.kernels.prefill_attention import paged_prefill_attention, varlen_attention
from fractal.kernels._triton_support import use_triton
from fractal.layers.attention_backends import (
    AttentionBackend,
    TorchAttentionBackend,
    register_attention_backend,
)
from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.moe import MoEBackend, MoEConfig, TorchMoEBackend, register_moe_backend


def _bound(meta: AttentionMetadata, bound: int | None) -> int:
    return bound if bound is not None else meta.max_seq_len


def gather_token_slots(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cache slots of every cached token of every sequence (seq 0's tokens first), and cu_seqlens_k.

    Built on the device from the host-known total, so no sync: slots int64 [sum(seq_lens)], cu int32 [N + 1].
    """
    dev = meta.seq_lens.device
    total = sum(meta.seq_lens_cpu)
    n = meta.num_seqs
    seq_lens = meta.seq_lens.to(torch.int64)
    cu = torch.zeros(n + 1, dtype=torch.int64, device=dev)
    cu[1:] = torch.cumsum(seq_lens, 0)
    seq_id = torch.repeat_interleave(torch.arange(n, device=dev), seq_lens, output_size=total)
    pos = torch.arange(total, device=dev) - cu[seq_id]
    blocks = meta.block_tables.to(torch.int64)[seq_id, pos // meta.block_size]
    return blocks * meta.block_size + pos % meta.block_size, cu.to(torch.int32)


class TritonAttentionBackend(TorchAttentionBackend):
    """Paged decode (split-K) and chunked-prefill kernels for GQA; absorbed MLA decode; varlen MLA prefill."""

    name = "triton"

    def __init__(self, decode_seq_len_bound: int | None = None) -> None:
        self.decode_seq_len_bound = decode_seq_len_bound

    # write_kv / write_mla: the reference's index_copy_ is already one kernel per tensor and graph-safe.

    def gqa_attention(self, q, kv_cache, meta, scale):
        if not use_triton(q, kv_cache):
            return super().gqa_attention(q, kv_cache, meta, scale)
        if kv_cache.dtype != q.dtype:
            q = q.to(kv_cache.dtype)
        if meta.is_decode_only:
            return paged_decode_attention(q, kv_cache, meta.block_tables, meta.seq_lens, scale,
                                          max_seq_len=_bound(meta, self.decode_seq_len_bound))
        return paged_prefill_attention(q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale,
                                       max_query_len=meta.max_query_len)

    def mla_decode(self, q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale):
        if not use_triton(q_nope, kv_cache) or not meta.is_decode_only:
            return super().mla_decode(q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale)
        # absorb W_UK: [H, T, Dn] @ [H, Dn, L] -> [T, H, L]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1).contiguous()
        o = mla_decode(q_latent, q_rope.contiguous(), kv_cache, meta.block_tables, meta.seq_lens, scale,
                       max_seq_len=_bound(meta, self.decode_seq_len_bound))
        # through W_UV: [H, T, L] @ [H, L, Dv] -> [T, H, Dv]
        return torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    def mla_prefill(self, q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale):
        if not use_triton(q_nope, kv_cache):
            return super().mla_prefill(q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale)
        rank = w_uk.shape[-1]
        heads, dn, dv = q_nope.shape[1], w_uk.shape[1], w_uv.shape[1]
        slots, cu_k = gather_token_slots(meta)
        entries = kv_cache.flatten(0, 1).index_select(0, slots).to(q_nope.dtype)  # [S, L + R]
        latent, k_rope = entries[:, :rank], entries[:, rank:]
        # expand per-head keys and values: [S, L] @ [L, H*Dn] and [L, H*Dv]
        k_nope = (latent @ w_uk.reshape(heads * dn, rank).t()).view(-1, heads, dn)
        v = (latent @ w_uv.reshape(heads * dv, rank).t()).view(-1, heads, dv)
        k = torch.cat((k_nope, k_rope[:, None, :].expand(-1, heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        return varlen_attention(q, k, v, meta.query_start_loc, cu_k, scale, max_query_len=meta.max_query_len)


class TritonMoEBackend(TorchMoEBackend):
    """One-kernel routing and grouped-GEMM experts (backend chosen by size; see moe_experts.default_backend)."""

    name = "triton"

    def select_experts(self, router_logits, cfg: MoEConfig, correction_bias):
        grouped = cfg.topk_method != "greedy"
        # the kernel scores groups by top-2 sum when there is a bias, else by max: V3 / V2 conventions
        if not use_triton(router_logits) or (grouped and (cfg.topk_method == "noaux_tc") != (correction_bias is not None)):
            return super().select_experts(router_logits, cfg, correction_bias)
        rcfg = RoutingConfig(
            top_k=cfg.top_k, scoring=cfg.scoring, n_group=cfg.n_group if grouped else 1,
            topk_group=cfg.topk_group if grouped else 1, renormalize=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        return route(router_logits, rcfg, correction_bias)

    def experts(self, x, w13, w2, topk_weights, topk_ids, hidden_act):
        if hidden_act not in ("silu", "swish") or not use_triton(x, w13, w2):
            return super().experts(x, w13, w2, topk_weights, topk_ids, hidden_act)
        return fused_experts(x, w13, w2, topk_weights, topk_ids)


def register_fast_backends(default_for_cuda: bool = True) -> None:
    """Registers "triton" attention and MoE backends (and makes them the CUDA default unless told not to)."""
    default_for = "cuda" if default_for_cuda else None
    register_attention_backend("triton", TritonAttentionBackend, default_for=default_for)
    register_moe_backend("triton", TritonMoEBackend, default_for=default_for)


__all__ = ["TritonAttentionBackend", "TritonMoEBackend", "register_fast_backends", "gather_token_slots",
           "AttentionBackend", "MoEBackend"]
