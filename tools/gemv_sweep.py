"""Batch-1 MoE GEMV launch configs: the gemv kernels of fractal.kernels.moe_experts over (BLOCK_N, BLOCK_K, warps).

    python3 tools/gemv_sweep.py

Also (`dense`): the dense batch-1 projections of the suite models through fractal.kernels.gemv, against cuBLAS.

Times the gate/up (SiLU fused) and down GEMVs of one MoE layer at T=1 in a CUDA graph, rotating over 4 layers'
weights so no layer's experts sit in L2, for DeepSeek-V2-Lite (6 routed + 2 shared-expert slices) and
Qwen3-30B-A3B (8 routed). Prints us per call and TB/s of weight bytes; checks each config against the default
config's output.

Round 7 (H100) ran this on K-unrolled copies of the kernels against the then rolled-loop kernels: gate/up
dsv2lite 36.99 -> 31.87 us (4, 1024, 4), qwen3moe 23.46 -> 18.94; down 19.71 -> 18.27 us (8, 128, 2), 11.92 -> 11.22;
accumulating [BLOCK_N, BLOCK_K] elementwise and reducing once beat reducing every chunk. The kernels now unroll.
"""
from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from fractal.kernels.cuda_graphs import calls_us
from fractal.kernels.moe_experts import (GEMV_DOWN_CONFIG, GEMV_GATE_UP_CONFIG, _gemv_down_kernel,
                                         _gemv_gate_up_kernel)


GATE_UP_CONFIGS = [GEMV_GATE_UP_CONFIG] + [c for c in itertools.product((4, 8, 16), (256, 512, 1024), (2, 4))
                                           if c != GEMV_GATE_UP_CONFIG and 2 * c[0] * c[1] <= 64 * 32 * c[2]]
DOWN_CONFIGS = [GEMV_DOWN_CONFIG] + [c for c in itertools.product((8, 16, 32, 64), (128, 256, 512), (2, 4))
                                     if c != GEMV_DOWN_CONFIG and c[0] * c[1] <= 64 * 32 * c[2]]


def sweep(name, E, H, I, k, shared_mult):
    dev, bf = "cuda", torch.bfloat16
    layers = []
    gen = torch.Generator(device=dev).manual_seed(0)
    for _ in range(4):
        w13 = (torch.randn(E, 2 * I, H, device=dev, generator=gen) * 0.02).to(bf)
        w2 = (torch.randn(E, H, I, device=dev, generator=gen) * 0.02).to(bf)
        IS = max(1, shared_mult) * I
        ws13 = (torch.randn(2 * IS, H, device=dev, generator=gen) * 0.02).to(bf)
        ws2 = (torch.randn(H, IS, device=dev, generator=gen) * 0.02).to(bf)
        ids = torch.randperm(E, device=dev, generator=gen)[:k].to(torch.int32)
        layers.append((w13, w2, ws13, ws2, ids))
    x = torch.randn(1, H, device=dev, dtype=bf)
    ns = shared_mult
    IS = max(1, ns) * I
    rows = k + ns
    a = torch.randn(rows, I, device=dev, dtype=bf)
    gu_bytes = rows * 2 * I * H * 2
    dn_bytes = rows * H * I * 2
    outs_a = [torch.empty(rows, I, device=dev, dtype=bf) for _ in layers]
    outs_y = [torch.empty(rows, H, device=dev, dtype=bf) for _ in layers]

    def gu(L, o, cfg=GEMV_GATE_UP_CONFIG):
        w13, w2, ws13, ws2, ids = L
        bn, bk, nw = cfg
        return lambda: _gemv_gate_up_kernel[(rows, triton.cdiv(I, bn))](
            x, w13, ws13, ids, o, I, IS, k, x.stride(0), w13.stride(0), w13.stride(1), o.stride(0),
            H=H, TOPK=k, NS=max(ns, 1), BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PDL=False, DENSE=False)

    def dn(L, o, cfg=GEMV_DOWN_CONFIG):
        w13, w2, ws13, ws2, ids = L
        bn, bk, nw = cfg
        return lambda: _gemv_down_kernel[(rows, triton.cdiv(H, bn))](
            a, w2, ws2, ids, o, H, IS, k, a.stride(0), w2.stride(0), w2.stride(1), o.stride(0),
            I=I, NS=max(ns, 1), BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, PDL=False, DENSE=False)

    print(f"\n== {name}: {rows} rows, gate/up {gu_bytes / 1e6:.1f} MB, down {dn_bytes / 1e6:.1f} MB per layer")
    for f in [gu(L, o) for L, o in zip(layers, outs_a)]:
        f()
    ref_a = outs_a[0].clone()
    for f in [dn(L, o) for L, o in zip(layers, outs_y)]:
        f()
    ref_y = outs_y[0].clone()
    for label, make, outs, ref, nbytes, cfgs in (
        ("gate/up", gu, outs_a, ref_a, gu_bytes, GATE_UP_CONFIGS), ("down", dn, outs_y, ref_y, dn_bytes, DOWN_CONFIGS),
    ):
        res = []
        for cfg in cfgs:
            try:
                us = calls_us([make(L, o, cfg) for L, o in zip(layers, outs)])
                res.append((us, cfg, torch.allclose(outs[0].float(), ref.float(), atol=2e-2, rtol=2e-2)))
            except Exception as e:
                print(f"  {label} {cfg} FAILED {type(e).__name__}: {str(e)[:100]}")
        for us, cfg, ok in sorted(res)[:8]:
            mark = " (default)" if cfg == cfgs[0] else ""
            print(f"  {label:8s}{str(cfg):18s}{us:8.2f} us {nbytes / us / 1e6:6.2f} TB/s {'ok' if ok else 'MISMATCH'}{mark}")
    del layers
    torch.cuda.empty_cache()


