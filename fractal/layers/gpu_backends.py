"""GPU attention / MoE backends built on fractal.kernels, and fast variants of the small per-layer modules.

Importing this module registers (chosen automatically on CUDA by get_attention_backend / get_moe_backend):
- attention backend "triton" (default for cuda):
    decode rows (one new token with a cached context) -> kernels.paged_attention.paged_decode_attention (GQA)
    or kernels.mla_decode.mla_decode (MLA, absorbed); prefill rows -> kernels.prefill_attention
    (paged_prefill_attention for GQA; varlen_attention over latents decompressed to per-head K/V for MLA).
    A mixed batch is split: the scheduler puts decodes first, so decode rows are a prefix of the batch.
- MoE backend "triton" (default for cuda): kernels.moe_routing.route (one kernel) + kernels.moe_experts.fused_experts
    (grouped GEMMs, no host sync).
Every op falls back to the torch reference when its kernel is missing (ImportError) or does not apply.

Nothing here reads device values on the host: every launch decision comes from the host lists of
AttentionMetadata, so the forward has no host synchronisation and can be captured in a CUDA graph.
The split-K kernels get `max_seq_len` rounded up to `context_bucket`, the same bound the CUDA-graph runner
captures with, so eager and replayed decode steps launch the same kernels (identical numerics).

`accelerate_model(model)` swaps RMSNorm (incl. the fused residual add), RotaryEmbedding, GatedMLP, Router, Linear
(one-token batches through kernels.gemv), GQAAttention and MLAttention instances for subclasses whose forward calls
the Triton kernels (same parameters, same results up to rounding): fewer, larger kernels.
"""
from __future__ import annotations

import torch

from fractal.layers.attention_backends import AttentionBackend, TorchAttentionBackend, register_attention_backend
from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.moe import MoEBackend, MoEConfig, TorchMoEBackend, register_moe_backend
from fractal.layers.norm import RMSNorm

try:
    from fractal.kernels.paged_attention import paged_decode_attention
except ImportError:  # pragma: no cover - kernels not there yet
    paged_decode_attention = None
try:
    from fractal.kernels.mla_decode import mla_decode as mla_decode_kernel
except ImportError:  # pragma: no cover
    mla_decode_kernel = None
try:
    from fractal.kernels.prefill_attention import paged_prefill_attention, varlen_attention
except ImportError:  # pragma: no cover
    paged_prefill_attention = varlen_attention = None
try:
    from fractal.kernels.moe_routing import RoutingConfig, route
except ImportError:  # pragma: no cover
    RoutingConfig = route = None
try:
    from fractal.kernels.moe_experts import SHARED_IN_GEMV_MAX_TOKENS
    from fractal.kernels.moe_experts import default_backend as default_moe_backend
    from fractal.kernels.moe_experts import fused_experts, shared_fits_gemv, silu_and_mul
except ImportError:  # pragma: no cover
    fused_experts = silu_and_mul = shared_fits_gemv = default_moe_backend = None
try:
    from fractal.kernels.rmsnorm import fused_add_rms_norm as fused_add_rms_norm_kernel
    from fractal.kernels.rmsnorm import rms_norm as rms_norm_kernel
except ImportError:  # pragma: no cover
    rms_norm_kernel = fused_add_rms_norm_kernel = None
try:
    from fractal.kernels.kv_write import write_kv as write_kv_kernel
    from fractal.kernels.kv_write import write_mla as write_mla_kernel
except ImportError:  # pragma: no cover
    write_kv_kernel = write_mla_kernel = None
try:
    from fractal.kernels.rotary import build_cos_sin_cache, rotary_embedding_
except ImportError:  # pragma: no cover
    build_cos_sin_cache = rotary_embedding_ = None
try:
    from fractal.kernels.router_gemm import router_logits as router_logits_kernel
except ImportError:  # pragma: no cover
    router_logits_kernel = None

from fractal.kernels.mla_prep import mla_prep_  # noqa: E402
from fractal.kernels.qkv_prep import qkv_prep_  # noqa: E402
from fractal.layers.attention import GQAAttention  # noqa: E402
from fractal.layers.mla import MLAttention  # noqa: E402

