"""`fractal bench offline`: throughput of the offline API (`fractal.LLM.generate`) beside the
four-resource floor.

The workload: --num-prompts prompts of --input-len random token ids (seeded), each generating exactly
--output-len tokens (greedy, ignore_eos). Measured: engine start-up (construction: load + KV pool), and
the wall time of the whole `generate` (prefill included) after a short warm-up generate.

The floor (fractal.perf.floor) of the same work on the GPU given by --gpu, assuming the engine's batching:
the prompts run in waves of min(num_prompts, max_num_seqs); each wave costs one prefill step of all its
prompts plus output_len - 1 decode steps whose context grows by one token per step. The floor is
a lower bound for that schedule: each step at the best of compute and HBM (efficiencies 1.0).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass

from fractal.errors import FractalError
from fractal.models.paths import resolve_model_dir  # noqa: F401  (re-exported: bench callers use it)


@dataclass(frozen=True)
class FloorEstimate:
    floor_s: float
    flops: float
    hbm_bytes: float
    peak_flops: float
    hbm_bw: float
    bound: str  # the resource that binds most of the floor's time

    def mfu(self, measured_s: float) -> float:
        return self.flops / (measured_s * self.peak_flops)

    def mbu(self, measured_s: float) -> float:
        return self.hbm_bytes / (measured_s * self.hbm_bw)


def generate_floor(model: str, gpu: str, *, num_prompts: int, input_len: int, output_len: int, batch: int,
                   dtype: str = "bf16") -> FloorEstimate:
    """Floor of generating output_len tokens for num_prompts prompts of input_len, in waves of `batch`."""
    from fractal.perf.floor import load_gpu, load_model_spec, step_floor

    spec, gpu_spec = load_model_spec(model), load_gpu(gpu)
    total = flops = hbm = 0.0
    by_bound: dict[str, float] = {}
    peak = bw = 0.0
    waves = [min(batch, num_prompts - i) for i in range(0, num_prompts, batch)]
    cache: dict[int, list] = {}
    for size in waves:
        if size not in cache:
            steps = [step_floor(spec, gpu_spec, num_seqs=size, new_tokens_per_seq=input_len, context_len=0,
                                weight_dtype=dtype, kv_dtype=dtype)]
            steps += [step_floor(spec, gpu_spec, num_seqs=size, new_tokens_per_seq=1, context_len=input_len + i,
                                 weight_dtype=dtype, kv_dtype=dtype) for i in range(output_len - 1)]
            cache[size] = steps
        for f in cache[size]:
            total += f.floor_s
            flops += f.flops
            hbm += f.hbm_bytes
            by_bound[f.bound] = by_bound.get(f.bound, 0.0) + f.floor_s
            peak, bw = f.peak_flops, f.hbm_bw
    bound = max(by_bound, key=by_bound.get) if by_bound else "n/a"
    return FloorEstimate(total, flops, hbm, peak, bw, bound)


def run_offline(args) -> dict:
    """Run the offline benchmark from parsed CLI args; returns the result dict (also printed)."""
    model_dir, made_up = resolve_model_dir(args.model)
    try:
        return _run_offline(args, model_dir, made_up)
    finally:
        if made_up:
            shutil.rmtree(model_dir, ignore_errors=True)


def _run_offline(args, model_dir: str, made_up: bool) -> dict:
    import torch

    from fractal.engine.llm import LLM
    from fractal.engine.step_floor import floor_dtype
    from fractal.sampling_params import SamplingParams
    from fractal.serve.engine_args import engine_kwargs

    kwargs = engine_kwargs(args)
    if made_up and kwargs["load_format"] == "auto":
        kwargs["load_format"] = "dummy"  # a bare config has no weights
    t0 = time.perf_counter()
    llm = LLM(model_dir, **kwargs)
    startup_s = time.perf_counter() - t0
    vocab = llm.engine.vocab_size
    rng = random.Random(args.seed)
    prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.input_len)]}
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    if args.warmup:
        llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    cuda = torch.cuda.is_available() and str(llm.engine.config.device) != "cpu"
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    outputs = llm.generate(prompts, params)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t1
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    if generated != args.num_prompts * args.output_len:
        raise FractalError(f"generated {generated} tokens, expected {args.num_prompts * args.output_len}")

    gpu = args.gpu or ("h100" if cuda else None)
    floor = None
    if gpu is not None:
        dtype = floor_dtype(llm.engine.runner.dtype)  # the dtype the engine resolved (dtype="auto" included)
        floor = generate_floor(model_dir, gpu, num_prompts=args.num_prompts, input_len=args.input_len,
                               output_len=args.output_len, batch=min(args.num_prompts, args.max_num_seqs),
                               dtype=dtype)
    result = {
        "model": args.model, "device": "cuda" if cuda else "cpu", "num_prompts": args.num_prompts,
        "input_len": args.input_len, "output_len": args.output_len, "startup_s": startup_s,
        "elapsed_s": elapsed, "output_tokens": generated,
        "output_throughput": generated / elapsed,
        "total_token_throughput": (generated + args.num_prompts * args.input_len) / elapsed,
        "floor_gpu": gpu, "floor_s": floor.floor_s if floor else None,
        "floor_bound": floor.bound if floor else None,
        "floor_fraction": floor.floor_s / elapsed if floor else None,
        "mfu": floor.mfu(elapsed) if floor else None, "mbu": floor.mbu(elapsed) if floor else None,
    }
    return result


def _time(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_offline(r: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    floor = "n/a" if r["floor_s"] is None else f"{_time(r['floor_s'])} ({r['floor_bound']})"
    gpu = r["floor_gpu"] or "n/a (give --gpu)"
    head = f"{'workload':<26}{'time':>10}{'floor':>22}{'of floor':>10}{'MBU':>8}{'MFU':>8}{'out tok/s':>12}{'tok/s':>12}"
    row = (f"{r['num_prompts']} x {r['input_len']} -> {r['output_len']:<10}"[:26].ljust(26)
           + f"{_time(r['elapsed_s']):>10}{floor:>22}{pct(r['floor_fraction']):>10}{pct(r['mbu']):>8}{pct(r['mfu']):>8}"
           + f"{r['output_throughput']:>12.1f}{r['total_token_throughput']:>12.1f}")
    return "\n".join([f"model {r['model']} on {r['device']}; floor for GPU {gpu}",
                      f"engine start-up: {r['startup_s']:.2f}s", head, row])


def write_json(path: str, result: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