DENSE_SHAPES = [  # (label, N, K, silu): the batch-1 dense projections of the three suite models
    ("dsv2lite q+kv_a", 3648, 2048, False), ("dsv2lite o_proj", 2048, 2048, False),
    ("qwen3moe qkv", 5120, 2048, False), ("qwen3moe o_proj", 2048, 4096, False),
    ("llama qkv", 6144, 4096, False), ("llama o_proj", 4096, 4096, False),
    ("llama gate_up+silu", 2 * 14336, 4096, True), ("llama down", 4096, 14336, False),
    ("dsv2lite dense gate_up+silu", 2 * 10944, 2048, True), ("dsv2lite dense down", 2048, 10944, False),
]
DENSE_CONFIGS = [(4, 1024, 4), (4, 512, 2), (8, 128, 2), (8, 256, 2), (8, 512, 4), (16, 128, 4), (16, 256, 4),
                 (2, 1024, 2), (4, 256, 2), (32, 128, 4)]


def dense() -> None:
    """fractal.kernels.gemv against cuBLAS (F.linear, + silu_and_mul for the gate/up rows) at T=1."""
    from fractal.kernels.gemv import gemv, gemv_silu_and_mul
    from fractal.kernels.moe_experts import silu_and_mul

    dev, bf = "cuda", torch.bfloat16
    print("\n== dense projections at T=1 (4 weight copies rotated; us per call, TB/s of weight bytes)")
    for label, N, K, silu in DENSE_SHAPES:
        ws = [(torch.randn(N, K, device=dev) * 0.02).to(bf) for _ in range(4)]
        x = torch.randn(1, K, device=dev, dtype=bf)
        nbytes = N * K * 2
        if silu:
            base = [lambda w=w: silu_and_mul(torch.nn.functional.linear(x, w)) for w in ws]
            ours = lambda cfg: [lambda w=w: gemv_silu_and_mul(x, w, cfg) for w in ws]  # noqa: E731
        else:
            base = [lambda w=w: torch.nn.functional.linear(x, w) for w in ws]
            ours = lambda cfg: [lambda w=w: gemv(x, w, cfg) for w in ws]  # noqa: E731
        ref = base[0]().float()
        us = calls_us(base)
        line = f"  {label:28s} cuBLAS {us:7.2f} us {nbytes / us / 1e6:5.2f} TB/s |"
        res = []
        for cfg in DENSE_CONFIGS:
            try:
                fns = ours(cfg)
                ok = torch.allclose(fns[0]().float(), ref, atol=2e-2, rtol=2e-2)
                res.append((calls_us(fns), cfg, ok))
            except Exception as e:
                print(f"  {label} {cfg} FAILED {type(e).__name__}: {str(e)[:100]}")
        for t, cfg, ok in sorted(res)[:3]:
            line += f" {cfg} {t:6.2f} us {nbytes / t / 1e6:5.2f}{'' if ok else ' MISMATCH'} |"
        print(line, flush=True)
        del ws
        torch.cuda.empty_cache()


def main() -> None:
    print(torch.cuda.get_device_name())
    sweep("dsv2lite T=1 (6 routed + 2 shared slices)", 64, 2048, 1408, 6, 2)
    sweep("qwen3moe T=1 (8 routed)", 128, 2048, 768, 8, 0)
    dense()


if __name__ == "__main__":
    main()
