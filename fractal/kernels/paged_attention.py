"""Decode attention for GQA/MHA over a paged KV cache, split-K (flash-decoding) for long contexts.

Layouts:
    q            [B, Hq, D]                      one new token per sequence (its KV already in the cache)
    kv_cache     [2, num_blocks, block_size, Hkv, D]   (0 = K, 1 = V); Hq % Hkv == 0
    block_tables int32 [B, max_blocks]           physical block of each logical block (any order)
    seq_lens     int32 [B]                       tokens in the cache per sequence (>= 1)
    returns      [B, Hq, D] q.dtype = softmax(scale * q k^T) v over each sequence's seq_len tokens
The Triton path: grid (B, Hkv, splits); each program takes all Hq/Hkv query heads of one KV head (so K/V are
read once per KV head) over one slice of the context and writes a partial output + log-sum-exp; a second
kernel merges the splits. `max_seq_len` (host int, an upper bound) chooses the number of splits without a
device sync; pass a fixed bound under CUDA graphs so the launch shape stays the same.
"""
from __future__ import annotations

import math

import torch

from fractal.errors import FractalError
from fractal.kernels._triton_support import HAS_TRITON, NUM_SMS, next_pow2, pdl_launch, use_triton

# split-K bounds (round 2, docs/perf-notes.md): short chunks at small batch, merge tile of <= 32 x D floats
GQA_MIN_CHUNK = 64
GQA_MAX_SPLITS = 32

if HAS_TRITON:
    from fractal.kernels._triton_support import pdl_wait, tl, triton

    # sizes that change every step are not specialised on (no recompile per value class)
    @triton.jit(do_not_specialize=["stride_bt", "chunk", "stride_ob", "stride_oh", "stride_lb", "stride_lh"])
    def _gqa_decode_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, sl_ptr, out_ptr, lse_ptr,
        stride_qb, stride_qh, stride_kblk, stride_ktok, stride_kh, stride_bt,
        stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
        qk_scale, chunk,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
    ):
        pdl_wait(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        s = tl.program_id(2)
        seq_len = tl.load(sl_ptr + b)
        start = s * chunk
        end = tl.minimum(start + chunk, seq_len)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        gmask = g < G
        dmask = d < D
        qh = h * G + g
        q = tl.load(q_ptr + b * stride_qb + qh[:, None] * stride_qh + d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        kv_head = h.to(tl.int64) * stride_kh
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            blk = tl.load(bt_ptr + b * stride_bt + n // PAGE, mask=nmask, other=0).to(tl.int64)
            off = blk * stride_kblk + (n % PAGE).to(tl.int64) * stride_ktok + kv_head
            kvmask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            qk = tl.where(nmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + off[:, None] + d[None, :], mask=kvmask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        o = acc / safe_l[:, None]
        omask = gmask[:, None] & dmask[None, :]
        if SPLIT:
            o_ptrs = out_ptr + b * stride_ob + qh[:, None] * stride_oh + s * stride_os + d[None, :]
            tl.store(o_ptrs, o, mask=omask)
            lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))
            tl.store(lse_ptr + b * stride_lb + qh * stride_lh + s, lse, mask=gmask)
        else:
            o_ptrs = out_ptr + b * stride_ob + qh[:, None] * stride_oh + d[None, :]
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=omask)

    # sizes that change every step are not specialised on (no recompile per value class)
    @triton.jit(do_not_specialize=["stride_pb", "stride_ph", "stride_lb", "stride_lh", "S"])
    def _merge_splits_kernel(
        part_ptr, lse_ptr, out_ptr,
        stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
        S, D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):
        """out[b, h] = sum_s 2^(lse_s - max) part_s / sum_s 2^(lse_s - max) (log2 domain)."""
        pdl_wait(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, BLOCK_D)
        smask = s < S
        lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"))
        m = tl.max(lse, axis=0)
        w = tl.where(smask & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
        part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                       mask=smask[:, None] & (d[None, :] < D), other=0.0)
        o = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < D)


