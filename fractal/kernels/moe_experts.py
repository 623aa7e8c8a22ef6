"""Routed experts: permute tokens by expert, two grouped GEMMs with SiLU-and-mul between, weighted combine.

Layouts (nn.Linear convention, out x in):
    hidden       [T, H]            bf16/fp16/fp32
    w13          [E, 2*I, H]       gate rows 0:I, up rows I:2I
    w2           [E, H, I]
    topk_weights [T, k]  float32   (from moe_routing.route)
    topk_ids     [T, k]  int32/int64
    returns      [T, H]  hidden.dtype = sum_j topk_weights[t, j] * expert_{ids[t, j]}(hidden[t])
    expert(x) = w2 @ (silu(w13[:I] @ x) * (w13[I:] @ x))
Fast backends (CUDA):
    "grouped_mm": sort the T*k (token, slot) pairs by expert, gather rows, torch._grouped_mm (CUTLASS) twice,
                  Triton SiLU-and-mul and a Triton combine that reads rows back through the inverse permutation.
    "triton":     vLLM-style fused-MoE GEMM (moe_fused_gemm): rows padded per expert to BLOCK_M by a two-launch
                  alignment, each program one expert tile gathering its rows itself (no permuted copy of hidden),
                  SiLU-and-mul in the gate/up GEMM's epilogue; good from tens to thousands of pairs.
    "gemv":       a few pairs (decode of 1-8 sequences): one program per (pair, output tile) reading the
                  expert's rows directly; no sorting, three kernels in all.
No host synchronisation in either path (graph-capturable). The reference loops over experts in plain torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fractal.errors import FractalError
from fractal.kernels._triton_support import HAS_TRITON, next_pow2, pdl_launch, use_triton
from fractal.kernels.moe_fused_gemm import fused_moe_mlp, moe_align_ref, moe_align_triton

BACKENDS = ("grouped_mm", "triton", "gemv")

if HAS_TRITON:
    from fractal.kernels._triton_support import pdl_wait, tl, triton

    @triton.jit
    def _silu_and_mul_kernel(h_ptr, out_ptr, stride_h, stride_o, I, BLOCK: tl.constexpr, PDL: tl.constexpr):
        pdl_wait(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < I
        g = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * stride_h + I + cols, mask=mask, other=0.0).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32) * u
        tl.store(out_ptr + row * stride_o + cols, a.to(out_ptr.dtype.element_ty), mask=mask)

    # n_routed = T * k changes every step (no recompile per value class; seen compiling inside generates)
    @triton.jit(do_not_specialize=["n_routed"])
    def _combine_kernel(y_ptr, idx_ptr, w_ptr, add_ptr, out_ptr, stride_y, stride_a, stride_o, H, n_routed,
                        K: tl.constexpr, HAS_IDX: tl.constexpr, NS: tl.constexpr, HAS_ADD: tl.constexpr,
                        BLOCK: tl.constexpr, PDL: tl.constexpr):
        """out[t] = round(sum_j w[t, j] y[row(t, j)]) (+ round(sum_s y[n_routed + t*NS + s])) (+ add[t]).

        Each partial sum is rounded to the output dtype before the next add, as the torch path does
        (routed out in the model dtype, then `out + shared_experts(x)`)."""
        pdl_wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        dt = out_ptr.dtype.element_ty
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            if HAS_IDX:
                r = tl.load(idx_ptr + t * K + j).to(tl.int64)
            else:
                r = t * K + j
            w = tl.load(w_ptr + t * K + j)
            acc += w * tl.load(y_ptr + r * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        if NS > 0:
            sh = tl.zeros([BLOCK], dtype=tl.float32)
            for j in tl.static_range(NS):
                r = n_routed + t * NS + j
                sh += tl.load(y_ptr + r * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
            acc = acc.to(dt).to(tl.float32) + sh.to(dt).to(tl.float32)
        if HAS_ADD:
            acc = acc.to(dt).to(tl.float32) + tl.load(add_ptr + t * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t * stride_o + cols, acc.to(dt), mask=mask)

    # sizes that change every step are not specialised on (no recompile per value class)
    @triton.jit(do_not_specialize=["num_valid"])
    def _moe_gemm_kernel(
        a_ptr, b_ptr, c_ptr, sorted_ids_ptr, block_expert_ptr,
        N, K, num_valid, a_row_div,
        stride_am, stride_be, stride_bn, stride_cm,
        E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        """C[row] = A[row // a_row_div] @ B[e]^T for the BLOCK_M padded rows of one expert block."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
        if e >= E:
            return
        rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        rmask = rows < num_valid
        a_rows = (rows // a_row_div).to(tl.int64)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        kk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * stride_am + kk[None, :]
        b_ptrs = b_ptr + e * stride_be + n.to(tl.int64)[None, :] * stride_bn + kk[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kmask = (k0 + kk) < K
            a = tl.load(a_ptrs, mask=rmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


    # the reduction length is a compile-time constant and its loop unrolled, so that a program's weight loads are all
    # in flight before the first product (round 7: 2.49 -> 2.90 TB/s at batch 1, see GEMV_GATE_UP_CONFIG)
    @triton.jit(do_not_specialize=["n_routed"])
    def _gemv_gate_up_kernel(x_ptr, w_ptr, ws_ptr, ids_ptr, out_ptr, I, IS, n_routed,
                             stride_xt, stride_we, stride_wn, stride_o, H: tl.constexpr,
                             TOPK: tl.constexpr, NS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             PDL: tl.constexpr, DENSE: tl.constexpr):
        """out[pair, n] = silu(gate_n . x[t]) * (up_n . x[t]) for one pair: a routed (token, slot) pair
        (pair < n_routed: expert ids[pair] of w13) or one of the NS I-wide slices of a token's shared expert
        (ws = shared gate_up weight [2*IS, H], IS = NS * I: slice j is gate rows jI.. and up rows IS + jI..).
        DENSE (kernels.gemv): one weight w [2I, H] and one pair per token, no ids; no kernel writes those weights, so
        the first weight chunk is loaded before pdl_wait, overlapping the previous kernel's tail."""
        pair = tl.program_id(0).to(tl.int64)
        if DENSE:
            t = pair
            base = w_ptr
            up = I * stride_wn
        else:
            pdl_wait(PDL)  # the expert ids come from this step's routing
            if pair < n_routed:
                t = pair // TOPK
                e = tl.load(ids_ptr + pair).to(tl.int64)
                base = w_ptr + e * stride_we
                up = I * stride_wn
            else:
                q = pair - n_routed
                t = q // NS
                base = ws_ptr + (q % NS) * I * stride_wn
                up = IS * stride_wn
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < I
        kk = tl.arange(0, BLOCK_K)
        w_rows = base + n.to(tl.int64)[:, None] * stride_wn
        acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if DENSE:
            wmask0 = nmask[:, None] & (kk < H)[None, :]
            wg0 = tl.load(w_rows + kk[None, :], mask=wmask0, other=0.0)
            wu0 = tl.load(w_rows + up + kk[None, :], mask=wmask0, other=0.0)
            pdl_wait(PDL)
        for k0 in tl.static_range(0, H, BLOCK_K):
            kmask = (k0 + kk) < H
            x = tl.load(x_ptr + t * stride_xt + k0 + kk, mask=kmask, other=0.0).to(tl.float32)
            wmask = nmask[:, None] & kmask[None, :]
            if DENSE and k0 == 0:
                wg = wg0.to(tl.float32)
                wu = wu0.to(tl.float32)
            else:
                wg = tl.load(w_rows + k0 + kk[None, :], mask=wmask, other=0.0).to(tl.float32)
                wu = tl.load(w_rows + up + k0 + kk[None, :], mask=wmask, other=0.0).to(tl.float32)
            acc_g += wg * x[None, :]
            acc_u += wu * x[None, :]
        dt = out_ptr.dtype.element_ty
        g = tl.sum(acc_g, axis=1).to(dt).to(tl.float32)
        u = tl.sum(acc_u, axis=1).to(dt).to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
        tl.store(out_ptr + pair * stride_o + n, a.to(dt), mask=nmask)

    @triton.jit(do_not_specialize=["n_routed"])
    def _gemv_down_kernel(a_ptr, w_ptr, ws_ptr, ids_ptr, out_ptr, H, IS, n_routed,
                          stride_a, stride_we, stride_wn, stride_o, I: tl.constexpr,
                          NS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                          DENSE: tl.constexpr):
        """out[pair, n] = down_n . a[pair]: w2[ids[pair]] for a routed pair, columns jI.. of the shared expert's
        down weight ws [H, IS] for shared slice j. DENSE as in _gemv_gate_up_kernel (w [H, I], one pair per token)."""
        pair = tl.program_id(0).to(tl.int64)
        if DENSE:
            base = w_ptr
            row = stride_wn
        else:
            pdl_wait(PDL)  # the expert ids come from this step's routing
            if pair < n_routed:
                e = tl.load(ids_ptr + pair).to(tl.int64)
                base = w_ptr + e * stride_we
                row = stride_wn
            else:
                base = ws_ptr + ((pair - n_routed) % NS) * I
                row = IS
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < H
        kk = tl.arange(0, BLOCK_K)
        w_rows = base + n.to(tl.int64)[:, None] * row
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        if DENSE:
            w0 = tl.load(w_rows + kk[None, :], mask=nmask[:, None] & (kk < I)[None, :], other=0.0)
            pdl_wait(PDL)
        for k0 in tl.static_range(0, I, BLOCK_K):
            kmask = (k0 + kk) < I
            a = tl.load(a_ptr + pair * stride_a + k0 + kk, mask=kmask, other=0.0).to(tl.float32)
            if DENSE and k0 == 0:
                w = w0.to(tl.float32)
            else:
                w = tl.load(w_rows + k0 + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
            acc += w * a[None, :]
        tl.store(out_ptr + pair * stride_o + n, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=nmask)


def _silu_and_mul_ref(h: torch.Tensor) -> torch.Tensor:
    g, u = h.chunk(2, dim=-1)
    return F.silu(g) * u


def fused_experts_ref(
    hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """Plain torch: for each expert that got tokens, run its MLP on them and add the weighted rows."""
    T, H = hidden.shape
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    flat_ids = topk_ids.reshape(-1).long()
    flat_w = topk_weights.reshape(-1).float()
    token_of = torch.arange(T, device=hidden.device).repeat_interleave(topk_ids.shape[1])
    for e in torch.unique(flat_ids).tolist():
        sel = (flat_ids == e).nonzero().squeeze(1)
        x = hidden.index_select(0, token_of[sel])
        a = _silu_and_mul_ref(x @ w13[e].t())
        y = a @ w2[e].t()
        out.index_add_(0, token_of[sel], y.float() * flat_w[sel, None])
    return out.to(hidden.dtype)


def _check(hidden, w13, w2, topk_ids) -> None:
    E, two_i, H = w13.shape
    if hidden.shape[-1] != H or w2.shape != (E, H, two_i // 2):
        raise FractalError(
            f"MoE shapes disagree: hidden {tuple(hidden.shape)}, w13 {tuple(w13.shape)} (want [E, 2I, H]), "
            f"w2 {tuple(w2.shape)} (want [E, H, I])"
        )


def silu_and_mul(h: torch.Tensor) -> torch.Tensor:
    """[M, 2I] = [gate | up] -> silu(gate) * up [M, I] (silu rounded to h's dtype first, as in torch)."""
    if not use_triton(h):
        return _silu_and_mul_ref(h)
    M, two_i = h.shape
    I = two_i // 2
    out = torch.empty(M, I, dtype=h.dtype, device=h.device)
    if M:
        block = min(1024, next_pow2(I))
        _silu_and_mul_kernel[(M, triton.cdiv(I, block))](h, out, h.stride(0), out.stride(0), I, BLOCK=block,
                                                         num_warps=4, **pdl_launch())
    return out


def _combine(y, idx, weights, T, k, out_dtype, num_shared=0, add=None):
    """Weighted sum of each token's k routed rows of y (through idx when given), plus its num_shared shared
    rows (after the T*k routed rows) and add[t] (a shared-expert output computed elsewhere)."""
    H = y.shape[1]
    out = torch.empty(T, H, dtype=out_dtype, device=y.device)
    if T:
        block = min(1024, next_pow2(H))
        _combine_kernel[(T, triton.cdiv(H, block))](
            y, idx if idx is not None else weights, weights, add if add is not None else y, out,
            y.stride(0), add.stride(0) if add is not None else 0, out.stride(0), H, T * k,
            K=k, HAS_IDX=idx is not None, NS=num_shared, HAS_ADD=add is not None, BLOCK=block, num_warps=4,
            **pdl_launch(),
        )
    return out


def _experts_grouped_mm(hidden, w13, w2, topk_weights, topk_ids, add=None):
    T, k = topk_ids.shape
    E = w13.shape[0]
    flat = topk_ids.reshape(-1).to(torch.int32)
    sorted_ids, order = torch.sort(flat, stable=True)
    offs = torch.searchsorted(sorted_ids, torch.arange(E, device=flat.device, dtype=torch.int32), right=True)
    offs = offs.to(torch.int32)
    x = hidden.index_select(0, order // k)
    h = torch._grouped_mm(x, w13.transpose(1, 2), offs=offs)
    a = silu_and_mul(h)
    y = torch._grouped_mm(a, w2.transpose(1, 2), offs=offs)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return _combine(y, inv, topk_weights.float().contiguous(), T, k, hidden.dtype, add=add)


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the flat (token, slot) list grouped by expert (stable order) and padded per expert to block_m.

    Returns sorted_ids int32 [num_blocks * block_m] (padding = T*k) and block_expert int32 [num_blocks] (expert of
    each block; num_experts for blocks past the end). Two Triton launches on the GPU (moe_fused_gemm), ~20 small
    torch kernels otherwise (the reference). No host sync.
    """
    if use_triton(topk_ids):
        return moe_align_triton(topk_ids, num_experts, block_m)
    return moe_align_ref(topk_ids, num_experts, block_m)


def _moe_gemm(a, w, sorted_ids, block_expert, num_valid, a_row_div, block_m):
    E, N, K = w.shape
    c = torch.empty(num_valid, N, dtype=a.dtype, device=a.device)
    big = num_valid >= 1024
    block_n = 128 if big else 64
    block_k = 64 if big else 128
    grid = (block_expert.numel(), triton.cdiv(N, block_n))
    _moe_gemm_kernel[grid](
        a, w, c, sorted_ids, block_expert, N, K, num_valid, a_row_div,
        a.stride(0), w.stride(0), w.stride(1), c.stride(0),
        E=E, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=8 if big else 4, num_stages=3 if big else 4,
    )
    return c


def _experts_triton(hidden, w13, w2, topk_weights, topk_ids, add=None):
    """Round 3: two-launch alignment, gate/up GEMM with SiLU-and-mul in its epilogue, down GEMM, combine."""
    T, k = topk_ids.shape
    y = fused_moe_mlp(hidden, w13, w2, topk_ids)
    return _combine(y, None, topk_weights.float().contiguous(), T, k, hidden.dtype, add=add)


def _experts_triton_r2(hidden, w13, w2, topk_weights, topk_ids, add=None):
    """Round 2's padded GEMM (torch alignment, h = x @ w13^T in memory, a separate SiLU kernel): for A/B only."""
    T, k = topk_ids.shape
    E = w13.shape[0]
    n = T * k
    block_m = 16 if n <= 256 else (32 if n <= 2048 else 64)
    sorted_ids, block_expert = moe_align_ref(topk_ids, E, block_m)
    h = _moe_gemm(hidden, w13, sorted_ids, block_expert, n, k, block_m)
    a = silu_and_mul(h)
    y = _moe_gemm(a, w2, sorted_ids, block_expert, n, 1, block_m)
    return _combine(y, None, topk_weights.float().contiguous(), T, k, hidden.dtype, add=add)


# (BLOCK_N, BLOCK_K, num_warps). Round 7 sweep (tools/gemv_sweep.py, H100, T=1 in a CUDA graph over 4 layers'
# weights, K loops unrolled): gate/up dsv2lite (6 routed + 2 shared slices, 92 MB) 36.99 -> 31.87 us (2.90 TB/s),
# qwen3moe (8 routed, 50 MB) 23.46 -> 18.94 us; down 19.71 -> 18.27 us and 11.92 -> 11.22 us. Was (16, 256, 4) and
# (32, 256, 4) with rolled loops.
GEMV_GATE_UP_CONFIG = (4, 1024, 4)
GEMV_DOWN_CONFIG = (8, 128, 2)


def _experts_gemv(hidden, w13, w2, topk_weights, topk_ids, shared=None, add=None, configs=None):
    """Few (token, slot) pairs: one program per pair and output tile reads its expert's rows directly (no sort,
    no padding, no permuted copy); gate/up GEMV, SiLU-and-mul fused; then down GEMV and the weighted sum.
    shared = (ws13 [2*IS, H], ws2 [H, IS]) with IS a multiple of I: the shared expert runs in the same three
    launches as IS / I extra pairs per token (weight 1), instead of two GEMMs, an activation and an add."""
    T, k = topk_ids.shape
    E, two_i, H = w13.shape
    I = two_i // 2
    n = T * k
    ids = topk_ids.reshape(-1).contiguous()
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        w13, w2 = w13.contiguous(), w2.contiguous()
    ns, IS, ws13, ws2 = 0, I, w13, w2
    if shared is not None:
        ws13, ws2 = shared
        IS = ws2.shape[1]
        ns = IS // I
        if not (ws13.is_contiguous() and ws2.is_contiguous()):
            ws13, ws2 = ws13.contiguous(), ws2.contiguous()
    rows = n + T * ns
    (gbn, gbk, gw), (dbn, dbk, dw) = configs or (GEMV_GATE_UP_CONFIG, GEMV_DOWN_CONFIG)
    a = torch.empty(rows, I, dtype=hidden.dtype, device=hidden.device)
    _gemv_gate_up_kernel[(rows, triton.cdiv(I, gbn))](
        hidden, w13, ws13, ids, a, I, IS, n, hidden.stride(0), w13.stride(0), w13.stride(1), a.stride(0),
        H=H, TOPK=k, NS=max(ns, 1), BLOCK_N=gbn, BLOCK_K=gbk, num_warps=gw, DENSE=False,
        **pdl_launch(),
    )
    y = torch.empty(rows, H, dtype=hidden.dtype, device=hidden.device)
    _gemv_down_kernel[(rows, triton.cdiv(H, dbn))](
        a, w2, ws2, ids, y, H, IS, n, a.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        I=I, NS=max(ns, 1), BLOCK_N=dbn, BLOCK_K=dbk, num_warps=dw, DENSE=False,
        **pdl_launch(),
    )
    return _combine(y, None, topk_weights.float().contiguous(), T, k, hidden.dtype, num_shared=ns, add=add)


def shared_fits_gemv(w13: torch.Tensor, shared_w13: torch.Tensor, shared_w2: torch.Tensor) -> bool:
    """Whether a shared expert (gate_up [2*IS, H], down [H, IS]) can run as IS / I pseudo-experts of the gemv path."""
    I, H = w13.shape[1] // 2, w13.shape[2]
    IS = shared_w2.shape[1]
    return (IS % I == 0 and IS > 0 and shared_w13.shape == (2 * IS, H) and shared_w2.shape == (H, IS)
            and shared_w13.dtype == w13.dtype == shared_w2.dtype)


def fused_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    backend: str | None = None,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    """Weighted sum of the routed experts' outputs, [T, H]. backend None picks by measurement (docs/perf-notes.md).

    shared (gemv backend only; see shared_fits_gemv) = a shared expert's (gate_up weight, down weight) whose
    output is added: round(routed) + round(shared), as `out + shared_experts(x)` rounds. add [T, H]: a tensor
    added the same way inside the combine kernel (a shared expert computed by the caller).
    """
    _check(hidden, w13, w2, topk_ids)
    if not use_triton(hidden, w13, w2):
        out = fused_experts_ref(hidden, w13, w2, topk_weights, topk_ids)
        if shared is not None:
            out = out + shared_expert_ref(hidden, *shared)
        return out if add is None else out + add
    if backend is None:
        backend = default_backend(topk_ids.numel())
    if backend not in BACKENDS:
        raise FractalError(f"MoE backend {backend!r} is not valid; valid: {list(BACKENDS)}")
    if shared is not None and (backend != "gemv" or not shared_fits_gemv(w13, *shared)):
        raise FractalError("shared experts fuse only into the gemv backend, with IS a multiple of I "
                           "(see shared_fits_gemv); pass their output as add= instead")
    if hidden.stride(-1) != 1:
        hidden = hidden.contiguous()
    if add is not None and add.stride(-1) != 1:
        add = add.contiguous()
    if backend == "gemv":
        return _experts_gemv(hidden, w13, w2, topk_weights, topk_ids, shared, add)
    if backend == "grouped_mm" and hidden.dtype == torch.bfloat16:  # torch._grouped_mm takes bf16 only
        return _experts_grouped_mm(hidden, w13, w2, topk_weights, topk_ids, add)
    return _experts_triton(hidden, w13, w2, topk_weights, topk_ids, add)


def shared_expert_ref(hidden: torch.Tensor, shared_w13: torch.Tensor, shared_w2: torch.Tensor) -> torch.Tensor:
    """Plain torch: the shared expert as a gated MLP (gate_up [2*IS, H], down [H, IS]) in hidden's dtype."""
    return _silu_and_mul_ref(hidden @ shared_w13.t()) @ shared_w2.t()


def default_backend(num_pairs: int) -> str:
    """Backend for T*k (token, expert) pairs: the measured winner at each size (see docs/perf-notes.md)."""
    if num_pairs <= GEMV_MAX_PAIRS:
        return "gemv"
    if num_pairs <= TRITON_MAX_PAIRS:
        return "triton"
    if TRITON_LARGE_MIN_PAIRS is not None and num_pairs >= TRITON_LARGE_MIN_PAIRS:
        return "triton"
    return "grouped_mm"


GEMV_MAX_PAIRS = 64      # decode of a few sequences
SHARED_IN_GEMV_MAX_TOKENS = 4  # shared experts inside the gemv launches up to here; cuBLAS + add= above (round 3)
# aligned-block Triton GEMM (round 3) up to here, CUTLASS grouped GEMM beyond. Round 5 measured the Triton path
# ahead in isolation from 1.5k to 16k pairs (tools/bench_kernels.py --only moe_mid, graph replay), but with the
# limit at 16k the engine got slower (A/B R5-7: Qwen3-30B-A3B gen-n512 35.1 vs 31.4 s, DeepSeek-V2-Lite gen-n256
# 6.92 vs 5.82 s; only DeepSeek's b=512 graph replays gained). Compiles inside the runs and the host cost of five
# Python-launched kernels per eager MoE layer are the candidates, not separated (docs/perf-notes.md, round 5).
# Round 6 (compiles gone from the runs): graph replay at 2.3k-6k pairs, Triton vs grouped_mm per layer: dsv2lite
# T=384/512/768 447/482/475 vs 502/509/548 us, qwen3moe T=384/512/768 464/482/537 vs 542/546/584 us, and a
# DeepSeek b=512 decode step 21.17 vs 21.99 ms. R6-10 at prefill-chunk sizes (T tokens, us per layer, Triton vs
# grouped_mm): dsv2lite T=1024/2048/3072/4096/6144 474/651/914/1072/1486 vs 560/674/1011/1084/1621, qwen3moe
# 514/625/789/960/1326 vs 603/786/786/973/1286; round 4 measured T=8192 far behind (both shapes). Limit: 32k pairs.
TRITON_MAX_PAIRS = 32768
# Round 4: the Triton GEMM again from here on, with its large-T config (moe_fused_gemm.launch_configs); None = off.
# Off: R4-1 measured it ahead only at 12-16k pairs (qwen3moe T=2048 -22 %, dsv2lite T=2048 ~tie), behind at
# 49-65k pairs (T=8192), and the engine rows slower with it on from 4096 pairs (docs/perf-notes.md, Round 4).
TRITON_LARGE_MIN_PAIRS: int | None = None