MIN_CONTEXT_BUCKET = 1024


def context_bucket(max_seq_len: int) -> int:
    """Upper bound on the context that split-K decode kernels are launched for: the next power of two >= 1024."""
    n = max(int(max_seq_len), MIN_CONTEXT_BUCKET)
    return 1 << (n - 1).bit_length()


def mla_kernel_fits(kv_lora_rank: int, rope_dim: int) -> bool:
    """The absorbed-MLA Triton kernel needs power-of-two latent and RoPE widths of at least 16 (tl.dot)."""
    return all(n >= 16 and n & (n - 1) == 0 for n in (kv_lora_rank, rope_dim))


def fast_decode_supported(model) -> bool:
    """Whether every decode-time op of this model has a kernel (required for CUDA graphs: the torch
    reference attention reads the host lists of the metadata, which a captured graph cannot refresh)."""
    attn = model.config.attention
    if model.config.uses_mla:
        return mla_decode_kernel is not None and mla_kernel_fits(attn.kv_lora_rank, attn.qk_rope_head_dim)
    return paged_decode_attention is not None


def _h2d(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a device tensor without a stream sync (pinned staging, non-blocking copy)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _BatchSplit:
    """Per-step facts shared by all layers: which leading rows decode, and the prefill part's tensors."""

    def __init__(self, meta: AttentionMetadata) -> None:
        q_lens, seq_lens = meta.query_lens_cpu, meta.seq_lens_cpu
        nd = 0  # leading one-token rows: decodes (the scheduler puts them first), attended to absorbed / split-K
        while nd < len(q_lens) and q_lens[nd] == 1:
            nd += 1
        self.num_decode_seqs = nd
        self.num_decode_rows = nd
        self.prefill_q_lens = q_lens[nd:]  # 1-token chunks after a prefill go this way too (still correct)
        self.prefill_seq_lens = seq_lens[nd:]
        self.decode_bound = context_bucket(max(seq_lens[:nd], default=1))
        self._dev: dict | None = None

    def device_tensors(self, meta: AttentionMetadata) -> dict:
        """Prefill-part tensors (built once per step on the first layer that needs them)."""
        if self._dev is None:
            nd = self.num_decode_seqs
            dev = meta.seq_lens.device
            cu_q = [0]
            for q in self.prefill_q_lens:
                cu_q.append(cu_q[-1] + q)
            cu_k = [0]
            for s in self.prefill_seq_lens:
                cu_k.append(cu_k[-1] + s)
            self._dev = dict(
                cu_q=_h2d(cu_q, torch.int32, dev),
                cu_k=_h2d(cu_k, torch.int32, dev),
                seq_lens=meta.seq_lens[nd:],
                block_tables=meta.block_tables[nd:],
                total_k=cu_k[-1],
                max_q=max(self.prefill_q_lens, default=1),
            )
        return self._dev


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through fractal.kernels; the torch reference for whatever has no kernel."""

    name = "triton"
    supports_cuda_graphs = True

    def __init__(self) -> None:
        self.ref = TorchAttentionBackend()
        self._meta: AttentionMetadata | None = None
        self._split: _BatchSplit | None = None

    def split(self, meta: AttentionMetadata) -> _BatchSplit:
        if self._meta is not meta:
            self._meta, self._split = meta, _BatchSplit(meta)
        return self._split

    # --- cache writes (index_copy_: no host sync, graph-safe) -----------------------------------------
    def write_kv(self, kv_cache, key, value, slot_mapping):
        if write_kv_kernel is None:
            return self.ref.write_kv(kv_cache, key, value, slot_mapping)
        write_kv_kernel(kv_cache, key, value, slot_mapping)

    def write_mla(self, kv_cache, latent, k_rope, slot_mapping, norm=None):
        if write_mla_kernel is not None and isinstance(norm, RMSNorm):  # norm fused into the write: one kernel
            return write_mla_kernel(kv_cache, latent, norm.weight, norm.eps, k_rope, slot_mapping)
        self.ref.write_mla(kv_cache, latent, k_rope, slot_mapping, norm)

    # --- GQA ------------------------------------------------------------------------------------------
    def gqa_attention(self, q, kv_cache, meta, scale):
        if paged_decode_attention is None or paged_prefill_attention is None:
            return self.ref.gqa_attention(q, kv_cache, meta, scale)
        sp = self.split(meta)
        nd = sp.num_decode_rows
        out = torch.empty_like(q)
        if nd:
            paged_decode_attention(
                q[:nd], kv_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                max_seq_len=sp.decode_bound, out=out[:nd],
            )
        if nd < q.shape[0]:
            t = sp.device_tensors(meta)
            paged_prefill_attention(
                q[nd:], kv_cache, t["cu_q"], t["seq_lens"], t["block_tables"], scale,
                max_query_len=t["max_q"], out=out[nd:],
            )
        return out

    # --- MLA ------------------------------------------------------------------------------------------
    def _absorbed(self, q_nope, q_rope, kv_cache, block_tables, seq_lens, bound, w_uk, w_uv, scale):
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, L]
        o_latent = mla_decode_kernel(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale, max_seq_len=bound)
        # written head-strided straight into [T, H, Dv] (cuBLAS takes the row stride H * Dv), so that the o_proj
        # input needs no copy (a 2 MB copy per layer at b=512 otherwise: R9-10)
        out = o_latent.new_empty(o_latent.shape[0], o_latent.shape[1], w_uv.shape[1])
        torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
        return out

    def mla_decode(self, q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale):
        if mla_decode_kernel is None or not mla_kernel_fits(w_uk.shape[-1], q_rope.shape[-1]):
            return self.ref.mla_decode(q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale)
        sp = self.split(meta)
        if sp.num_decode_rows != q_nope.shape[0]:  # forced "absorb" on a prefill batch: reference path
            return self.ref.mla_decode(q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale)
        return self._absorbed(q_nope, q_rope, kv_cache, meta.block_tables, meta.seq_lens,
                              sp.decode_bound, w_uk, w_uv, scale)

    def mla_prefill(self, q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale):
        if varlen_attention is None or mla_decode_kernel is None or not mla_kernel_fits(w_uk.shape[-1],
                                                                                         q_rope.shape[-1]):
            return self.ref.mla_prefill(q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale)
        sp = self.split(meta)
        nd = sp.num_decode_rows
        heads, rank = q_nope.shape[1], w_uk.shape[-1]
        out = q_nope.new_empty(q_nope.shape[0], heads, w_uv.shape[1])
        if nd:  # decode rows of a mixed batch: absorbed, over the latents directly
            out[:nd] = self._absorbed(q_nope[:nd], q_rope[:nd], kv_cache, meta.block_tables[:nd],
                                      meta.seq_lens[:nd], sp.decode_bound, w_uk, w_uv, scale)
        if nd == q_nope.shape[0]:
            return out
        t = sp.device_tensors(meta)
        # decompress the context latents of the prefill sequences into per-head K and V (MHA-style MLA)
        total, bs = t["total_k"], meta.block_size
        n_pf = t["seq_lens"].shape[0]
        seq_of = torch.repeat_interleave(torch.arange(n_pf, device=q_nope.device), t["seq_lens"].long(),
                                         output_size=total)
        pos = torch.arange(total, device=q_nope.device) - t["cu_k"][:-1].long()[seq_of]
        slots = t["block_tables"].long()[seq_of, pos // bs] * bs + pos % bs
        entries = kv_cache.flatten(0, 1).index_select(0, slots).to(q_nope.dtype)  # [S, L + R]
        latent, k_rope = entries[:, :rank], entries[:, rank:]
        # one GEMM gives every head's k_nope | v; K and V are strided views of it, the rope parts go in separately
        dn = w_uk.shape[1]
        kv = (latent @ self._kv_b_weight(w_uk, w_uv)).view(-1, heads, dn + w_uv.shape[1])  # [S, H, Dn + Dv]
        varlen_attention(q_nope[nd:], kv[..., :dn], kv[..., dn:], t["cu_q"], t["cu_k"], scale,
                         max_query_len=t["max_q"], out=out[nd:], q_rope=q_rope[nd:], k_rope=k_rope)
        return out

    def _kv_b_weight(self, w_uk, w_uv):
        """[L, H * (Dn + Dv)] so `latent @ W` is [S, H, Dn + Dv] (k_nope | v per head): kv_b_proj's own storage
        when w_uk [H, Dn, L] / w_uv [H, Dv, L] are its per-head views (no copy), else built once and cached."""
        (h, dn, rank), dv = w_uk.shape, w_uv.shape[1]
        if (w_uk.stride() == w_uv.stride() == ((dn + dv) * rank, rank, 1) and w_uk.dtype == w_uv.dtype
                and w_uk.untyped_storage().data_ptr() == w_uv.untyped_storage().data_ptr()
                and w_uv.data_ptr() == w_uk.data_ptr() + dn * rank * w_uk.element_size()):
            return w_uk.as_strided((h * (dn + dv), rank), (rank, 1)).t()
        cache = self.__dict__.setdefault("_kv_b_cache", {})
        key = (w_uk.data_ptr(), w_uv.data_ptr(), tuple(w_uk.shape), tuple(w_uv.shape), w_uk.dtype)
        if key not in cache:
            cache[key] = torch.cat((w_uk, w_uv), dim=1).reshape(h * (dn + dv), rank).t()
        return cache[key]


class TritonMoEBackend(MoEBackend):
    """Fused routing + grouped-GEMM experts; the torch reference where a kernel is missing."""

    name = "triton"

    def __init__(self) -> None:
        self.ref = TorchMoEBackend()
        self._routing: dict[MoEConfig, object] = {}

    def select_experts(self, router_logits, cfg, correction_bias):
        if route is None:
            return self.ref.select_experts(router_logits, cfg, correction_bias)
        rc = self._routing.get(cfg)
        if rc is None:
            grouped = cfg.topk_method != "greedy"
            rc = RoutingConfig(
                top_k=cfg.top_k, scoring=cfg.scoring, n_group=cfg.n_group if grouped else 1,
                topk_group=cfg.topk_group if grouped else 1, renormalize=cfg.norm_topk_prob,
                routed_scaling_factor=cfg.routed_scaling_factor,
            )
            self._routing[cfg] = rc
        return route(router_logits, rc, correction_bias)

    def experts(self, x, w13, w2, topk_weights, topk_ids, hidden_act):
        if fused_experts is None or hidden_act not in ("silu", "swish"):
            return self.ref.experts(x, w13, w2, topk_weights, topk_ids.long(), hidden_act)
        return fused_experts(x, w13, w2, topk_weights, topk_ids)

    def experts_and_shared(self, x, w13, w2, topk_weights, topk_ids, hidden_act, shared):
        """Up to SHARED_IN_GEMV_MAX_TOKENS tokens the shared expert runs inside the gemv launches (one weight
        read per token, fewer launches); above, cuBLAS reads its weights once and the combine kernel adds it."""
        if shared is None or fused_experts is None or hidden_act not in ("silu", "swish"):
            return super().experts_and_shared(x, w13, w2, topk_weights, topk_ids, hidden_act, shared)
        if (default_moe_backend(topk_ids.numel()) == "gemv" and x.shape[0] <= SHARED_IN_GEMV_MAX_TOKENS
                and type(shared) in (GatedMLP, FastGatedMLP)
                and shared.act is torch.nn.functional.silu and shared.down_proj.bias is None
                and shared.gate_up_proj.bias is None
                and shared_fits_gemv(w13, shared.gate_up_proj.weight, shared.down_proj.weight)):
            return fused_experts(x, w13, w2, topk_weights, topk_ids, backend="gemv",
                                 shared=(shared.gate_up_proj.weight, shared.down_proj.weight))
        return fused_experts(x, w13, w2, topk_weights, topk_ids, add=shared(x))


register_attention_backend("triton", TritonAttentionBackend, default_for="cuda")
register_moe_backend("triton", TritonMoEBackend, default_for="cuda")


# --- fast variants of the small per-layer modules ------------------------------------------------------
from torch import nn  # noqa: E402

from fractal.kernels.gemv import dense_linear, gemv_silu_and_mul  # noqa: E402
from fractal.kernels.gemv import fits as gemv_fits  # noqa: E402
from fractal.layers.linear import MergedLinear  # noqa: E402
from fractal.layers.mlp import GatedMLP  # noqa: E402
from fractal.layers.moe import Router  # noqa: E402
from fractal.layers.rotary import RotaryEmbedding  # noqa: E402


class FastRMSNorm(RMSNorm):
    """RMSNorm (and the fused residual add + RMSNorm) through one Triton kernel (same rounding as the torch module)."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm_kernel(x, self.weight, self.eps)
        return fused_add_rms_norm_kernel(x, residual, self.weight, self.eps)


class _GemvLinearForward:
    """forward through kernels.gemv.dense_linear: a GEMV kernel for one-token batches, F.linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense_linear(x, self.weight, self.bias)


class FastLinear(_GemvLinearForward, nn.Linear):
    pass


class FastMergedLinear(_GemvLinearForward, MergedLinear):  # q/k/v, gate/up
    pass


class FastGatedMLP(GatedMLP):
    """silu(gate) * up in one kernel between the two GEMMs; for one token, the gate/up GEMV with the SiLU-and-mul
    in its epilogue (kernels.gemv) and the down GEMV."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gate_up_proj.weight
        if self.gate_up_proj.bias is None and gemv_fits(x, w):
            return self.down_proj(gemv_silu_and_mul(x, w))
        h = self.gate_up_proj(x)
        if h.dim() != 2:
            return super().forward(x)
        return self.down_proj(silu_and_mul(h))


class FastRouter(Router):
    """Router logits through kernels.router_gemm.router_logits (16-bit operands, exact float32 products and
    accumulation: one launch). A float32 router (DeepSeek) gets the float32 logits with no float32 copy of x; a
    16-bit router (Qwen3-MoE) gets them rounded once to x's dtype, as its bf16 linear rounds them (one small
    launch instead of a cuBLAS GEMM sized for large matrices). Without the kernel a float32 router runs the
    float32 linear on a weight converted once, not on every step."""

    weight_fp32: torch.Tensor | None = None  # set by accelerate_model only where the kernel cannot run

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_fp32 is None:
            return router_logits_kernel(x, self.weight, torch.float32 if self.fp32 else x.dtype)
        return torch.nn.functional.linear(x.float(), self.weight_fp32)


class FastRotaryEmbedding(RotaryEmbedding):
    """RoPE in place from a float32 cos/sin table shared by every layer with the same RopeConfig."""

    cos_sin_cache: torch.Tensor

    def forward(self, positions, q, k):
        rotary_embedding_(positions, q, k, self.cos_sin_cache, self.cfg.style)
        return q, k


class FastGQAAttention(GQAAttention):
    """GQA attention whose q/k RMSNorm (Qwen3), RoPE and KV-cache write run as one kernel on the qkv GEMM's output
    (kernels.qkv_prep: in place, q and k stay views of it); then the backend's attention and o_proj as before."""

    def forward(self, positions, x, kv_cache, meta):
        cfg = self.cfg
        norms = (dict(q_norm_weight=self.q_norm.weight, k_norm_weight=self.k_norm.weight, eps=self.q_norm.eps)
                 if cfg.qk_norm else {})
        q, _, _ = qkv_prep_(
            self.qkv_proj(x), positions, self.rotary.cos_sin_cache, self.rotary.cfg.style, self.rotary.cfg.rotary_dim,
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, kv_cache, meta.slot_mapping, **norms,
        )
        out = self.backend.gqa_attention(q, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(-1, cfg.num_heads * cfg.head_dim))


class FastMLAttention(MLAttention):
    """MLA whose RoPE (q and k rope parts) and latent-cache write (kv_a_layernorm + [latent | k_rope]) run as one
    kernel (kernels.mla_prep), in place on the projection output."""

    input_linear = staticmethod(dense_linear)  # the fused q / kv_a projection: a GEMV kernel for one token

    def rope_and_cache(self, positions, q, kv_a, kv_cache, meta):
        cfg = self.cfg
        mla_prep_(q, kv_a, positions, self.rotary.cos_sin_cache, self.rotary.cfg.style, self.kv_a_layernorm.weight,
                  self.kv_a_layernorm.eps, kv_cache, meta.slot_mapping)
        return q.split([cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)


def _fusable_attention_input(module: GQAAttention | MLAttention) -> bool:
    """The fused prep kernels apply: the Triton backend (its cache layouts and attention), the kernel RoPE table,
    and plain RMSNorms (MLA's latent norm; Qwen3's q/k norms)."""
    if isinstance(module, MLAttention):
        norms = [module.kv_a_layernorm]
    else:
        norms = [module.q_norm, module.k_norm] if module.cfg.qk_norm else []
    return (isinstance(module.backend, TritonAttentionBackend) and type(module.rotary) is FastRotaryEmbedding
            and all(isinstance(n, RMSNorm) for n in norms))


def accelerate_model(model: torch.nn.Module, max_positions: int | None = None) -> dict[str, int]:
    """Swap RMSNorm / RotaryEmbedding / GatedMLP / Router / GQAAttention / MLAttention modules for kernel-backed
    subclasses and fuse MLA's input projections (CUDA only).

    max_positions bounds the RoPE table (default: each RopeConfig's max_position_embeddings).
    Returns how many modules of each kind were swapped.
    """
    swapped = {"rmsnorm": 0, "rotary": 0, "mlp": 0, "router": 0, "fused_input_gemm": 0, "gqa_prep": 0, "mla_prep": 0,
               "linear": 0}
    tables: dict = {}
    for module in model.modules():
        device = next((p.device for p in module.parameters()), None)
        if type(module) is RMSNorm and rms_norm_kernel is not None and module.weight.is_cuda:
            module.__class__ = FastRMSNorm
            swapped["rmsnorm"] += 1
        elif (type(module) is GatedMLP and silu_and_mul is not None and module.act is torch.nn.functional.silu
              and device is not None and device.type == "cuda"):
            module.__class__ = FastGatedMLP
            swapped["mlp"] += 1
        elif type(module) is Router and module.weight.is_cuda and module.weight.dtype != torch.float32:
            kernel_fits = router_logits_kernel is not None and module.weight.dtype in (torch.bfloat16, torch.float16)
            if kernel_fits or module.fp32:  # a 16-bit gate without the kernel stays the plain 16-bit linear
                if not kernel_fits:
                    module.weight_fp32 = module.weight.detach().float()  # only the torch fallback reads it
                module.__class__ = FastRouter
                swapped["router"] += 1
        elif (type(module) in (nn.Linear, MergedLinear) and module.weight.is_cuda
              and module.weight.dtype in (torch.bfloat16, torch.float16)):
            module.__class__ = FastLinear if type(module) is nn.Linear else FastMergedLinear
            swapped["linear"] += 1
        elif hasattr(module, "fuse_input_projections") and device is not None and device.type == "cuda":
            module.fuse_input_projections()  # MLA: q(_a)_proj and kv_a_proj_with_mqa as one GEMM
            swapped["fused_input_gemm"] += 1
    # rotary modules hold no parameters: take the device from the model
    device = next(model.parameters()).device
    if device.type == "cuda" and rotary_embedding_ is not None:
        for module in model.modules():
            if type(module) is RotaryEmbedding:
                cfg = module.cfg
                n = max_positions or cfg.max_position_embeddings
                key = (cfg, n)
                if key not in tables:
                    tables[key] = build_cos_sin_cache(module.inv_freq(device), n, module.attention_scaling)
                module.__class__ = FastRotaryEmbedding
                module.cos_sin_cache = tables[key]
                swapped["rotary"] += 1
        fast_attention = {GQAAttention: (FastGQAAttention, "gqa_prep"), MLAttention: (FastMLAttention, "mla_prep")}
        for module in model.modules():  # after the RoPE swap: the fused prep reads its table
            fast, key = fast_attention.get(type(module), (None, None))
            if fast is not None and _fusable_attention_input(module):
                module.__class__ = fast
                swapped[key] += 1
    if device.type == "cuda" and hasattr(model, "logits_linear"):  # the lm_head: a GEMV kernel for one token
        model.logits_linear = dense_linear
    return swapped
