"""Launch configs of the aligned-block MoE GEMMs (fractal.kernels.moe_fused_gemm) at decode batch sizes.

    python3 tools/moe_config_sweep.py [--shapes dsv2lite:512,dsv2lite:256,qwen3moe:256]

For each (model, T tokens) times fused_moe_mlp (alignment + gate/up-SiLU + down) in a CUDA graph, rotating over 4
layers' expert weights (> L2), with uniform random routing: first the default configs of launch_configs(), then
every gate/up config with the default down config and every down config with the default gate/up config, each
checked against the default's output. Prints us per layer and the TB/s of the expert weights read.
--wide sweeps more tile shapes (BLOCK_N 32..256, 3-5 stages); --binaries prints the registers, spills and shared
memory of the compiled binaries at the end.
"""
from __future__ import annotations

import argparse
import itertools

import torch

from fractal.kernels.cuda_graphs import calls_us
from fractal.kernels.moe_fused_gemm import fused_moe_mlp, launch_configs

MODELS = {"dsv2lite": (64, 2048, 1408, 6), "qwen3moe": (128, 2048, 768, 8)}  # E, H, I, top-k
CONFIGS = [(bn, bk, w, s) for bn, bk in itertools.product((64, 128), (64, 128)) for w, s in ((4, 3), (4, 4), (8, 3), (8, 4))]
WIDE_CONFIGS = [(bn, bk, w, s) for bn, bk in itertools.product((32, 64, 128, 256), (64, 128))
                for w, s in ((4, 3), (4, 4), (8, 3), (8, 4), (8, 5)) if bn * bk <= 128 * 128]


def binaries() -> None:
    """Registers per thread, spills and shared memory of every compiled moe_fused_gemm GEMM binary."""
    from fractal.kernels import moe_fused_gemm as m
    from fractal.kernels._triton_support import compiled_binaries
    for fn in (m._gate_up_silu_kernel, m._down_kernel):
        for key, kernel in compiled_binaries(fn):
            md = kernel.metadata
            print(f"  {fn.__name__:22s} warps {md.num_warps} stages {md.num_stages} regs {kernel.n_regs:3d} "
                  f"spills {kernel.n_spills:3d} smem {md.shared // 1024:3d} KiB {str(key)[:80]}")


def sweep(model: str, T: int, wide: bool = False, defaults_only: bool = False) -> None:
    E, H, I, k = MODELS[model]
    dev, bf = "cuda", torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    layers = [((torch.randn(E, 2 * I, H, device=dev, generator=gen) * 0.02).to(bf),
               (torch.randn(E, H, I, device=dev, generator=gen) * 0.02).to(bf)) for _ in range(4)]
    x = torch.randn(T, H, device=dev, generator=gen).to(bf)
    ids = torch.stack([torch.randperm(E, device=dev, generator=gen)[:k] for _ in range(T)]).to(torch.int32)
    nbytes = 3 * E * I * H * 2
    bm, gu0, dn0, gm = launch_configs(T * k, E)
    ref = fused_moe_mlp(x, *layers[0], ids).float()

    def run(gu, dn):
        fns = [lambda w13=w13, w2=w2: fused_moe_mlp(x, w13, w2, ids, bm, gu, dn, gm) for w13, w2 in layers]
        out = fns[0]().float()
        ok = torch.allclose(out, ref, atol=2e-2, rtol=2e-2)
        return calls_us(fns, repeats=3), ok

    base, _ = run(gu0, dn0)
    print(f"\n== {model} T={T}: {T * k} pairs, block_m {bm}, default gate/up {gu0} down {dn0}: {base:.1f} us "
          f"({nbytes / base / 1e6:.2f} TB/s)", flush=True)
    for label, vary in () if defaults_only else (("gate/up", lambda c: (c, dn0)), ("down", lambda c: (gu0, c))):
        res = []
        for cfg in (WIDE_CONFIGS if wide else CONFIGS):
            try:
                us, ok = run(*vary(cfg))
                res.append((us, cfg, ok))
            except Exception as exc:  # e.g. out of shared memory
                print(f"  {label} {cfg}: {type(exc).__name__}")
        for us, cfg, ok in sorted(res)[:6]:
            print(f"  {label:8s}{str(cfg):18s}{us:8.1f} us {nbytes / us / 1e6:5.2f} TB/s "
                  f"{'ok' if ok else 'MISMATCH'}{' (default)' if cfg == (gu0 if label == 'gate/up' else dn0) else ''}",
                  flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="dsv2lite:512,dsv2lite:256,qwen3moe:256")
    p.add_argument("--wide", action="store_true", help="sweep more tile shapes")
    p.add_argument("--binaries", action="store_true", help="print registers / spills / smem of the binaries")
    p.add_argument("--defaults-only", action="store_true", help="time only the default configs")
    a = p.parse_args(argv)
    for spec in a.shapes.split(","):
        model, T = spec.split(":")
        sweep(model, int(T), a.wide, a.defaults_only)
    if a.binaries:
        binaries()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
