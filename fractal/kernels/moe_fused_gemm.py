"""Mid-size MoE (tens to thousands of (token, expert) pairs): block alignment in two launches, then two GEMMs.

Layouts as in moe_experts (w13 [E, 2I, H] gate rows then up rows, w2 [E, H, I]; topk_ids [T, k] int32).
Pipeline (four launches + the combine kernel of moe_experts; no host sync, graph-capturable):
  1. _align_count_kernel  one program per chunk of C pairs: the chunk's per-expert counts -> chunk_counts[g, e],
                          each pair's rank among the chunk's pairs of its expert -> rank[pair].
  2. _align_scatter_kernel max(chunks, slots / P) programs: totals and the chunk's prefix from chunk_counts, so
                          sorted_ids[pstart[e] + prefix[g, e] + rank] = pair (the stable sort order, as
                          torch.sort(stable=True) gives); each program also marks the padding slots (= n) of
                          its P slots and writes block_expert for the blocks starting there.
  3. _gate_up_silu_kernel  per (block of BLOCK_M sorted rows of one expert, BLOCK_N columns of I): both the gate
                          and the up tile over K = H, then silu(gate) * up in the epilogue -> a [n, I]
                          (h = x @ w13^T never reaches memory; gate and up are rounded to the dtype first, as
                          the two-kernel path rounds them).
  4. _down_kernel         per (block, BLOCK_N columns of H): y[pair] = a[pair] @ w2[e]^T.
Sorted rows are padded per expert to BLOCK_M; each weight tile is read once per block, and the blocks of one
expert are adjacent in launch order, so a second block of the same expert finds it in L2. Both GEMMs run on a
1-D grid mapped by _tile_of: runs of group_m blocks sweep all column tiles before the next run. launch_configs
gives group_m 1 (expert-major: every column tile of one block, then the next block) at every size since round 9;
group_m 0 = round 3's column-major order (all blocks of column tile 0, then tile 1), kept for A/B runs.
"""
from __future__ import annotations

import torch

from fractal.kernels._triton_support import HAS_TRITON, next_pow2, pdl_launch

