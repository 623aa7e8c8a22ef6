"""Causal attention for variable-length, chunked prefill whose earlier tokens sit in the paged KV cache.

The batch is flattened as in AttentionMetadata: sequence i's new tokens are q rows
query_start_loc[i] : query_start_loc[i+1] and sit at positions ctx_i .. seq_len_i - 1, where
ctx_i = seq_len_i - q_len_i tokens were cached before this step (prefix reuse or earlier chunks). Query row j of
sequence i attends to keys 0 .. ctx_i + j ("lower-right" causal). A decode is the case q_len = 1.

Two key/value sources, one Triton kernel:
    paged:      kv_cache [2, num_blocks, block_size, Hkv, D] + block_tables int32 [N, max_blocks]
                (the new tokens' K/V already written at their slots)           -> paged_prefill_attention
    contiguous: k [S, Hkv, Dqk], v [S, Hkv, Dv] flattened with cu_seqlens_k int32 [N + 1], sequence i's
                keys at rows cu_seqlens_k[i] : cu_seqlens_k[i+1] (e.g. MLA prefill after decompressing
                the latent cache; Dqk may differ from Dv, e.g. 192 / 128)     -> varlen_attention
                optionally split: q_rope [T, Hq, R] and k_rope [S, R] (one RoPE key per token, shared by all
                heads) add a second QK term, so MLA's q / k need no nope|rope concatenation (q, k: the nope parts)
q [T, Hq, Dqk], output [T, Hq, Dv] in q's dtype; q / k / v (and q_rope / k_rope) may be strided views whose last
dim is contiguous. `sdpa_prefill_attention` is the gathered-KV + SDPA baseline the benchmark compares against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from fractal.errors import FractalError
from fractal.kernels._triton_support import HAS_TRITON, next_pow2, use_triton

if HAS_TRITON:
    from fractal.kernels._triton_support import tl, triton

    @triton.jit
    def _attn_tiles(
        acc, m_i, l_i, q, q2, k_ptr, k2_ptr, v_ptr, bt_row_ptr, lo, hi, k_row0, seq_len, pos,
        stride_kblk, stride_ktok, kv_head_k, stride_k2tok, stride_vblk, stride_vtok, kv_head_v, qk_scale,
        dqk, dqk2, dv, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, SPLIT: tl.constexpr, MASK: tl.constexpr,
    ):
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < seq_len
            if PAGED:
                blk = tl.load(bt_row_ptr + n // PAGE, mask=nmask, other=0).to(tl.int64)
                tok = (n % PAGE).to(tl.int64)
                koff = blk * stride_kblk + tok * stride_ktok + kv_head_k
                voff = blk * stride_vblk + tok * stride_vtok + kv_head_v
            else:
                row = (k_row0 + n).to(tl.int64)
                koff = row * stride_ktok + kv_head_k
                voff = row * stride_vtok + kv_head_v
            k = tl.load(k_ptr + koff[:, None] + dqk[None, :], mask=nmask[:, None] & (dqk[None, :] < DQK), other=0.0)
            qk = tl.dot(q, tl.trans(k))
            if D2 > 0:  # head dim = D1 + D2 (e.g. 128 + 64 for MLA's nope + rope): a second, smaller dot
                if SPLIT:  # separate rope keys [S, DR], one per token for all heads
                    k2 = tl.load(k2_ptr + (k_row0 + n).to(tl.int64)[:, None] * stride_k2tok + dqk2[None, :],
                                 mask=nmask[:, None] & (dqk2[None, :] < DR), other=0.0)
                else:      # the rest of the same row, from column D1
                    k2 = tl.load(k_ptr + koff[:, None] + D1 + dqk2[None, :],
                                 mask=nmask[:, None] & (dqk2[None, :] < DR), other=0.0)
                qk = tl.dot(q2, tl.trans(k2), qk)
            qk = qk * qk_scale
            if MASK:
                qk = tl.where((n[None, :] <= pos[:, None]) & nmask[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + voff[:, None] + dv[None, :], mask=nmask[:, None] & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        return acc, m_i, l_i

    # sizes that change every step are not specialised on (no recompile per value class)
    # metadata pointers may be slices past the decode rows (not 16-byte aligned): no variant per alignment
    @triton.jit(do_not_specialize=["stride_bt"],
                do_not_specialize_on_alignment=["qsl_ptr", "sl_ptr", "bt_ptr", "cuk_ptr"])
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, qsl_ptr, sl_ptr, bt_ptr, cuk_ptr, q2_ptr, k2_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kblk, stride_ktok, stride_kh, stride_vblk, stride_vtok, stride_vh, stride_bt,
        stride_q2t, stride_q2h, stride_k2tok,
        qk_scale,
        G: tl.constexpr, DQK: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, DR: tl.constexpr,
        DV: tl.constexpr, BLOCK_DV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PAGED: tl.constexpr, SPLIT: tl.constexpr,
    ):
        # SPLIT: QK over two operand pairs read in place, q [.., DQK] . k and q2 [.., DR] . k2 (k2 [S, DR], shared
        # by all heads); else one head dim DQK, split into D1 + D2 columns when D2 > 0
        pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest (last) query blocks start first
        seq = tl.program_id(1).to(tl.int64)
        hq = tl.program_id(2)
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
        m0 = pid_m * BLOCK_M
        if m0 >= q_len:
            return
        seq_len = tl.load(sl_ptr + seq)
        ctx = seq_len - q_len
        hk = (hq // G).to(tl.int64)
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < q_len
        dqk = tl.arange(0, D1)
        dqk2 = tl.arange(0, D2 if D2 > 0 else 16)
        dv = tl.arange(0, BLOCK_DV)
        q_rows = (q_start + rows).to(tl.int64)
        q_row_ptr = q_ptr + q_rows[:, None] * stride_qt + hq * stride_qh
        q = tl.load(q_row_ptr + dqk[None, :], mask=rmask[:, None] & (dqk[None, :] < DQK), other=0.0)
        if D2 > 0:
            if SPLIT:
                q2_row_ptr = q2_ptr + q_rows[:, None] * stride_q2t + hq * stride_q2h
            else:
                q2_row_ptr = q_row_ptr + D1
            q2 = tl.load(q2_row_ptr + dqk2[None, :], mask=rmask[:, None] & (dqk2[None, :] < DR), other=0.0)
        else:
            q2 = q
        pos = ctx + rows
        if PAGED:
            k_row0 = 0
        else:
            k_row0 = tl.load(cuk_ptr + seq)
        bt_row_ptr = bt_ptr + seq * stride_bt
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        full_end = (ctx + m0 + 1) // BLOCK_N * BLOCK_N        # tiles every row of this block sees whole
        hi = tl.minimum(seq_len, ctx + m0 + BLOCK_M)
        acc, m_i, l_i = _attn_tiles(
            acc, m_i, l_i, q, q2, k_ptr, k2_ptr, v_ptr, bt_row_ptr, 0, full_end, k_row0, seq_len,
            pos, stride_kblk, stride_ktok, hk * stride_kh, stride_k2tok, stride_vblk, stride_vtok, hk * stride_vh,
            qk_scale, dqk, dqk2, dv, DQK, D1, D2, DR, DV, BLOCK_N, PAGE, PAGED, SPLIT, False,
        )
        acc, m_i, l_i = _attn_tiles(
            acc, m_i, l_i, q, q2, k_ptr, k2_ptr, v_ptr, bt_row_ptr, full_end, hi, k_row0, seq_len,
            pos, stride_kblk, stride_ktok, hk * stride_kh, stride_k2tok, stride_vblk, stride_vtok, hk * stride_vh,
            qk_scale, dqk, dqk2, dv, DQK, D1, D2, DR, DV, BLOCK_N, PAGE, PAGED, SPLIT, True,
        )
        o = acc / l_i[:, None]
        tl.store(out_ptr + q_rows[:, None] * stride_ot + hq * stride_oh + dv[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (dv[None, :] < DV))


def _lower_right_mask(q_len: int, k_len: int, device) -> torch.Tensor:
    rows = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    return torch.arange(k_len, device=device)[None, :] <= rows


def _attend_ref(q, k, v, scale):
    """q [Lq, Hq, Dqk], k [Lk, Hkv, Dqk], v [Lk, Hkv, Dv]: float32 lower-right causal attention."""
    g = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(g, dim=1)
    v = v.float().repeat_interleave(g, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    s = s.masked_fill(~_lower_right_mask(q.shape[0], k.shape[0], q.device)[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v).to(q.dtype)


def _gather_paged(kv_cache, table, n):
    page = kv_cache.shape[2]
    pos = torch.arange(n, device=kv_cache.device)
    blk = table.long()[pos // page]
    return kv_cache[0][blk, pos % page], kv_cache[1][blk, pos % page]


def paged_prefill_attention_ref(q, kv_cache, query_start_loc, seq_lens, block_tables, scale):
    """Plain torch, one sequence at a time, float32 softmax."""
    out = torch.empty_like(q)
    qsl = query_start_loc.tolist()
    for i, n in enumerate(seq_lens.tolist()):
        k, v = _gather_paged(kv_cache, block_tables[i], n)
        out[qsl[i]: qsl[i + 1]] = _attend_ref(q[qsl[i]: qsl[i + 1]], k, v, scale)
    return out


def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, q_rope=None, k_rope=None):
    """Plain torch, one sequence at a time, float32 softmax; q_rope / k_rope are concatenated to q / k."""
    if q_rope is not None:
        q = torch.cat((q, q_rope), dim=-1)
        k = torch.cat((k, k_rope[:, None, :].expand(-1, k.shape[1], -1)), dim=-1)
    out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        out[cq[i]: cq[i + 1]] = _attend_ref(q[cq[i]: cq[i + 1]], k[ck[i]: ck[i + 1]], v[ck[i]: ck[i + 1]], scale)
    return out


def sdpa_prefill_attention(q, kv_cache, query_start_loc, seq_lens, block_tables, scale,
                           query_lens_cpu: list[int], seq_lens_cpu: list[int]):
    """Baseline: gather each sequence's K/V (GQA heads repeated), then torch SDPA, one call per sequence."""
    out = torch.empty_like(q)
    start = 0
    g = q.shape[1] // kv_cache.shape[3]
    for i, (ql, n) in enumerate(zip(query_lens_cpu, seq_lens_cpu)):
        k, v = _gather_paged(kv_cache, block_tables[i], n)
        qi = q[start: start + ql].transpose(0, 1)[None]
        ki, vi = k.transpose(0, 1)[None], v.transpose(0, 1)[None]
        if g > 1:
            ki, vi = ki.repeat_interleave(g, dim=1), vi.repeat_interleave(g, dim=1)
        if ql == n:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale)
        else:  # lower-right causal bias: SDPA keeps its flash/efficient kernels for it
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=causal_lower_right(ql, n), scale=scale)
        out[start: start + ql] = o[0].transpose(0, 1)
        start += ql
    return out


