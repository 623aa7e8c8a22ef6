"""Check and time every fractal kernel at DeepSeek-V2-Lite / Qwen3-30B-A3B / Llama-3.1-8B shapes (GPU).

Each row: the kernel's error against its reference (or an independent baseline where the fp32 reference would
be too large), the median time of triton.testing.do_bench (L2 flushed before each call), the floor
max(bytes / BW, FLOPs / PEAK) from the H100 ceilings measured on the device machine (copy 3.0 TB/s counting
read + write, bf16 dense 780 TFLOP/s), and achieved MBU = bytes/BW/time and MFU = FLOPs/PEAK/time.
Usage: python3 tools/bench_kernels.py [--only SUBSTR] [--json PATH]. Prints the table last.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

BW = 3.0e12      # bytes/s, device-to-device copy (read + write) measured on the H100
PEAK = 780e12    # bf16 FLOP/s, 8192^3 matmul measured on the H100
BF16 = torch.bfloat16
ROWS: list[dict] = []


def do_bench(fn) -> float:
    from triton.testing import do_bench as tdb

    return tdb(fn, warmup=20, rep=80, return_mode="median") * 1e-3  # seconds


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def graph_of(fn):
    """fn captured in a CUDA graph (after a warm-up on a side stream), or None if it cannot be captured."""
    try:
        fn()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        torch.cuda.synchronize()
        return g
    except Exception:
        torch.cuda.synchronize()
        return None


def row(kernel, shape, variant, fn, bytes_, flops, err=None, graph=True):
    """Time fn eagerly and, where it can be captured, as a CUDA graph replay (the engine's decode path).

    'time' is the graph replay when capture works (GPU time without Python launch overhead), else eager.
    """
    eager = do_bench(fn)
    g = graph_of(fn) if graph else None
    t = do_bench(g.replay) if g is not None else eager
    floor = max(bytes_ / BW, flops / PEAK)
    r = dict(kernel=kernel, shape=shape, variant=variant, time_us=t * 1e6, eager_us=eager * 1e6,
             mode="graph" if g is not None else "eager", floor_us=floor * 1e6,
             bound="HBM" if bytes_ / BW >= flops / PEAK else "FLOP",
             mbu=bytes_ / BW / t, mfu=flops / PEAK / t, err=err)
    ROWS.append(r)
    print(f"  {kernel:14s} {shape:34s} {variant:10s} {t * 1e6:9.1f} us ({r['mode']}; eager {eager * 1e6:8.1f})"
          f"  floor {floor * 1e6:8.1f} us  MBU {r['mbu']:6.1%}  MFU {r['mfu']:6.1%}"
          f"  err {err if err is None else f'{err:.1e}'}", flush=True)
    del g
    return r


def measure_ceilings():
    x = torch.empty(512 * 2**20, dtype=torch.float32, device="cuda").uniform_()
    y = torch.empty_like(x)
    t = do_bench(lambda: y.copy_(x))
    bw = 2 * x.numel() * 4 / t
    a = torch.randn(8192, 8192, dtype=BF16, device="cuda")
    b = torch.randn(8192, 8192, dtype=BF16, device="cuda")
    tm = do_bench(lambda: a @ b)
    print(f"ceilings today: copy {bw / 1e12:.2f} TB/s (read+write), bf16 matmul {2 * 8192**3 / tm / 1e12:.0f} TFLOP/s;"
          f" floors below use {BW / 1e12:.1f} TB/s and {PEAK / 1e12:.0f} TFLOP/s", flush=True)
    del x, y, a, b


# ---------------------------------------------------------------- rmsnorm / rotary / routing
def bench_rmsnorm():
    from fractal.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref

    for H in (2048, 4096):
        for T in (1, 256, 8192):
            x, r = torch.randn(T, H, dtype=BF16, device="cuda"), torch.randn(T, H, dtype=BF16, device="cuda")
            w = torch.rand(H, dtype=BF16, device="cuda") + 0.5
            out, _ = fused_add_rms_norm(x, r, w, 1e-6)
            err = rel(out, fused_add_rms_norm_ref(x, r, w, 1e-6)[0])
            b = 4 * T * H * 2 + H * 2
            row("add_rmsnorm", f"T={T} H={H}", "triton", lambda: fused_add_rms_norm(x, r, w, 1e-6), b, 0, err)
            row("add_rmsnorm", f"T={T} H={H}", "torch", lambda: fused_add_rms_norm_ref(x, r, w, 1e-6), b, 0)


def bench_rotary():
    from fractal.kernels.rotary import build_cos_sin_cache, rotary_embedding_, rotary_ref

    for name, hq, hk, d, rot, style in (("llama8b", 32, 8, 128, 128, "neox"), ("dsv2lite", 16, 1, 192, 64, "interleave")):
        inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, device="cuda").float() / rot))
        cache = build_cos_sin_cache(inv, 16384)
        for T in (64, 8192):
            pos = torch.randint(0, 16384, (T,), device="cuda")
            q = torch.randn(T, hq, d, dtype=BF16, device="cuda")
            k = torch.randn(T, hk, d, dtype=BF16, device="cuda")
            qv, kv = q[..., d - rot:], k[..., d - rot:]
            q_ref, k_ref = rotary_ref(pos, qv, kv, cache, style)
            rotary_embedding_(pos, qv, kv, cache, style)
            err = max(rel(qv, q_ref), rel(kv, k_ref))
            b = 2 * T * (hq + hk) * rot * 2 + T * rot * 4 + T * 8
            row("rotary", f"{name} T={T}", "triton", lambda: rotary_embedding_(pos, qv, kv, cache, style), b, 0, err)
            row("rotary", f"{name} T={T}", "torch", lambda: rotary_ref(pos, qv, kv, cache, style), b, 0)


def bench_routing():
    from fractal.kernels.moe_routing import RoutingConfig, route, route_ref

    cfgs = (("dsv2lite", 64, RoutingConfig(top_k=6), False),
            ("qwen3moe", 128, RoutingConfig(top_k=8, renormalize=True), False),
            ("dsv3", 256, RoutingConfig(top_k=8, scoring="sigmoid", n_group=8, topk_group=4, renormalize=True,
                                        routed_scaling_factor=2.5), True))
    for name, E, cfg, with_bias in cfgs:
        bias = torch.randn(E, device="cuda") * 0.1 if with_bias else None
        for T in (1, 64, 8192):
            logits = torch.randn(T, E, dtype=BF16, device="cuda")
            w, ids = route(logits, cfg, bias)
            w_ref, ids_ref = route_ref(logits, cfg, bias)
            same = (ids.long().sort(-1).values == ids_ref.long().sort(-1).values).float().mean().item()
            err = rel(w.sort(-1).values, w_ref.sort(-1).values) + (1.0 - same)
            b = T * E * 2 + T * cfg.top_k * 8
            row("moe_route", f"{name} T={T}", "triton", lambda: route(logits, cfg, bias), b, 0, err)
            row("moe_route", f"{name} T={T}", "torch", lambda: route_ref(logits, cfg, bias), b, 0)


# ---------------------------------------------------------------- MoE experts
MOE_SHAPES = (("dsv2lite", 64, 2048, 1408, 6), ("qwen3moe", 128, 2048, 768, 8))


def _moe_case(E, H, I, k, T):
    x = torch.randn(T, H, dtype=BF16, device="cuda")
    ids = torch.rand(T, E, device="cuda").topk(k, dim=-1).indices.to(torch.int32)
    w = torch.rand(T, k, device="cuda")
    touched = ids.unique().numel()
    return x, ids, w, touched * 3 * H * I * 2 + 2 * T * H * 2, 2 * T * k * 3 * H * I


def bench_moe():
    from fractal.kernels.moe_experts import _experts_triton_r2, fused_experts, fused_experts_ref

    for name, E, H, I, k in MOE_SHAPES:
        w13, w2 = _moe_weights(E, H, I)
        for T in (1, 8, 64, 256, 2048):
            x, ids, w, b, f = _moe_case(E, H, I, k, T)
            ref = fused_experts_ref(x, w13, w2, w, ids)
            variants = ("gemv", "triton", "triton-r2", "grouped_mm") if T <= 64 else ("triton", "triton-r2", "grouped_mm")
            for backend in variants:
                if backend == "triton-r2":  # round 2's padded GEMM, same run, for before/after
                    fn = lambda: _experts_triton_r2(x, w13, w2, w, ids)  # noqa: E731
                else:
                    fn = lambda backend=backend: fused_experts(x, w13, w2, w, ids, backend=backend)  # noqa: E731
                row("moe_experts", f"{name} T={T} E={E} k={k}", backend, fn, b, f, rel(fn(), ref))
            if name == "dsv2lite" and T in (1, 8):  # round 2: the 2 shared experts inside the gemv launches
                from fractal.kernels.moe_experts import silu_and_mul
                s13 = (torch.randn(2 * 2 * I, H, device="cuda") / H ** 0.5).to(BF16)
                s2 = (torch.randn(H, 2 * I, device="cuda") / (2 * I) ** 0.5).to(BF16)
                bs = b + 3 * H * 2 * I * 2
                sref = ref + torch.nn.functional.linear(silu_and_mul(x @ s13.t()), s2)
                out = fused_experts(x, w13, w2, w, ids, backend="gemv", shared=(s13, s2))
                row("moe_experts", f"{name} T={T} E={E} k={k} +2 shared", "gemv+shared",
                    lambda: fused_experts(x, w13, w2, w, ids, backend="gemv", shared=(s13, s2)), bs, f,
                    rel(out, sref))
                row("moe_experts", f"{name} T={T} E={E} k={k} +2 shared", "gemv, shared add=",
                    lambda: fused_experts(x, w13, w2, w, ids, backend="gemv",
                                          add=torch.nn.functional.linear(silu_and_mul(x @ s13.t()), s2)), bs, f)
                row("moe_experts", f"{name} T={T} E={E} k={k} +2 shared", "triton, shared add=",
                    lambda: fused_experts(x, w13, w2, w, ids, backend="triton",
                                          add=torch.nn.functional.linear(silu_and_mul(x @ s13.t()), s2)), bs, f)
        del w13, w2


def bench_moe_sweep():
    """Round 3: launch configs of the fused-MoE GEMMs (T=64, 256) and of the gemv kernels (T=1, 8)."""
    from fractal.kernels.moe_experts import _experts_gemv, fused_experts_ref
    from fractal.kernels.moe_fused_gemm import DOWN_CONFIG, GATE_UP_CONFIG, fused_moe_mlp

    gu = [GATE_UP_CONFIG, (64, 128, 4, 4), (128, 64, 4, 4), (32, 128, 4, 4), (64, 64, 4, 5), (128, 128, 8, 3),
          (64, 256, 8, 3)]
    dn = [DOWN_CONFIG, (128, 128, 4, 3), (64, 64, 4, 5), (128, 64, 8, 4), (32, 128, 4, 4), (64, 256, 8, 3)]
    ggu = [(16, 256, 4), (8, 512, 4), (16, 512, 8), (32, 256, 8), (32, 128, 4), (8, 256, 2)]
    gdn = [(32, 256, 4), (16, 512, 4), (64, 128, 4), (16, 256, 2), (64, 256, 8)]
    for name, E, H, I, k in MOE_SHAPES:
        w13, w2 = _moe_weights(E, H, I)
        for T in (64, 256):
            x, ids, w, b, f = _moe_case(E, H, I, k, T)
            base = fused_moe_mlp(x, w13, w2, ids)  # the default config (checked against the reference in [moe])
            combos = [(c, DOWN_CONFIG, None) for c in gu] + [(GATE_UP_CONFIG, c, None) for c in dn[1:]]
            combos += [(GATE_UP_CONFIG, DOWN_CONFIG, bm) for bm in (16, 32, 64)]
            for cg, cd, bm in combos:
                label = "gu" + "/".join(map(str, cg)) + " dn" + "/".join(map(str, cd)) + (f" bm{bm}" if bm else "")
                fn = lambda: fused_moe_mlp(x, w13, w2, ids, block_m=bm, gate_up_config=cg, down_config=cd)  # noqa: E731
                try:
                    row("moe_sweep", f"{name} T={T}", label, fn, b, f, rel(fn(), base))
                except Exception as e:
                    print(f"  moe_sweep {label} FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
        for T in (1,):
            x, ids, w, b, f = _moe_case(E, H, I, k, T)
            ref = fused_experts_ref(x, w13, w2, w, ids)
            for cfgs in [(c, gdn[0]) for c in ggu] + [(ggu[0], c) for c in gdn[1:]]:
                label = "gemv gu" + "/".join(map(str, cfgs[0])) + " dn" + "/".join(map(str, cfgs[1]))
                fn = lambda: _experts_gemv(x, w13, w2, w, ids, configs=cfgs)  # noqa: E731
                try:
                    row("moe_sweep", f"{name} T={T}", label, fn, b, f, rel(fn(), ref))
                except Exception as e:
                    print(f"  moe_sweep {label} FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
        del w13, w2


# ---------------------------------------------------------------- attention
def bench_moe_large():
    """Round 4: prefill-sized T (2048, 8192): grouped_mm vs the fused Triton GEMM (its default config for the size,
    round 3's 64-row config, and a few compute-bound configs). Sweep rows' err is against grouped_mm's output."""
    from fractal.kernels.moe_experts import fused_experts, fused_experts_ref
    from fractal.kernels.moe_fused_gemm import DOWN_CONFIG, GATE_UP_CONFIG, fused_moe_mlp

    sweep = [  # (block_m, gate/up (BLOCK_N, BLOCK_K, warps, stages), down config, group_m)
        (64, GATE_UP_CONFIG, DOWN_CONFIG, 0),                  # round 3 at T=2048 (1134 us)
        (128, (64, 64, 8, 4), (128, 64, 8, 4), 0),             # large default, no swizzle
        (128, (64, 64, 8, 3), (128, 64, 8, 3), 8),
        (128, (128, 64, 8, 3), (256, 64, 8, 3), 8),
        (64, (128, 64, 8, 3), (128, 64, 4, 4), 8),
        (128, (64, 64, 4, 4), (128, 64, 4, 4), 8),
    ]
    for name, E, H, I, k in MOE_SHAPES:
        w13, w2 = _moe_weights(E, H, I)
        for T in (2048, 8192):
            x, ids, w, b, f = _moe_case(E, H, I, k, T)
            ref = fused_experts_ref(x, w13, w2, w, ids)
            shape = f"{name} T={T} E={E} k={k}"
            for backend in ("grouped_mm", "triton"):
                fn = lambda backend=backend: fused_experts(x, w13, w2, w, ids, backend=backend)  # noqa: E731
                row("moe_experts", shape, backend, fn, b, f, rel(fn(), ref))
            base = fused_experts(x, w13, w2, torch.ones_like(w), ids, backend="grouped_mm")
            for bm, cg, cd, gm in sweep:
                label = f"bm{bm} gu" + "/".join(map(str, cg)) + " dn" + "/".join(map(str, cd)) + f" g{gm}"
                fn = lambda: fused_moe_mlp(x, w13, w2, ids, block_m=bm, gate_up_config=cg, down_config=cd,  # noqa: E731
                                           group_m=gm)
                try:
                    err = rel(fn().view(T, k, H).float().sum(1), base.float())
                    row("moe_large", shape, label, fn, b, f, err)
                except Exception as e:
                    print(f"  moe_large {label} FAILED {type(e).__name__}: {str(e)[:160]}", flush=True)
        del w13, w2


def _moe_weights(E, H, I):
    """Random bf16 expert weights w13 [E, 2I, H], w2 [E, H, I] at unit output scale."""
    w13 = (torch.randn(E, 2 * I, H, device="cuda") / H ** 0.5).to(BF16)
    w2 = (torch.randn(E, H, I, device="cuda") / I ** 0.5).to(BF16)
    return w13, w2


def _moe_triton_vs_grouped(kernel: str, sizes, variants=None) -> None:
    """Both shapes at each T in sizes: the Triton variants (label -> fn(x, w13, w2, weights, ids); default: the
    Triton path with its config for the size), then grouped_mm."""
    from fractal.kernels.moe_experts import fused_experts, fused_experts_ref

    if variants is None:
        variants = {"triton": lambda *a: fused_experts(*a, backend="triton")}
    variants = dict(variants, grouped_mm=lambda *a: fused_experts(*a, backend="grouped_mm"))
    for name, E, H, I, k in MOE_SHAPES:
        w13, w2 = _moe_weights(E, H, I)
        for T in sizes:
            x, ids, w, b, f = _moe_case(E, H, I, k, T)
            ref = fused_experts_ref(x, w13, w2, w, ids)
            for label, variant in variants.items():
                fn = lambda variant=variant: variant(x, w13, w2, w, ids)  # noqa: E731
                row(kernel, f"{name} T={T} E={E} k={k}", label, fn, b, f, rel(fn(), ref))
        del w13, w2


def bench_moe_mid():
    """Round 5: decode of 256-512 sequences (1.5k-9k pairs): the Triton path (its config for the size) vs
    grouped_mm, to place TRITON_MAX_PAIRS."""
    _moe_triton_vs_grouped("moe_experts", (256, 384, 512, 768, 1024, 1536))


def bench_r6_moe():
    """Round 6: MoE at decode sizes, the block-size thresholds (16|32|64 rows by mean rows per expert) swept,
    against grouped_mm."""
    import fractal.kernels.moe_fused_gemm as mfg
    from fractal.kernels.moe_experts import fused_experts

    names = ("SMALL_MAX_ROWS_PER_EXPERT", "MID32_MAX_ROWS_PER_EXPERT")

    def with_thresholds(small, mid):
        def fn(*args):
            old = [getattr(mfg, a) for a in names]
            for a, v in zip(names, (small, mid)):
                setattr(mfg, a, v)
            try:
                return fused_experts(*args, backend="triton")
            finally:
                for a, v in zip(names, old):
                    setattr(mfg, a, v)
        return fn

    variants = {label: with_thresholds(small, mid) for label, small, mid in (
        ("triton 16|32|64 at <=16|48", 16, 48), ("at <=16|32", 16, 32), ("at <=8|48", 8, 48), ("at <=12|48", 12, 48))}
    _moe_triton_vs_grouped("moe_r6", (64, 128, 192, 256, 512), variants)


def bench_r6_large():
    """Round 6: prefill-chunk sizes of preempting / mixed steps (8k-50k pairs): the Triton path with its config for
    the size against grouped_mm."""
    _moe_triton_vs_grouped("moe_r6large", (1024, 2048, 3072, 4096, 6144))


def bench_r9_large():
    """Round 9: with the expert-major tile order, the Triton path against grouped_mm at prefill-step sizes up to
    the suite's 16k-token budget (TRITON_MAX_PAIRS sits at 32k pairs: 5.4k / 4k tokens)."""
    _moe_triton_vs_grouped("moe_r9large", (4096, 8192, 16384))


def bench_r6_mla():
    """Round 6: MLA decode launch configs (tiles, warps, stages, split bounds, 16/32/64-head blocks) at
    b=1/64/256/512."""
    from fractal.kernels.mla_decode import mla_decode

    page, H, L, R = 16, 16, 512, 64
    configs = {
        "default": {},
        "c32s32": dict(min_chunk=32, max_splits=32),
        "n64w4": dict(BLOCK_N=64, num_warps=4),
        "n64w8": dict(BLOCK_N=64, num_warps=8),
        "n16c16s64": dict(BLOCK_N=16, min_chunk=16, max_splits=64, num_stages=3),
        "w8s3": dict(num_warps=8, num_stages=3),
        "n16s4": dict(BLOCK_N=16, num_stages=4),
        "pps1": dict(programs_per_sm=1),
        "pps4": dict(programs_per_sm=4),
        "h64": dict(BLOCK_H=64),
        "h64w8": dict(BLOCK_H=64, num_warps=8),
        "h64s3": dict(BLOCK_H=64, num_stages=3),
        "h64n64w8": dict(BLOCK_H=64, BLOCK_N=64, num_warps=8),
        "h64n64w8s3": dict(BLOCK_H=64, BLOCK_N=64, num_warps=8, num_stages=3),
        "h64n16": dict(BLOCK_H=64, BLOCK_N=16, num_stages=3),
        "h32": dict(BLOCK_H=32),
    }
    for B, ctx in ((1, 1024), (64, 1024), (256, 640), (512, 640)):
        bt, sl, cache, ql, qr, b, f = _mla_case(B, ctx, page, H, L, R)
        base = mla_decode(ql, qr, cache, bt, sl, 0.135, max_seq_len=ctx)
        for name, cfg in configs.items():
            try:
                out = mla_decode(ql, qr, cache, bt, sl, 0.135, max_seq_len=ctx, config=cfg)
                row("mla_r6", f"B={B} ctx={ctx}", name,
                    lambda cfg=cfg: mla_decode(ql, qr, cache, bt, sl, 0.135, max_seq_len=ctx, config=cfg), b, f,
                    rel(out, base))
            except Exception as e:
                print(f"  mla_r6 {name} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        del cache


def _paged(seq_lens, page, shape_tail, device="cuda"):
    need = [math.ceil(n / page) for n in seq_lens]
    nb = sum(need) + 1
    perm = torch.randperm(nb, device=device).to(torch.int32)
    width = max(need)
    bt = torch.zeros(len(seq_lens), width, dtype=torch.int32, device=device)
    i = 0
    for s, n in enumerate(need):
        bt[s, :n] = perm[i:i + n]
        i += n
    return nb, bt, torch.tensor(seq_lens, dtype=torch.int32, device=device)


def bench_decode():
    from fractal.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

    page = 16
    for name, hq, hkv, d in (("llama8b", 32, 8, 128), ("qwen3moe", 32, 4, 128)):
        for ctx in (1024, 4096):
            for B in (1, 8, 64, 256):
                nb, bt, sl = _paged([ctx] * B, page, None)
                cache = torch.randn(2, nb, page, hkv, d, dtype=BF16, device="cuda")
                q = torch.randn(B, hq, d, dtype=BF16, device="cuda")
                out = paged_decode_attention(q, cache, bt, sl, d ** -0.5, max_seq_len=ctx)
                err = rel(out, paged_decode_attention_ref(q, cache, bt, sl, d ** -0.5)) if B <= 64 else None
                b = B * ctx * hkv * d * 2 * 2 + 2 * B * hq * d * 2
                f = 4 * B * hq * ctx * d
                row("gqa_decode", f"{name} B={B} ctx={ctx}", "triton",
                    lambda: paged_decode_attention(q, cache, bt, sl, d ** -0.5, max_seq_len=ctx), b, f, err)
                del cache


def bench_mla():
    from fractal.kernels.mla_decode import mla_decode, mla_decode_ref

    page, H, L, R = 16, 16, 512, 64
    for ctx in (1024, 4096):
        for B in (1, 8, 64, 256):
            nb, bt, sl = _paged([ctx] * B, page, None)
            cache = torch.randn(nb, page, L + R, dtype=BF16, device="cuda")
            ql = torch.randn(B, H, L, dtype=BF16, device="cuda")
            qr = torch.randn(B, H, R, dtype=BF16, device="cuda")
            out = mla_decode(ql, qr, cache, bt, sl, 0.135, max_seq_len=ctx)
            err = rel(out, mla_decode_ref(ql, qr, cache, bt, sl, 0.135)) if B <= 64 else None
            b = B * ctx * (L + R) * 2 + 2 * B * H * L * 2
            f = 2 * B * H * ctx * (L + R + L)
            row("mla_decode", f"dsv2lite B={B} ctx={ctx}", "triton",
                lambda: mla_decode(ql, qr, cache, bt, sl, 0.135, max_seq_len=ctx), b, f, err)
            del cache


def _mla_case(B, ctx, page, H, L, R):
    """Random latent cache / queries for MLA decode of B sequences of ctx tokens: (block tables, lens, cache,
    q_latent, q_rope, bytes, flops)."""
    nb, bt, sl = _paged([ctx] * B, page, None)
    cache = torch.randn(nb, page, L + R, dtype=BF16, device="cuda")
    ql = torch.randn(B, H, L, dtype=BF16, device="cuda")
    qr = torch.randn(B, H, R, dtype=BF16, device="cuda")
    return bt, sl, cache, ql, qr, B * ctx * (L + R) * 2, 2 * B * H * ctx * (L + R + L)


def _causal_pairs(query_lens, ctx_lens):
    return sum(q * c + q * (q + 1) // 2 for q, c in zip(query_lens, ctx_lens))


def bench_prefill():
    from fractal.kernels.prefill_attention import paged_prefill_attention, sdpa_prefill_attention, varlen_attention

    page = 16
    cases = (("16x512", [512] * 16, [0] * 16), ("1x8192", [8192], [0]),
             ("4x512 after 1536 cached", [512] * 4, [1536] * 4))
    for name, hq, hkv, d in (("llama8b", 32, 8, 128), ("qwen3moe", 32, 4, 128)):
        for label, qls, ctxs in cases:
            seq = [q + c for q, c in zip(qls, ctxs)]
            nb, bt, sl = _paged(seq, page, None)
            cache = torch.randn(2, nb, page, hkv, d, dtype=BF16, device="cuda")
            q = torch.randn(sum(qls), hq, d, dtype=BF16, device="cuda")
            qsl = torch.tensor([0] + torch.tensor(qls).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
            base = sdpa_prefill_attention(q, cache, qsl, sl, bt, d ** -0.5, qls, seq)
            out = paged_prefill_attention(q, cache, qsl, sl, bt, d ** -0.5, max_query_len=max(qls))
            err = rel(out, base)
            f = 4 * hq * d * _causal_pairs(qls, ctxs)
            b = (sum(seq) * hkv * d * 2 + 2 * sum(qls) * hq * d) * 2
            shape = f"{name} {label}"
            row("prefill_attn", shape, "triton",
                lambda: paged_prefill_attention(q, cache, qsl, sl, bt, d ** -0.5, max_query_len=max(qls)), b, f, err,
                graph=False)
            row("prefill_attn", shape, "sdpa+gather",
                lambda: sdpa_prefill_attention(q, cache, qsl, sl, bt, d ** -0.5, qls, seq), b, f, graph=False)
            del cache
    # MLA prefill (DeepSeek-V2-Lite): 16 heads, qk 192, v 128, contiguous K/V
    for label, qls, ctxs in cases[:2]:
        seq = [q + c for q, c in zip(qls, ctxs)]
        q = torch.randn(sum(qls), 16, 192, dtype=BF16, device="cuda")
        k = torch.randn(sum(seq), 16, 192, dtype=BF16, device="cuda")
        v = torch.randn(sum(seq), 16, 128, dtype=BF16, device="cuda")
        cuq = torch.tensor([0] + torch.tensor(qls).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        cuk = torch.tensor([0] + torch.tensor(seq).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        out = varlen_attention(q, k, v, cuq, cuk, 192 ** -0.5, max_query_len=max(qls))
        import torch.nn.functional as F

        def sdpa():
            o = []
            for i in range(len(qls)):
                qi = q[cuq[i]:cuq[i + 1]].transpose(0, 1)[None]
                ki = k[cuk[i]:cuk[i + 1]].transpose(0, 1)[None]
                vi = v[cuk[i]:cuk[i + 1]].transpose(0, 1)[None]
                o.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=192 ** -0.5)[0])
            return o
        base = torch.cat([x.transpose(0, 1) for x in sdpa()])
        err = rel(out, base)
        f = 2 * 16 * (192 + 128) * _causal_pairs(qls, ctxs)
        b = (sum(seq) * 16 * (192 + 128) + sum(qls) * 16 * (192 + 128)) * 2
        row("mla_prefill", f"dsv2lite {label}", "triton",
            lambda: varlen_attention(q, k, v, cuq, cuk, 192 ** -0.5, max_query_len=max(qls)), b, f, err, graph=False)
        row("mla_prefill", f"dsv2lite {label}", "sdpa", sdpa, b, f, graph=False)


def bench_sampling():
    try:
        from fractal.kernels.sampling import sample, sample_ref  # noqa: F401
    except ImportError:
        return
    for B in (1, 64, 256):
        V = 151936
        logits = torch.randn(B, V, dtype=torch.float32, device="cuda") * 3
        temp = torch.full((B,), 0.8, device="cuda")
        top_k = torch.full((B,), 50, dtype=torch.int32, device="cuda")
        top_p = torch.full((B,), 0.9, device="cuda")
        b = B * V * 4
        row("sampling", f"B={B} V={V} greedy", "torch", lambda: torch.argmax(logits, -1), b, 0)
        row("sampling", f"B={B} V={V} topk50 p0.9", "sort", lambda: sample(logits, temp, top_k, top_p), b, 0)
        row("sampling", f"B={B} V={V} topk50 p0.9", "topk50",
            lambda: sample(logits, temp, top_k, top_p, max_top_k=50), b, 0)


SECTIONS = {"rmsnorm": bench_rmsnorm, "rotary": bench_rotary, "routing": bench_routing, "moe": bench_moe,
            "decode": bench_decode, "mla": bench_mla, "prefill": bench_prefill, "sampling": bench_sampling}


def bench_sweep():
    """Launch-config sweeps for the kernels whose first tuning missed (MLA decode, prefill attention)."""
    from fractal.kernels.mla_decode import mla_decode
    from fractal.kernels.prefill_attention import paged_prefill_attention, varlen_attention

    page, H, L, R = 16, 16, 512, 64
    for B, ctx in ((64, 4096), (256, 1024), (8, 4096)):
        bt, sl, cache, ql, qr, b, f = _mla_case(B, ctx, page, H, L, R)
        for cfg in (dict(BLOCK_N=32, num_warps=4, num_stages=2), dict(BLOCK_N=32, num_warps=4, num_stages=3),
                    dict(BLOCK_N=32, num_warps=8, num_stages=3), dict(BLOCK_N=64, num_warps=8, num_stages=2),
                    dict(BLOCK_N=16, num_warps=4, num_stages=4), dict(BLOCK_N=64, num_warps=4, num_stages=2),
                    dict(BLOCK_N=32, num_warps=4, num_stages=2, min_chunk=1024)):
            name = "n{BLOCK_N}w{num_warps}s{num_stages}".format(**cfg) + ("c1k" if "min_chunk" in cfg else "")
            try:
                row("sweep_mla", f"B={B} ctx={ctx}", name,
                    lambda: mla_decode(ql, qr, cache, bt, sl, 0.135, max_seq_len=ctx, config=cfg), b, f)
            except Exception as e:
                print(f"  sweep_mla {name} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        del cache
    hq, hkv, d = 32, 8, 128
    for label, qls in (("1x8192", [8192]), ("16x512", [512] * 16)):
        nb, bt, sl = _paged(qls, page, None)
        cache = torch.randn(2, nb, page, hkv, d, dtype=BF16, device="cuda")
        q = torch.randn(sum(qls), hq, d, dtype=BF16, device="cuda")
        qsl = torch.tensor([0] + torch.tensor(qls).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        f = 4 * hq * d * _causal_pairs(qls, [0] * len(qls))
        for cfg in (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
                    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
                    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
                    dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
                    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
                    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=4)):
            name = "m{BLOCK_M}n{BLOCK_N}w{num_warps}s{num_stages}".format(**cfg)
            try:
                row("sweep_prefill", f"llama8b {label}", name,
                    lambda: paged_prefill_attention(q, cache, qsl, sl, bt, d ** -0.5, max_query_len=max(qls),
                                                    config=cfg), 0, f, graph=False)
            except Exception as e:
                print(f"  sweep_prefill {name} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        del cache
    qls = [8192]
    q = torch.randn(8192, 16, 192, dtype=BF16, device="cuda")
    k = torch.randn(8192, 16, 192, dtype=BF16, device="cuda")
    v = torch.randn(8192, 16, 128, dtype=BF16, device="cuda")
    cu = torch.tensor([0, 8192], dtype=torch.int32, device="cuda")
    f = 2 * 16 * (192 + 128) * _causal_pairs(qls, [0])
    for cfg in (dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_M=128, BLOCK_N=64, num_warps=8,
                num_stages=2), dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3),
                dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3)):
        name = "m{BLOCK_M}n{BLOCK_N}w{num_warps}s{num_stages}".format(**cfg)
        try:
            row("sweep_mla_pre", "dsv2lite 1x8192", name,
                lambda: varlen_attention(q, k, v, cu, cu, 192 ** -0.5, max_query_len=8192, config=cfg), 0, f,
                graph=False)
        except Exception as e:
            print(f"  sweep_mla_pre {name} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


SECTIONS["sweep"] = bench_sweep
SECTIONS["r6moe"] = bench_r6_moe
SECTIONS["r6mla"] = bench_r6_mla
SECTIONS["r6large"] = bench_r6_large
SECTIONS["r9large"] = bench_r9_large
SECTIONS["moe_sweep"] = bench_moe_sweep
SECTIONS["moe_large"] = bench_moe_large
SECTIONS["moe_mid"] = bench_moe_mid


def print_table():
    print("\n| kernel | shape | variant | time us | mode | eager us | floor us | bound | MBU | MFU | err |")
    print("|---|---|---|---:|---|---:|---:|---|---:|---:|---|")
    for r in ROWS:
        err = "-" if r["err"] is None else f"{r['err']:.1e}"
        print(f"| {r['kernel']} | {r['shape']} | {r['variant']} | {r['time_us']:.1f} | {r['mode']} | "
              f"{r['eager_us']:.1f} | {r['floor_us']:.1f} | {r['bound']} | {r['mbu']:.0%} | {r['mfu']:.0%} | {err} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated section names: " + ",".join(SECTIONS))
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench_kernels.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU")
        return 1
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    measure_ceilings()
    only = [s for s in args.only.split(",") if s]
    for name, fn in SECTIONS.items():
        if (only and name not in only) or (not only and name in ("sweep", "moe_sweep", "moe_large", "moe_mid", "r6moe", "r6mla", "r6large", "r9large")):  # sweeps only when asked for
            continue
        print(f"[{name}]", flush=True)
        try:
            fn()
        except Exception as e:  # keep the other sections' numbers
            print(f"  {name} FAILED: {type(e).__name__}: {e}", flush=True)
        torch.cuda.empty_cache()
    try:
        with open(args.json, "w") as fh:
            json.dump(ROWS, fh, indent=1)
    except OSError:
        pass
    print_table()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
