"""Absorbed MLA decode attention over the paged latent cache (DeepSeek V2/V3), split-K for long contexts.

Layouts:
    q_latent     [B, H, L]     query already multiplied by W_UK (L = kv_lora_rank, e.g. 512)
    q_rope       [B, H, R]     rotated rope part of the query (R = qk_rope_head_dim, e.g. 64)
    latent_cache [num_blocks, block_size, L + R]   per token: [compressed kv c (L) | rotated k_rope (R)]
    block_tables int32 [B, max_blocks], seq_lens int32 [B]
    returns      [B, H, L] q_latent.dtype = softmax(scale * (q_latent c^T + q_rope k_rope^T)) c
(the caller then applies W_UV and o_proj). All heads share one latent "KV head" (MQA), so each program takes
BLOCK_H heads at once and reads the latent cache once per head block and split.
"""
from __future__ import annotations

import torch

from fractal.errors import FractalError
from fractal.kernels._triton_support import HAS_TRITON, NUM_SMS, next_pow2, pdl_launch, use_triton
from fractal.kernels.paged_attention import choose_splits, merge_splits

# launch tuning; see docs/perf-notes.md for the sweep that chose it
DEFAULT_CONFIG = dict(BLOCK_N=32, num_warps=4, num_stages=2, min_chunk=64, max_splits=16, programs_per_sm=2)
# one sequence: 32 one-tile chunks instead of 16 two-tile ones (round 6, H100 graph replay, ctx 1024: 13.5 vs 15.2 us;
# no gain from it at B >= 8)
SINGLE_SEQ_CONFIG = dict(min_chunk=32, max_splits=32)

if HAS_TRITON:
    from fractal.kernels._triton_support import pdl_wait, tl, triton

    # sizes that change every step are not specialised on (no recompile per value class)
    @triton.jit(do_not_specialize=["stride_bt", "chunk", "stride_ob", "stride_oh", "stride_lb", "stride_lh"])
    def _mla_decode_kernel(
        ql_ptr, qr_ptr, c_ptr, bt_ptr, sl_ptr, out_ptr, lse_ptr,
        stride_qlb, stride_qlh, stride_qrb, stride_qrh, stride_cblk, stride_ctok, stride_bt,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
        H, qk_scale, chunk,
        L: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        b = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        s = tl.program_id(2)
        seq_len = tl.load(sl_ptr + b)
        start = s * chunk
        end = tl.minimum(start + chunk, seq_len)
        h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = h < H
        dl = tl.arange(0, L)
        dr = tl.arange(0, R)
        ql = tl.load(ql_ptr + b * stride_qlb + h[:, None] * stride_qlh + dl[None, :], mask=hmask[:, None], other=0.0)
        qr = tl.load(qr_ptr + b * stride_qrb + h[:, None] * stride_qrh + dr[None, :], mask=hmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, L], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            blk = tl.load(bt_ptr + b * stride_bt + n // PAGE, mask=nmask, other=0).to(tl.int64)
            off = blk * stride_cblk + (n % PAGE).to(tl.int64) * stride_ctok
            c = tl.load(c_ptr + off[:, None] + dl[None, :], mask=nmask[:, None], other=0.0)
            kr = tl.load(c_ptr + off[:, None] + L + dr[None, :], mask=nmask[:, None], other=0.0)
            qk = tl.dot(ql, tl.trans(c))
            qk = tl.dot(qr, tl.trans(kr), qk)
            qk = tl.where(nmask[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c)
            m_i = m_new
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        o = acc / safe_l[:, None]
        if SPLIT:
            tl.store(out_ptr + b * stride_ob + h[:, None] * stride_oh + s * stride_os + dl[None, :], o,
                     mask=hmask[:, None])
            lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
            tl.store(lse_ptr + b * stride_lb + h * stride_lh + s, lse, mask=hmask)
        else:
            tl.store(out_ptr + b * stride_ob + h[:, None] * stride_oh + dl[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=hmask[:, None])


def mla_decode_ref(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain torch: gather each sequence's latent rows, float32 softmax, weighted sum of the latent rows."""
    B, H, L = q_latent.shape
    page = latent_cache.shape[1]
    out = torch.empty_like(q_latent)
    for b, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n, device=q_latent.device)
        rows = latent_cache[block_tables[b].long()[pos // page], pos % page].float()  # [n, L + R]
        c, kr = rows[:, :L], rows[:, L:]
        s = (q_latent[b].float() @ c.t() + q_rope[b].float() @ kr.t()) * scale
        out[b] = (torch.softmax(s, dim=-1) @ c).to(q_latent.dtype)
    return out


def mla_decode(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode (see module docstring); Triton on CUDA, the reference elsewhere.

    config overrides the launch tuning (keys BLOCK_H, BLOCK_N, num_warps, num_stages, min_chunk); for sweeps.
    """
    B, H, L = q_latent.shape
    R = q_rope.shape[-1]
    if latent_cache.dim() != 3 or latent_cache.shape[-1] != L + R:
        raise FractalError(
            f"latent_cache shape {tuple(latent_cache.shape)} does not fit q_latent {tuple(q_latent.shape)} and "
            f"q_rope {tuple(q_rope.shape)}: want [num_blocks, block_size, {L + R}]"
        )
    if not use_triton(q_latent, latent_cache) or L != next_pow2(L) or R != next_pow2(R):
        res = mla_decode_ref(q_latent, q_rope, latent_cache, block_tables, seq_lens, scale)
        if out is not None:
            out.copy_(res)
            return out
        return res
    if out is None:
        out = torch.empty_like(q_latent)
    if B == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())
    if q_latent.stride(-1) != 1 or q_rope.stride(-1) != 1 or latent_cache.stride(-1) != 1:
        raise FractalError("mla_decode needs a contiguous last dim in q_latent, q_rope and latent_cache")
    page = latent_cache.shape[1]
    cfg = dict(DEFAULT_CONFIG, BLOCK_H=16 if H <= 16 else 32)
    if B == 1:
        cfg.update(SINGLE_SEQ_CONFIG)
    cfg.update(config or {})
    hblocks = triton.cdiv(H, cfg["BLOCK_H"])
    splits, chunk = choose_splits(B * hblocks, max_seq_len, cfg["BLOCK_N"], cfg["min_chunk"],
                                  slots=cfg["programs_per_sm"] * NUM_SMS, max_splits=cfg["max_splits"])
    qk_scale = scale * 1.4426950408889634
    common = dict(L=L, R=R, BLOCK_H=cfg["BLOCK_H"], BLOCK_N=cfg["BLOCK_N"], PAGE=page, num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"], **pdl_launch())
    args = (q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
            latent_cache.stride(0), latent_cache.stride(1), block_tables.stride(0))
    if splits == 1:
        _mla_decode_kernel[(B, hblocks, 1)](
            q_latent, q_rope, latent_cache, block_tables, seq_lens, out, out, *args,
            out.stride(0), out.stride(1), 0, 0, 0, H, qk_scale, chunk, SPLIT=False, **common,
        )
        return out
    part = torch.empty(B, H, splits, L, dtype=torch.float32, device=q_latent.device)
    lse = torch.empty(B, H, splits, dtype=torch.float32, device=q_latent.device)
    _mla_decode_kernel[(B, hblocks, splits)](
        q_latent, q_rope, latent_cache, block_tables, seq_lens, part, lse, *args,
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), H, qk_scale, chunk,
        SPLIT=True, **common,
    )
    merge_splits(part, lse, out)
    return out
