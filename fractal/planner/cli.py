"""`fractal plan`: search aggregated and disaggregated layouts on N GPUs under TTFT/TPOT targets."""
from __future__ import annotations

import argparse
import json
import re

from fractal.errors import FractalError
from fractal.perf.cli import add_common, parse_eff
from fractal.planner.search import PlanQuery, search
from fractal.spec.gpu import load_gpu
from fractal.spec.model import load_model_spec
from fractal.spec.precision import parse_precision


def parse_duration(text: str) -> float:
    """`2s`, `50ms`, `800us` or a bare number of seconds -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|ms|us)?\s*", text)
    if not m:
        raise FractalError(f"duration {text!r} is not valid; write 2s, 50ms or 800us")
    return float(m.group(1)) * {"s": 1.0, None: 1.0, "ms": 1e-3, "us": 1e-6}[m.group(2)]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fractal plan", description=__doc__)
    add_common(ap)
    ap.add_argument("--gpus", type=int, required=True, help="GPUs available")
    ap.add_argument("--ttft", default="2s", help="TTFT target, e.g. 2s")
    ap.add_argument("--tpot", default="50ms", help="TPOT target, e.g. 50ms")
    ap.add_argument("--mode", choices=("both", "aggregated", "disaggregated"), default="both")
    ap.add_argument("--top", type=int, default=5, help="layouts to print")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.gpus < 1:
        raise FractalError(f"--gpus {a.gpus} must be >= 1")
    model, gpu = load_model_spec(a.model), load_gpu(a.gpu)
    prec = parse_precision(a.weights or model.native_dtype, a.act, a.kv_dtype, a.comm_dtype)
    modes = ("aggregated", "disaggregated") if a.mode == "both" else (a.mode,)
    q = PlanQuery(model, gpu, prec, a.gpus, a.isl, a.osl, parse_duration(a.ttft), parse_duration(a.tpot), a.prefix_hit,
                  a.imbalance, parse_eff(a.eff), a.overlap, None if a.reserve_gb is None else a.reserve_gb * 1e9, modes)
    res = search(q, a.top)
    if a.json:
        print(json.dumps({"searched": res.searched, "feasible": res.feasible, "seconds": res.seconds, "best": [
            {"mode": c.mode, "plan": c.plan_string, "gpus_used": c.gpus_used, "decode_batch_per_dp_rank": c.decode_batch,
             "prefill_chunk_tokens": c.prefill_chunk, "ttft_s": c.ttft_s, "tpot_s": c.tpot_s,
             "tokens_per_s_per_gpu": c.tokens_per_s_per_gpu, "bound": c.bound} for c in res.best]}, indent=2))
        return 0
    print(f"{model.name} on {a.gpus} x {gpu.name} | isl {a.isl} osl {a.osl} | TTFT <= {a.ttft}, TPOT <= {a.tpot} | "
          f"weights {prec.moe if prec.moe == prec.attn else 'mixed'}, act {prec.act}, kv {prec.kv}")
    print(f"searched {res.searched:,} candidates ({res.unique_steps:,} distinct step costs) in {res.seconds:.2f} s; "
          f"{res.feasible:,} fit and meet both targets")
    for n in res.notes:
        print(n)
    if res.best:
        print(f"\n  {'#':<2} {'mode':<6} {'plan':<52} {'GPUs':>4} {'batch':>5} {'chunk':>6} {'TTFT':>8} {'TPOT':>8} "
              f"{'tok/s/GPU':>9}  binds")
    for i, c in enumerate(res.best, 1):
        print(f"  {i:<2} {c.mode[:6]:<6} {c.plan_string:<52} {c.gpus_used:>4} {c.decode_batch:>5} {c.prefill_chunk:>6} "
              f"{c.ttft_s * 1e3:>6.0f}ms {c.tpot_s * 1e3:>6.1f}ms {c.tokens_per_s_per_gpu:>9,.0f}  {c.bound}")
    return 0
