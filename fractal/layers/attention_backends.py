"""Attention backends: how attention layers read and write the paged KV cache.

Model code calls only the methods of `AttentionBackend`; a device picks its implementation through
`get_attention_backend(device, name)`. `TorchAttentionBackend` is the plain-PyTorch reference (CPU default,
and the check for any faster backend): it loops over sequences, gathers each one's cache blocks through its
block table and attends causally over cached context + new tokens, with the same operation order as HF's eager
attention (scores in the input dtype, softmax in float32).

Shapes (T = new tokens in the flattened batch, H = query heads):
- GQA cache [2, num_blocks, block_size, num_kv_heads, head_dim]; q [T, H, D]; key/value [T, KVH, D].
- MLA cache [num_blocks, block_size, L + R] (L = kv_lora_rank latent after its RMSNorm, R = RoPE'd key);
  q_nope [T, H, Dn], q_rope [T, H, R]; w_uk [H, Dn, L] and w_uv [H, Dv, L] are kv_b_proj's weight split
  per head (k_nope = w_uk @ latent, v = w_uv @ latent).
"""
from __future__ import annotations

from typing import Callable

import torch

from fractal.errors import FractalError
from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.kv_cache_spec import KVCacheSpec

__all__ = [
    "AttentionBackend",
    "TorchAttentionBackend",
    "KVCacheSpec",
    "get_attention_backend",
    "register_attention_backend",
    "MLA_MODES",
]

MLA_MODES = ("auto", "absorb", "mha")


