"""`fractal report`: the four-resource table of a model on a GPU under a parallel plan (or --seed-tables)."""
from __future__ import annotations

import argparse
import json

from fractal.errors import FractalError
from fractal.perf.ops import ModelOptions
from fractal.perf.report import Scenario, render_text, to_json
from fractal.perf.step import OVERLAP_RULES, Efficiency, Workload, phase_result
from fractal.spec.gpu import gpu_names, load_gpu
from fractal.spec.model import load_model_spec, shipped_models
from fractal.spec.parallel import parse_plan
from fractal.spec.precision import parse_precision


def parse_eff(text: str | None) -> Efficiency:
    """`compute=0.6,hbm=0.8,comm=0.7` -> Efficiency (unnamed ones stay 1.0)."""
    if not text:
        return Efficiency()
    vals = {}
    for item in text.split(","):
        k, _, v = item.partition("=")
        k = k.strip()
        if k not in ("compute", "hbm", "comm"):
            raise FractalError(f"--eff part {k!r} unknown; write compute=0.6,hbm=0.8,comm=0.7")
        try:
            vals[k] = float(v)
        except ValueError:
            raise FractalError(f"--eff {k}={v!r} is not a number") from None
    return Efficiency(**vals)


def add_common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="deepseek-v3", help=f"shipped name ({', '.join(shipped_models())}) or config.json path/dir")
    ap.add_argument("--gpu", default="h20", help=f"shipped name ({', '.join(gpu_names())}) or GPU JSON file")
    ap.add_argument("--isl", type=int, default=3260, help="input (prompt) length, tokens")
    ap.add_argument("--osl", type=int, default=1100, help="output length, tokens")
    ap.add_argument("--weights", default=None, help="weight dtypes: fp8 | attn=fp8,moe=w4a8 | int4g128 ... (default: the checkpoint's)")
    ap.add_argument("--act", default=None, help="matmul input dtype bf16|fp8|int8 (default fp8 if all weights fp8/w4a8 else bf16)")
    ap.add_argument("--kv-dtype", default="bf16", help="KV cache dtype bf16|fp8")
    ap.add_argument("--comm-dtype", default="bf16", help="TP/EP payload dtype bf16|fp8")
    ap.add_argument("--prefix-hit", type=float, default=0.0, help="fraction of the prompt already in the prefix cache")
    ap.add_argument("--imbalance", type=float, default=1.0, help="hottest EP rank's routed load / mean (1 = balanced)")
    ap.add_argument("--mla", choices=("auto", "mha", "absorb"), default="auto", help="MLA computation (auto: absorb in decode)")
    ap.add_argument("--overlap", choices=OVERLAP_RULES, default="op", help="step-time overlap rule (see docs/perf-model.md)")
    ap.add_argument("--eff", default=None, help="efficiency per resource, e.g. compute=0.6,hbm=0.8,comm=0.7 (default 1.0)")
    ap.add_argument("--reserve-gb", type=float, default=None, help="runtime reserve per GPU in GB (default min(10 GiB, 10%% HBM))")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fractal report", description=__doc__)
    add_common(ap)
    ap.add_argument("--phase", choices=("prefill", "decode"), default="decode")
    ap.add_argument("--plan", default="tp1", help="dp8-ep8 | tp8-ep8 | tp4-pp2 | prefill=tp8-ep8,decode=dp8-ep8,pd=1:1")
    ap.add_argument("--batch", type=int, default=1, help="sequences per attention DP rank")
    ap.add_argument("--kv-len", type=int, default=None, help="decode KV length (default isl + osl/2)")
    ap.add_argument("--by-op", action="store_true", help="add the per-operator breakdown")
    ap.add_argument("--json", action="store_true", help="JSON output (SI units)")
    ap.add_argument("--seed-tables", action="store_true", help="recompute the seed article's tables 2-9")
    a = ap.parse_args(argv)
    if a.seed_tables:
        from fractal.perf.seed_tables import render_seed_tables, seed_rows

        print(json.dumps([r.as_dict() for r in seed_rows()], indent=2) if a.json else render_seed_tables())
        return 0
    model, gpu = load_model_spec(a.model), load_gpu(a.gpu)
    prec = parse_precision(a.weights or model.native_dtype, a.act, a.kv_dtype, a.comm_dtype)
    dep = parse_plan(a.plan)
    dep.validate(model)
    wl = Workload(a.batch, a.isl, a.osl, a.kv_len, a.prefix_hit, a.imbalance)
    res = phase_result(model, gpu, prec, dep.phase(a.phase), a.phase, wl,
                       opts=ModelOptions(mla_mode=a.mla, imbalance=a.imbalance), eff=parse_eff(a.eff), overlap=a.overlap,
                       reserve_bytes=None if a.reserve_gb is None else a.reserve_gb * 1e9,
                       disaggregated=dep.disaggregated)
    sc = Scenario(model, gpu, prec, dep, wl, a.overlap)
    print(json.dumps(to_json(sc, res, a.by_op), indent=2) if a.json else render_text(sc, res, a.by_op))
    return 0