def default_config(max_q_len: int, block_dqk: int, block_dv: int) -> dict:
    """Launch tuning by head dims and query length (see docs/perf-notes.md for the sweep)."""
    if max(block_dqk, block_dv) > 128:   # MLA prefill (192 = 128 + 64, v 128): sweep 1.06 -> 1.01 ms at 1x8192
        if max_q_len >= 1024:
            return dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3)
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if max_q_len >= 1024:   # sweep at 1x8192: m128n128w8s3 1455 us vs m128n64w8s3 1651 us
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)  # 16x512: 192 us vs 210 us


def _launch(q, k_src, v_src, out, qsl, seq_lens, bt, cuk, kstrides, vstrides, bt_stride, scale, max_q_len,
            G, page, paged, config=None, q_rope=None, k_rope=None):
    T, Hq, DQK = q.shape
    DV = out.shape[-1]
    N = seq_lens.shape[0]
    if T == 0 or N == 0:
        return out
    split = q_rope is not None
    if split:  # two operand pairs, each padded to a power of two >= 16 (tl.dot)
        d1, dr = max(16, next_pow2(DQK)), q_rope.shape[-1]
        d2 = max(16, next_pow2(dr))
    else:
        d1 = next_pow2(DQK)
        d2 = dr = 0
        if d1 != DQK and next_pow2(DQK - d1 // 2) >= 16:  # non-power-of-two head dim: two dots (192 = 128 + 64)
            d1 //= 2
            d2 = next_pow2(DQK - d1)
            dr = DQK - d1
    cfg = default_config(max_q_len, d1 + d2, next_pow2(DV))
    cfg.update(config or {})
    grid = (triton.cdiv(max_q_len, cfg["BLOCK_M"]), N, Hq)
    q2, k2 = (q_rope, k_rope) if split else (q, k_src)   # unused pointers when not split
    _prefill_kernel[grid](
        q, k_src, v_src, out, qsl, seq_lens, bt, cuk, q2, k2,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *kstrides, *vstrides, bt_stride,
        q2.stride(0) if split else 0, q2.stride(1) if split else 0, k2.stride(0) if split else 0,
        scale * 1.4426950408889634,
        G=G, DQK=DQK, D1=d1, D2=d2, DR=dr, DV=DV, BLOCK_DV=next_pow2(DV), BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], PAGE=page, PAGED=paged, SPLIT=split, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Chunked-prefill attention over the paged cache (see module docstring); Triton on CUDA.

    max_query_len: host int (an upper bound is fine) so no device sync is needed; config overrides the launch
    tuning (BLOCK_M, BLOCK_N, num_warps, num_stages), for sweeps.
    """
    T, Hq, D = q.shape
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[-1] != D or Hq % kv_cache.shape[3]:
        raise FractalError(
            f"kv_cache shape {tuple(kv_cache.shape)} does not fit q {tuple(q.shape)}: "
            "want [2, num_blocks, block_size, Hkv, D] with Hq % Hkv == 0"
        )
    if not use_triton(q, kv_cache):
        res = paged_prefill_attention_ref(q, kv_cache, query_start_loc, seq_lens, block_tables, scale)
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty_like(q)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max().item())
    kc, vc = kv_cache[0], kv_cache[1]
    return _launch(q, kc, vc, out, query_start_loc, seq_lens, block_tables, query_start_loc,
                   (kc.stride(0), kc.stride(1), kc.stride(2)), (vc.stride(0), vc.stride(1), vc.stride(2)),
                   block_tables.stride(0), scale, max_query_len, Hq // kv_cache.shape[3], kv_cache.shape[2], True,
                   config)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    scale: float,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    config: dict | None = None,
    q_rope: torch.Tensor | None = None,
    k_rope: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lower-right causal attention over contiguous, flattened K/V (see module docstring); Triton on CUDA.

    q_rope [T, Hq, R] with k_rope [S, R]: a second QK term (scores = q.k + q_rope.k_rope), read in place.
    """
    _check_varlen_shapes(q, k, v, q_rope, k_rope)
    split = q_rope is not None
    extra = (q_rope, k_rope) if split else ()
    if not use_triton(q, k, v, *extra):
        res = varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, q_rope, k_rope)
        return res if out is None else out.copy_(res)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    if split:
        q_rope, k_rope = _unit_last(q_rope), _unit_last(k_rope)
    if out is None:
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[-1])
    if max_query_len is None:
        max_query_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    seq_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int32)
    return _launch(q, k, v, out, cu_seqlens_q, seq_lens, cu_seqlens_k, cu_seqlens_k,
                   (0, k.stride(0), k.stride(1)), (0, v.stride(0), v.stride(1)), 0, scale, max_query_len,
                   q.shape[1] // k.shape[1], 1, False, config, q_rope, k_rope)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dim is contiguous (any other strides are passed to the kernel), else a copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _check_varlen_shapes(q, k, v, q_rope, k_rope) -> None:
    """FractalError unless q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] (Hq % Hkv == 0) and, when split,
    q_rope [T, Hq, R] with k_rope [S, R] of q's dtype."""
    bad = (q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k.shape[0] != v.shape[0] or k.shape[1] != v.shape[1]
           or q.shape[1] % k.shape[1] or q.shape[-1] != k.shape[-1])
    if (q_rope is None) != (k_rope is None):
        bad = True
    elif q_rope is not None:
        bad = bad or (q_rope.dim() != 3 or k_rope.dim() != 2 or q_rope.shape[:2] != q.shape[:2]
                      or k_rope.shape[0] != k.shape[0] or k_rope.shape[1] != q_rope.shape[2]
                      or not q_rope.dtype == k_rope.dtype == q.dtype == k.dtype)
    if bad:
        got = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        want = "q [T, Hq, D], k [S, Hkv, D], v [S, Hkv, Dv] with Hq % Hkv == 0"
        if q_rope is not None or k_rope is not None:
            desc = [None if t is None else f"{tuple(t.shape)} {t.dtype}" for t in (q, k, q_rope, k_rope)]
            got = f"q {desc[0]}, k {desc[1]}, v {tuple(v.shape)}, q_rope {desc[2]}, k_rope {desc[3]}"
            want += ", q_rope [T, Hq, R], k_rope [S, R], q / k / q_rope / k_rope of one dtype"
        raise FractalError(f"varlen_attention shapes disagree: {got}; want {want}")