class AttentionBackend:
    """Interface; see the module docstring for shapes. All methods work on any mix of prefill and decode rows."""

    name = "base"

    def write_kv(self, kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """(a) GQA: store key/value [T, KVH, D] at flat slots [T]."""
        raise NotImplementedError

    def gqa_attention(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """(b) GQA causal attention of q [T, H, D] over each sequence's cache -> [T, H, D]."""
        raise NotImplementedError

    def write_mla(self, kv_cache: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor, slot_mapping: torch.Tensor,
                  norm: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """(a) MLA: store norm(latent) [T, L] (latent as is when norm is None) and k_rope [T, R] at flat slots [T].

        Passing the latent's RMSNorm lets a backend fuse it into the write (it is used nowhere else)."""
        raise NotImplementedError

    def mla_decode(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float,
    ) -> torch.Tensor:
        """(c) MLA with weight absorption: attend in latent space (q_nope absorbed by w_uk, output through w_uv)."""
        raise NotImplementedError

    def mla_prefill(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
        w_uk: torch.Tensor, w_uv: torch.Tensor, scale: float,
    ) -> torch.Tensor:
        """(d) MLA computed MHA-style: per-head keys/values expanded from the cached latents."""
        raise NotImplementedError


def _causal_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int, scale: float) -> torch.Tensor:
    """q [Q, H, Dk], k [S, H, Dk], v [S, H, Dv]; query i sits at position context_len + i -> [Q, H, Dv]."""
    num_q, num_k = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,shd->hqs", q, k) * scale
    q_pos = torch.arange(num_q, device=q.device)[:, None] + context_len
    k_pos = torch.arange(num_k, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.einsum("hqs,shv->qhv", probs, v)


def _seq_rows(meta: AttentionMetadata):
    """Yields (seq index, first row, query length, cached context length, total length)."""
    start = 0
    for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_cpu, meta.seq_lens_cpu)):
        yield i, start, q_len, seq_len - q_len, seq_len
        start += q_len


def _gather(cache_blocks: torch.Tensor, meta: AttentionMetadata, seq: int, seq_len: int) -> torch.Tensor:
    """cache_blocks [num_blocks, block_size, ...] -> this sequence's first seq_len tokens [seq_len, ...]."""
    n_blocks = -(-seq_len // meta.block_size)
    blocks = meta.block_tables[seq, :n_blocks].to(torch.long)
    return cache_blocks[blocks].flatten(0, 1)[:seq_len]


class TorchAttentionBackend(AttentionBackend):
    """Plain PyTorch reference implementation (any device)."""

    name = "torch"

    def write_kv(self, kv_cache, key, value, slot_mapping):
        flat = kv_cache.flatten(1, 2)  # [2, num_slots, KVH, D] view
        flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
        flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))

    def gqa_attention(self, q, kv_cache, meta, scale):
        out = torch.empty_like(q)
        group = q.shape[1] // kv_cache.shape[3]
        for i, start, q_len, ctx, seq_len in _seq_rows(meta):
            if q_len == 0:
                continue
            k = _gather(kv_cache[0], meta, i, seq_len).to(q.dtype).repeat_interleave(group, dim=1)
            v = _gather(kv_cache[1], meta, i, seq_len).to(q.dtype).repeat_interleave(group, dim=1)
            out[start:start + q_len] = _causal_attend(q[start:start + q_len], k, v, ctx, scale)
        return out

    def write_mla(self, kv_cache, latent, k_rope, slot_mapping, norm=None):
        if norm is not None:
            latent = norm(latent)
        flat = kv_cache.flatten(0, 1)  # [num_slots, L + R] view
        flat.index_copy_(0, slot_mapping, torch.cat((latent, k_rope), dim=-1).to(kv_cache.dtype))

    def mla_decode(self, q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale):
        rank = w_uk.shape[-1]
        out = q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uv.shape[1])
        q_latent = torch.einsum("thd,hdl->thl", q_nope, w_uk)  # absorb W_UK into the query
        q_full = torch.cat((q_latent, q_rope), dim=-1)         # [T, H, L + R]
        for i, start, q_len, ctx, seq_len in _seq_rows(meta):
            if q_len == 0:
                continue
            entries = _gather(kv_cache, meta, i, seq_len).to(q_nope.dtype)  # [S, L + R]
            heads = q_full.shape[1]
            keys = entries[:, None, :].expand(-1, heads, -1)              # one shared latent "head"
            values = entries[:, None, :rank].expand(-1, heads, -1)
            o_latent = _causal_attend(q_full[start:start + q_len], keys, values, ctx, scale)  # [Q, H, L]
            out[start:start + q_len] = torch.einsum("qhl,hvl->qhv", o_latent, w_uv)
        return out

    def mla_prefill(self, q_nope, q_rope, kv_cache, meta, w_uk, w_uv, scale):
        rank = w_uk.shape[-1]
        heads = q_nope.shape[1]
        out = q_nope.new_empty(q_nope.shape[0], heads, w_uv.shape[1])
        q_full = torch.cat((q_nope, q_rope), dim=-1)
        for i, start, q_len, ctx, seq_len in _seq_rows(meta):
            if q_len == 0:
                continue
            entries = _gather(kv_cache, meta, i, seq_len).to(q_nope.dtype)
            latent, k_rope = entries[:, :rank], entries[:, rank:]
            k_nope = torch.einsum("sl,hdl->shd", latent, w_uk)
            v = torch.einsum("sl,hvl->shv", latent, w_uv)
            k = torch.cat((k_nope, k_rope[:, None, :].expand(-1, heads, -1)), dim=-1)
            out[start:start + q_len] = _causal_attend(q_full[start:start + q_len], k, v, ctx, scale)
        return out


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"torch": TorchAttentionBackend}
_DEFAULT_BY_DEVICE_TYPE: dict[str, str] = {"cpu": "torch", "cuda": "torch"}


def register_attention_backend(name: str, factory: Callable[[], AttentionBackend], default_for: str | None = None) -> None:
    """Adds a backend (e.g. a Triton one); `default_for="cuda"` makes it the default on that device type."""
    _BACKENDS[name] = factory
    if default_for is not None:
        _DEFAULT_BY_DEVICE_TYPE[default_for] = name


def get_attention_backend(device: torch.device | str = "cpu", name: str | None = None) -> AttentionBackend:
    """The backend called `name`, or the default for the device type (plain torch unless one was registered)."""
    device_type = torch.device(device).type
    chosen = name or _DEFAULT_BY_DEVICE_TYPE.get(device_type, "torch")
    if chosen not in _BACKENDS:
        raise FractalError(f"attention backend {chosen!r} is not known; valid: {sorted(_BACKENDS)}")
    return _BACKENDS[chosen]()