def merge_splits(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor) -> None:
    """part float32 [B, H, S, D], lse float32 [B, H, S] (log2 domain) -> out [B, H, D]."""
    B, H, S, D = part.shape
    _merge_splits_kernel[(B, H)](
        part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1), S, D=D, BLOCK_S=next_pow2(max(2, S)), BLOCK_D=next_pow2(D),
        num_warps=4 if D >= 256 else 2, **pdl_launch(),
    )


def choose_splits(batch_programs: int, max_seq_len: int, block_n: int, min_chunk: int = 256,
                  slots: int | None = None, max_splits: int | None = None) -> tuple[int, int]:
    """(splits, chunk tokens) with chunks of >= min_chunk tokens and at most max_splits splits.

    slots None: enough programs to fill the GPU about twice (GQA decode: small programs, many per SM).
    slots = programs that run at once (MLA decode: 2 per SM): at most one full wave, since a second, partial
    wave costs a whole program's time (measured: 320 programs 183 us vs 256 programs 137 us).
    At small batch the chunk length is the latency (each program walks its chunk serially, one dependent
    block-table + cache load per tile), so a small min_chunk lets B=1 use many short chunks; max_splits
    bounds the merge kernel's [splits, D] tile.
    """
    max_seq_len = max(1, max_seq_len)
    if slots is None:
        want = max(1, math.ceil(2 * NUM_SMS / max(1, batch_programs)))
    else:
        want = max(1, slots // max(1, batch_programs))
    if max_splits is not None:
        want = min(want, max_splits)
    splits = max(1, min(want, math.ceil(max_seq_len / min_chunk)))
    chunk = math.ceil(math.ceil(max_seq_len / splits) / block_n) * block_n
    splits = math.ceil(max_seq_len / chunk)
    return splits, chunk


def paged_decode_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain torch: gather each sequence's K/V from its blocks, float32 softmax attention."""
    B, Hq, D = q.shape
    _, _, page, Hkv, _ = kv_cache.shape
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n, device=q.device)
        blk = block_tables[b].long()[pos // page]
        k = kv_cache[0][blk, pos % page].float()  # [n, Hkv, D]
        v = kv_cache[1][blk, pos % page].float()
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v).to(q.dtype)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention (see module docstring); Triton on CUDA, the reference elsewhere."""
    B, Hq, D = q.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[-1] != D or Hq % kv_cache.shape[3]:
        raise FractalError(
            f"kv_cache shape {tuple(kv_cache.shape)} does not fit q {tuple(q.shape)}: "
            "want [2, num_blocks, block_size, Hkv, D] with Hq % Hkv == 0"
        )
    if not use_triton(q, kv_cache):
        res = paged_decode_attention_ref(q, kv_cache, block_tables, seq_lens, scale)
        if out is not None:
            out.copy_(res)
            return out
        return res
    if out is None:
        out = torch.empty_like(q)
    if B == 0:
        return out
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item())
    _, _, page, Hkv, _ = kv_cache.shape
    if kv_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise FractalError("paged_decode_attention needs a contiguous last dim in q and kv_cache")
    G = Hq // Hkv
    block_n = 64 if D <= 128 else 32
    splits, chunk = choose_splits(B * Hkv, max_seq_len, block_n, min_chunk=GQA_MIN_CHUNK, max_splits=GQA_MAX_SPLITS)
    qk_scale = scale * 1.4426950408889634  # log2(e): the kernel uses exp2
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    common = dict(G=G, BLOCK_G=max(16, next_pow2(G)), D=D, BLOCK_D=next_pow2(D), BLOCK_N=block_n, PAGE=page,
                  num_warps=4, num_stages=2, **pdl_launch())
    if splits == 1:
        _gqa_decode_kernel[(B, Hkv, 1)](
            q, k_cache, v_cache, block_tables, seq_lens, out, out,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            out.stride(0), out.stride(1), 0, 0, 0, qk_scale, chunk, SPLIT=False, **common,
        )
        return out
    part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, Hq, splits, dtype=torch.float32, device=q.device)
    _gqa_decode_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1), qk_scale, chunk,
        SPLIT=True, **common,
    )
    merge_splits(part, lse, out)
    return out