if HAS_TRITON:
    from fractal.kernels._triton_support import pdl_wait, tl, triton

    # sizes that change every step are not specialised on (no recompile per value class)
    @triton.jit(do_not_specialize=["n"])
    def _align_count_kernel(ids_ptr, chunk_counts_ptr, rank_ptr, n, E, EP: tl.constexpr, C: tl.constexpr,
                            PDL: tl.constexpr):
        pdl_wait(PDL)
        g = tl.program_id(0)
        p = g * C + tl.arange(0, C)
        e = tl.arange(0, EP)
        ids = tl.load(ids_ptr + p, mask=p < n, other=-1)
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)                  # [C, EP]
        csum = tl.cumsum(onehot, 0)                                         # inclusive count down the chunk
        rank = tl.sum(onehot * (csum - 1), 1)
        tl.store(rank_ptr + p, rank, mask=p < n)
        tl.store(chunk_counts_ptr + g * EP + e, tl.sum(onehot, 0))

    # sizes that change every step are not specialised on (no recompile per value class)
    @triton.jit(do_not_specialize=["n", "G", "total_len"])
    def _align_scatter_kernel(ids_ptr, chunk_counts_ptr, rank_ptr, sorted_ptr, block_expert_ptr, n, E, G, total_len,
                              EP: tl.constexpr, C: tl.constexpr, GC: tl.constexpr, P: tl.constexpr,
                              BLOCK_M: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        g = tl.program_id(0)
        e = tl.arange(0, EP)
        emask = e < E
        counts = tl.zeros([EP], dtype=tl.int32)
        before = tl.zeros([EP], dtype=tl.int32)
        for g0 in range(0, G, GC):
            gi = g0 + tl.arange(0, GC)
            tile = tl.load(chunk_counts_ptr + gi[:, None] * EP + e[None, :], mask=(gi < G)[:, None], other=0)
            counts += tl.sum(tile, 0)
            before += tl.sum(tile * (gi < g).to(tl.int32)[:, None], 0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        pend = tl.cumsum(padded, 0)
        pstart = pend - padded
        # chunk g's pairs to their sorted slots (programs g >= G have no chunk)
        p = g * C + tl.arange(0, C)
        pm = (p < n) & (g < G)
        ids = tl.load(ids_ptr + p, mask=pm, other=-1)
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)
        base = tl.sum(onehot * (pstart + before)[None, :], 1)
        dest = base + tl.load(rank_ptr + p, mask=pm, other=0)
        tl.store(sorted_ptr + dest, p, mask=pm)
        # slots [g * P, (g + 1) * P) of [0, total_len): padding marks, and the expert of every block starting there
        # (one tile per program: the grid covers max(G, total_len / P) programs, so no program loops over slots)
        q = g * P + tl.arange(0, P)
        qm = q < total_len
        e_of = tl.sum(((pend[None, :] <= q[:, None]) & emask[None, :]).to(tl.int32), 1)   # E past the end
        sel = (e[None, :] == e_of[:, None]).to(tl.int32)
        start = tl.sum(sel * pstart[None, :], 1)
        cnt = tl.sum(sel * counts[None, :], 1)
        pad = (e_of >= E) | (q - start >= cnt)
        tl.store(sorted_ptr + q, tl.zeros_like(q) + n, mask=qm & pad)
        tl.store(block_expert_ptr + q // BLOCK_M, e_of, mask=qm & (q % BLOCK_M == 0))

    @triton.jit
    def _tile_of(num_pid_m, num_pid_n, group_m):
        """1-D program id -> (block, column tile): runs of group_m blocks sweep all column tiles before the next
        run (GROUP_M swizzle: the rows of group_m blocks and their experts' weight tiles stay in L2);
        group_m >= num_pid_m gives round 3's order (all blocks for column tile 0, then tile 1, ...)."""
        pid = tl.program_id(0)
        per_group = group_m * num_pid_n
        first_m = (pid // per_group) * group_m
        size_m = tl.minimum(num_pid_m - first_m, group_m)
        pid_m = first_m + (pid % per_group) % size_m
        pid_n = (pid % per_group) // size_m
        return pid_m, pid_n

    # sizes that change every step are not specialised on (no recompile per value class)
    @triton.jit(do_not_specialize=["num_valid", "num_pid_m", "group_m"])
    def _gate_up_silu_kernel(
        x_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
        I, K, num_valid, a_row_div, stride_xm, stride_we, stride_wn, stride_om, num_pid_m, num_pid_n, group_m,
        E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    ):
        """out[row] = silu(x[row // a_row_div] . gate_e) * (x[row // a_row_div] . up_e) for one block's rows."""
        pdl_wait(PDL)
        pid_m, pid_n = _tile_of(num_pid_m, num_pid_n, group_m)
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if e >= E:
            return
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        rmask = rows < num_valid
        x_rows = (rows // a_row_div).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < I
        kk = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + x_rows[:, None] * stride_xm + kk[None, :]
        g_ptrs = w_ptr + e * stride_we + n.to(tl.int64)[None, :] * stride_wn + kk[:, None]
        u_ptrs = g_ptrs + I * stride_wn
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + kk) < K
            a = tl.load(x_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            wg = tl.load(g_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            wu = tl.load(u_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc_g = tl.dot(a, wg, acc_g)
            acc_u = tl.dot(a, wu, acc_u)
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        dt = out_ptr.dtype.element_ty
        gt = acc_g.to(dt).to(tl.float32)
        ut = acc_u.to(dt).to(tl.float32)
        act = (gt / (1.0 + tl.exp(-gt))).to(dt).to(tl.float32) * ut
        o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + n[None, :]
        tl.store(o_ptrs, act.to(dt), mask=rmask[:, None] & nmask[None, :])

    # sizes that change every step are not specialised on (no recompile per value class)
    @triton.jit(do_not_specialize=["num_valid", "num_pid_m", "group_m"])
    def _down_kernel(
        a_ptr, w_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
        N, K, num_valid, stride_am, stride_we, stride_wn, stride_om, num_pid_m, num_pid_n, group_m,
        E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    ):
        """out[row] = a[row] @ w[e]^T for the BLOCK_M padded rows of one expert block."""
        pdl_wait(PDL)
        pid_m, pid_n = _tile_of(num_pid_m, num_pid_n, group_m)
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if e >= E:
            return
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        rmask = rows < num_valid
        r64 = rows.to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        kk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + r64[:, None] * stride_am + kk[None, :]
        w_ptrs = w_ptr + e * stride_we + n.to(tl.int64)[None, :] * stride_wn + kk[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + kk) < K
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(a, w, acc)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        o_ptrs = out_ptr + r64[:, None] * stride_om + n[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


def num_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the BLOCK_M-row blocks after per-expert padding: sum_e ceil(c_e / m) <= n // m + min(n, E)."""
    n = num_pairs
    return min(-(-(n + num_experts * (block_m - 1)) // block_m), n // block_m + min(n, num_experts))


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch (many small kernels): the same output as moe_align_triton.

    sorted_ids int32 [num_blocks * block_m]: the pairs of expert 0, padded with n = T*k to a multiple of block_m,
    then expert 1's, ...; block_expert int32 [num_blocks]: the expert of each block (num_experts past the end).
    """
    flat = topk_ids.reshape(-1).to(torch.int32)
    n = flat.numel()
    dev = flat.device
    sorted_ids, order = torch.sort(flat, stable=True)
    experts = torch.arange(num_experts, device=dev, dtype=torch.int32)
    ends = torch.searchsorted(sorted_ids, experts, right=True)
    starts = torch.searchsorted(sorted_ids, experts, right=False)
    padded = (ends - starts + block_m - 1) // block_m * block_m
    pend = torch.cumsum(padded, 0)
    pstart = pend - padded
    e_of = sorted_ids.long()
    dest = pstart[e_of] + (torch.arange(n, device=dev) - starts[e_of])
    nb = num_blocks(n, num_experts, block_m)
    out_ids = torch.full((nb * block_m,), n, dtype=torch.int32, device=dev)
    out_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(0, nb * block_m, block_m, device=dev)
    block_expert = torch.searchsorted(pend, block_start, right=True).to(torch.int32)
    return out_ids, block_expert


def moe_align_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_align_ref in two launches (chunked counts + ranks, then scatter + padding + block experts)."""
    ids = topk_ids.reshape(-1)
    if ids.dtype != torch.int32:
        ids = ids.to(torch.int32)
    ids = ids.contiguous()
    n = ids.numel()
    dev = ids.device
    EP = max(16, next_pow2(num_experts))
    C = max(16, min(128, 8192 // EP))          # a [C, EP] one-hot tile per program
    G = max(1, -(-n // C))
    nb = num_blocks(n, num_experts, block_m)
    total_len = nb * block_m
    sorted_ids = torch.empty(total_len, dtype=torch.int32, device=dev)
    block_expert = torch.empty(nb, dtype=torch.int32, device=dev)
    chunk_counts = torch.empty(G, EP, dtype=torch.int32, device=dev)
    rank = torch.empty(max(n, 1), dtype=torch.int32, device=dev)
    _align_count_kernel[(G,)](ids, chunk_counts, rank, n, num_experts, EP=EP, C=C, num_warps=4, **pdl_launch())
    P = max(16, min(128, 8192 // EP))          # slots per program: a [P, EP] compare tile
    programs = max(G, -(-total_len // P))
    _align_scatter_kernel[(programs,)](ids, chunk_counts, rank, sorted_ids, block_expert, n, num_experts, G,
                                       total_len, EP=EP, C=C, GC=max(1, min(64, 4096 // EP)), P=P,
                                       BLOCK_M=block_m, num_warps=4, **pdl_launch())
    return sorted_ids, block_expert


# Launch configs: (BLOCK_N, BLOCK_K, num_warps, num_stages); picked from the round-3 sweep (docs/perf-notes.md).
GATE_UP_CONFIG = (64, 128, 4, 3)
DOWN_CONFIG = (64, 128, 4, 4)
# Round 4, compute-bound sizes (many rows per expert): 128-row blocks, 8 warps, 3 stages, GROUP_M swizzle (picked
# from device run R4-1, docs/perf-notes.md). The gate/up kernel holds two accumulators, so its BLOCK_N=64 is a
# 128 x 128 output tile of [gate | up]. From XL_MIN_ROWS_PER_EXPERT on, the wider XL tiles measured faster.
# Round 5 (moe_mid bench): the 64-row mid config lost to grouped_mm at 64-72 rows per expert (dsv2lite T=768
# 591 vs 548 us, qwen3moe T=1024 609 vs 603) while the large config won from 96 (T=1024 484 vs 558): the large
# config now starts above 48 mean rows per expert (48 itself stays 32-row blocks: T=512 481 vs 508 us).
# Round 6 (tools/bench_kernels.py --only r6moe, graph replay, us per layer): 32-row blocks from 13 rows per expert
# (qwen3moe T=256, 16 rows: 450 vs 461 with 16-row blocks; dsv2lite T=128, 12 rows: equal); wide experts
# (I >= 1024) take 64-row blocks from 41 rows (dsv2lite T=512, 48 rows: 461-468 vs 480-482 with 32; T=384, 36 rows:
# 447 vs 454 the other way), narrow ones stayed at 32 up to 48 (qwen3moe T=768: 537 vs 579 with 64); both in
# round 3's column-major tile order, which round 9 replaced (below).
# Round 9 (R9-5 .. R9-7, H100, graph replay, us per layer): the expert-major tile order (group_m 1: all column tiles
# of one block before the next block) beats round 3's column-major order at every size and the GROUP_M=8 swizzle
# of the large configs: dsv2lite T=64 381 -> 378, T=256 402 -> 393, T=512 422 -> 405, T=2048 643 -> 619, T=4096
# 1040 -> 980; qwen3moe T=256 430 -> 421, T=512 456 -> 444, T=2048 601 -> 590 (the activation rows a program
# gathers are the ones the programs just before it gathered). With it, 64-row blocks win from 25 mean rows per
# expert for narrow and wide experts alike (dsv2lite 36 rows 400 vs 420 with 32-row blocks, qwen3moe 40 rows 447
# vs 478, 48 rows 452 vs 494; equal at 24).
SMALL_MAX_ROWS_PER_EXPERT = 12     # BLOCK_M 16 up to this mean pairs per expert
MID32_MAX_ROWS_PER_EXPERT = 24     # BLOCK_M 32 up to this, then 64
MID_MAX_ROWS_PER_EXPERT = 48       # BLOCK_M 64 up to this mean pairs per expert; above it the large config
# Round 8 (tools/moe_config_sweep.py, R8-9, dsv2lite T=512, 48 rows per expert in 64-row blocks, us per layer):
# gate/up (64, 128, 4, 4) 436.5 and down (64, 64, 4, 3) 428.7 against 443.9 for the defaults; the 32- and
# 16-row classes (dsv2lite T=256, qwen3moe T=256) were within 1 % of the defaults with every config. Round 9
# re-swept the 64-row class in the expert-major order: the same two stay best (405.0 / 404.8 us).
MID64_GATE_UP_CONFIG = (64, 128, 4, 4)
MID64_DOWN_CONFIG = (64, 64, 4, 3)
LARGE_BLOCK_M = 128
LARGE_GATE_UP_CONFIG = (64, 64, 8, 3)
LARGE_DOWN_CONFIG = (128, 64, 8, 3)
XL_MIN_ROWS_PER_EXPERT = 384
XL_GATE_UP_CONFIG = (128, 64, 8, 3)
XL_DOWN_CONFIG = (256, 64, 8, 3)
GROUP_M = 1                        # expert-major tile order for every size class (round 9)


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Rows per block: about the mean rows per expert, 16..64 (tl.dot needs >= 16); LARGE_BLOCK_M above
    MID_MAX_ROWS_PER_EXPERT (no fractional sliver between the mid and the large configs: each size class is one
    set of binaries, compiled by the warm-up)."""
    mean = num_pairs / max(1, num_experts)
    if mean > MID_MAX_ROWS_PER_EXPERT:
        return LARGE_BLOCK_M
    return 16 if mean <= SMALL_MAX_ROWS_PER_EXPERT else (32 if mean <= MID32_MAX_ROWS_PER_EXPERT else 64)


def launch_configs(num_pairs: int, num_experts: int) -> tuple[int, tuple, tuple, int]:
    """(block_m, gate/up config, down config, group_m) for num_pairs pairs over num_experts experts."""
    bm = block_m_for(num_pairs, num_experts)
    mean = num_pairs / max(1, num_experts)
    if mean >= XL_MIN_ROWS_PER_EXPERT:
        return bm, XL_GATE_UP_CONFIG, XL_DOWN_CONFIG, GROUP_M
    if mean > MID_MAX_ROWS_PER_EXPERT:
        return bm, LARGE_GATE_UP_CONFIG, LARGE_DOWN_CONFIG, GROUP_M
    if bm == 64:
        return bm, MID64_GATE_UP_CONFIG, MID64_DOWN_CONFIG, GROUP_M
    return bm, GATE_UP_CONFIG, DOWN_CONFIG, GROUP_M


def fused_moe_mlp(hidden, w13, w2, topk_ids, block_m=None, gate_up_config=None, down_config=None, group_m=None):
    """y [T*k, H]: row t*k + j = expert_{ids[t, j]}(hidden[t]) (unweighted), through the aligned-block GEMMs.
    Arguments left None come from launch_configs(T*k, E); group_m 0 = round 3's column-major order."""
    T, k = topk_ids.shape
    E, two_i, H = w13.shape
    I = two_i // 2
    n = T * k
    d_bm, d_gu, d_dn, d_gm = launch_configs(n, E)
    block_m = block_m or d_bm
    group_m = d_gm if group_m is None else group_m
    sorted_ids, block_expert = moe_align_triton(topk_ids, E, block_m)
    nb = block_expert.numel()
    gm = group_m if group_m > 0 else max(1, nb)
    bn, bk, warps, stages = gate_up_config or d_gu
    a = torch.empty(n, I, dtype=hidden.dtype, device=hidden.device)
    nn = triton.cdiv(I, bn)
    _gate_up_silu_kernel[(nb * nn,)](
        hidden, w13, a, sorted_ids, block_expert, I, H, n, k,
        hidden.stride(0), w13.stride(0), w13.stride(1), a.stride(0), nb, nn, gm,
        E=E, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **pdl_launch(),
    )
    bn, bk, warps, stages = down_config or d_dn
    y = torch.empty(n, H, dtype=hidden.dtype, device=hidden.device)
    nn = triton.cdiv(H, bn)
    _down_kernel[(nb * nn,)](
        a, w2, y, sorted_ids, block_expert, H, I, n,
        a.stride(0), w2.stride(0), w2.stride(1), y.stride(0), nb, nn, gm,
        E=E, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **pdl_launch(),
    )
    return y
