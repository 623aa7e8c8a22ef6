"""Where a generate's time goes: per-step timeline by kind, and per-kernel GPU time of decode steps.

    python3 tools/diag_steps.py --model deepseek-v2-lite [--gen 64,256] [--batches 64,256] [--context 1024]

For each --gen n: the generate of the issue-5 table (input 512, output 256), its steps grouped into
prefill-carrying steps and decode-only steps (by batch bucket), with wall time and the four-resource floor.
For each --batches b: one decode step at `context` profiled on eager launches (every kernel visible), kernels
grouped by name with GPU microseconds per step, beside the CUDA-graph replay time of the same step.
Random weights at the real shapes (load_format="dummy"), bf16, greedy; the suite's engine settings.
With PDL on (Hopper) a kernel's profiled time includes its wait for the kernel before it; set FRACTAL_PDL=0 to
attribute GPU time to kernels (the graph replay time is right either way).
Caveat: with async scheduling a step's time is measured from the previous step's completion as the host sees
it, so around a change of step kind (a long eager mixed step, then decodes) time can land on the neighbour;
the sums over a generate are exact.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict


def timeline(llm, floors, n: int, vocab: int, rng, verbose: bool = False) -> None:
    from fractal.bench.offline_suite import INPUT_LEN, OUTPUT_LEN, _prompts, _sync
    from fractal import SamplingParams

    from fractal.kernels._triton_support import compiled_variant_keys, compiled_variants_by_kernel

    engine = llm.engine
    engine.step_log = []
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    jit0 = compiled_variants_by_kernel()
    keys0 = compiled_variant_keys()
    graphs = engine.runner.graphs
    replays0, captured0 = (graphs.num_replays, len(graphs.graphs)) if graphs is not None else (0, 0)
    import torch

    def alloc_stats():
        if not torch.cuda.is_available():
            return {}
        st = torch.cuda.memory_stats()
        keys = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams")
        return {k: st.get(k, 0) for k in keys}

    st0 = engine.get_stats()
    _sync()
    mem0 = alloc_stats()
    t0 = time.perf_counter()
    llm.generate(_prompts(rng, n, INPUT_LEN, vocab), params)
    _sync()
    total = time.perf_counter() - t0
    mem1 = alloc_stats()
    print(f"\n   caching allocator during gen-n{n}: " + ", ".join(f"{k} +{mem1[k] - mem0[k]}" for k in mem1))
    st1 = engine.get_stats()
    print(f"   preemptions +{st1.num_preempted_total - st0.num_preempted_total} (swapped to host "
          f"+{st1.num_swapped_out_total - st0.num_swapped_out_total}, balancing swaps "
          f"+{st1.num_balance_swaps_total - st0.num_balance_swaps_total})")
    log, engine.step_log = engine.step_log, None
    groups = defaultdict(lambda: [0, 0.0, 0.0, 0])
    for shape, elapsed in log:
        if shape.num_prefill_tokens:
            key = f"prefill+{'dec' if shape.num_decode_seqs else 'none'}"
        else:
            b = shape.num_decode_seqs
            bucket = next(x for x in (1, 8, 16, 32, 64, 128, 192, 256, 384, 512, 1 << 30) if b <= x)
            key = f"decode b<={bucket}"
        f = floors.step(list(shape.new_tokens), list(shape.context_lens))
        g = groups[key]
        g[0] += 1
        g[1] += elapsed
        g[2] += f.floor_s
        g[3] += shape.num_batched_tokens
    stepsum = sum(e for _, e in log)
    decode_steps = sum(1 for shape, _ in log if not shape.num_prefill_tokens)
    if graphs is not None:
        print(f"\n   decode-only steps {decode_steps}, graph replays {graphs.num_replays - replays0}, graphs captured "
              f"during the run {len(graphs.graphs) - captured0}")
    jit1 = compiled_variants_by_kernel()
    new_jit = {k: v - jit0.get(k, 0) for k, v in jit1.items() if v != jit0.get(k, 0)}
    print(f"\n== gen-n{n}: {total:.2f} s wall, {len(log)} steps, Triton compiles during it {new_jit}, "
          f"steps sum {stepsum:.2f} s, "
          f"outside steps {total - stepsum:.2f} s, {n * OUTPUT_LEN / total:,.0f} out tok/s")
    print(f"{'kind':<18}{'steps':>6}{'time s':>9}{'mean ms':>9}{'floor ms':>10}{'x floor':>9}{'tokens':>9}")
    for key in sorted(groups):
        c, t, fl, tok = groups[key]
        print(f"{key:<18}{c:>6}{t:>9.3f}{1e3 * t / c:>9.2f}{1e3 * fl / c:>10.2f}{t / fl:>9.2f}{tok:>9}")
    for label, key in sorted(compiled_variant_keys() - keys0):
        print(f"   compiled in the run: {label} {key[:400]}")
    if verbose:
        by_b = defaultdict(list)
        for shape, elapsed in log:
            if not shape.num_prefill_tokens:
                by_b[(shape.num_decode_seqs, shape.max_context_len // 256 * 256)].append(elapsed)
        print("decode-only steps by (batch, max context // 256 * 256): count, mean ms (top 10 by total time)")
        for (b, ctx), ts in sorted(by_b.items(), key=lambda kv: -sum(kv[1]))[:10]:
            print(f"  b={b:4d} ctx>={ctx:5d} {len(ts):5d} {1e3 * sum(ts) / len(ts):8.2f}")
        print("prefill-carrying steps: index, prefill tokens, chunks, decodes, max context, ms")
        for i, (shape, elapsed) in enumerate(log):
            if shape.num_prefill_tokens:
                print(f"  {i:4d} {shape.num_prefill_tokens:6d} {shape.num_seqs - shape.num_decode_seqs:4d} "
                      f"{shape.num_decode_seqs:4d} {shape.max_context_len:6d} {elapsed * 1e3:8.1f}")


def kernels(llm, batch: int, context: int, top: int, sequence: int = 0) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fractal.bench.offline_suite import _decode_step_time

    runner = llm.engine.runner
    graph_s, mode = _decode_step_time(llm, batch, context, steps=20)
    graphs, runner.graphs = runner.graphs, None
    try:
        eager_s, _ = _decode_step_time(llm, batch, context, steps=5)
        steps = 3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _decode_step_time(llm, batch, context, steps=steps)
    finally:
        runner.graphs = graphs
    per = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        dt = getattr(e, "device_time", None)
        if dt is None:
            dt = e.cuda_time
        per[e.name][0] += 1
        per[e.name][1] += dt
    runs = steps + 3  # _decode_step_time runs 3 warm-up steps before the timed ones
    total_us = sum(v[1] for v in per.values()) / runs
    count = sum(v[0] for v in per.values()) / runs
    print(f"\n== decode b={batch} ctx={context}: graph replay {graph_s * 1e3:.2f} ms ({mode}), eager {eager_s * 1e3:.2f} ms, "
          f"GPU busy (sum of kernels) {total_us / 1e3:.2f} ms in {count:.0f} kernels/copies per step")
    print(f"{'us/step':>9}{'calls':>7}{'us/call':>9}  kernel")
    for name, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{t / runs:>9.1f}{c / runs:>7.0f}{t / c:>9.1f}  {name[:110]}")
    if sequence:  # launch order of the last profiled step: which small kernels sit next to each other
        cuda = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
        last = cuda[-round(count):]
        print(f"first {sequence} kernels of the last step, in launch order (us, gap to the previous end us):")
        prev_end = None
        for e in last[:sequence]:
            dt = getattr(e, "device_time", None) or e.cuda_time
            gap = "" if prev_end is None else f"{e.time_range.start - prev_end:6.1f}"
            print(f"{dt:8.1f} {gap:>6}  {e.name[:100]}")
            prev_end = e.time_range.end


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="append", required=True)
    p.add_argument("--gen", default="64,256")
    p.add_argument("--batches", default="1,64,256")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--top", type=int, default=28)
    p.add_argument("--sequence", type=int, default=0, help="print the first N kernels of a profiled decode step in order")
    p.add_argument("--mixed", default="", help="n_prefill,prefill_len,n_decode,decode_ctx: profile one mixed step")
    p.add_argument("--set", action="append", default=[],
                   help="module.ATTR=VALUE (a Python literal) before the engine starts, e.g. "
                        "fractal.kernels.moe_experts.TRITON_MAX_PAIRS=2048 or fractal.kernels.moe_fused_gemm.GROUP_M=0")
    p.add_argument("--verbose", action="store_true", help="list every prefill-carrying step of each --gen")
    p.add_argument("--repeat-gen", action="store_true", help="run each --gen twice (JIT of new shapes vs warm)")
    p.add_argument("--engine", default="", help="extra engine kwargs, k=v,k=v (ints parsed)")
    args = p.parse_args(argv)
    from fractal import LLM
    from fractal.bench.offline import resolve_model_dir
    from fractal.bench.offline_suite import INPUT_LEN, _Floors, _engine_kwargs, _prompts, _timed_generate

    extra = {}
    for kv in filter(None, args.engine.split(",")):
        k, v = kv.split("=")
        try:
            extra[k] = int(v)
        except ValueError:
            try:
                extra[k] = float(v)
            except ValueError:
                extra[k] = v == "true" if v in ("true", "false") else v
    import ast
    import importlib

    for item in args.set:
        target, value = item.split("=", 1)
        module, attr = target.rsplit(".", 1)
        setattr(importlib.import_module(module), attr, ast.literal_eval(value))
        print(f"set {target} = {value}")
    for model in args.model:
        model_dir, _ = resolve_model_dir(model)
        llm = LLM(model=model_dir, **_engine_kwargs(extra))
        floors = _Floors(model_dir, "h100")
        vocab = llm.engine.runner.model.config.vocab_size
        rng = random.Random(0)
        _timed_generate(llm, _prompts(rng, 32, INPUT_LEN, vocab), 4)
        print(f"\n##### {model} {extra or ''}  (KV blocks {llm.engine.runner.num_blocks})", flush=True)
        for n in filter(None, args.gen.split(",")):
            for _ in range(2 if args.repeat_gen else 1):
                timeline(llm, floors, int(n), vocab, rng, verbose=args.verbose)
                sys.stdout.flush()
        if args.mixed:
            for spec in args.mixed.split(";"):
                mixed(llm, *[int(x) for x in spec.split(",")], top=args.top)
                sys.stdout.flush()
        for b in filter(None, args.batches.split(",")):
            try:
                kernels(llm, int(b), args.context, args.top, args.sequence)
            except Exception as exc:
                print(f"decode b={b}: {type(exc).__name__}: {exc}")
            sys.stdout.flush()
        del llm
        import gc, torch
        gc.collect(); torch.cuda.empty_cache()
    return 0



def mixed(llm, n_prefill: int, prefill_len: int, n_decode: int, decode_ctx: int, top: int, steps: int = 5) -> None:
    """One mixed step (n_decode decodes first, then n_prefill fresh prompts): wall per launched step, GPU busy,
    syncs inside the launch (torch.cuda sync debug mode), and its kernels."""
    import warnings

    import torch
    from torch.profiler import ProfilerActivity, profile

    from fractal import SamplingParams
    from fractal.bench.offline_suite import _sync
    from fractal.engine.synthetic_batch import synthetic_step

    runner = llm.engine.runner
    params = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
    rows = [(decode_ctx, [11 + i % 50]) for i in range(n_decode)]
    rows += [(0, [(13 + 7 * j + k) % 1000 + 10 for k in range(prefill_len)]) for j in range(n_prefill)]
    out, seqs, nxt = synthetic_step(rows, runner.block_size, params, first_seq_id=1 << 41)
    if nxt > runner.num_blocks:
        print(f"mixed: needs {nxt} blocks, pool has {runner.num_blocks}")
        return
    eos = frozenset()
    for _ in range(2):
        runner.execute(out, seqs, eos)
    _sync()
    torch.cuda.set_sync_debug_mode(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = runner.launch(out, seqs, eos)
    torch.cuda.set_sync_debug_mode(0)
    h.result()
    syncs = sorted({str(w.message)[:120] for w in caught})
    _sync()
    t0 = time.perf_counter()
    t_launch = 0.0
    for _ in range(steps):
        tl = time.perf_counter()
        h = runner.launch(out, seqs, eos)
        t_launch += time.perf_counter() - tl
    h.result()
    _sync()
    wall = (time.perf_counter() - t0) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.execute(out, seqs, eos)
        _sync()
    per = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        dt = getattr(e, "device_time", None)
        per[e.name][0] += 1
        per[e.name][1] += e.cuda_time if dt is None else dt
    busy = sum(v[1] for v in per.values())
    print(f"\n== mixed: {n_decode} decodes at ctx {decode_ctx} + {n_prefill} x {prefill_len} prefill: "
          f"{wall * 1e3:.2f} ms per back-to-back step (host launch {t_launch / steps * 1e3:.1f} ms), GPU busy "
          f"{busy / 1e3:.2f} ms in {sum(v[0] for v in per.values())} kernels; syncs in launch: {len(caught)} "
          f"{syncs[:3]}")
    print(f"{'us/step':>9}{'calls':>7}{'us/call':>9}  kernel")
    for name, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{t:>9.1f}{c:>7.0f}{t / c:>9.1f}  {name[:110]}")
    import cProfile
    import io
    import pstats

    prof_host = cProfile.Profile()
    prof_host.enable()
    for _ in range(3):
        runner.launch(out, seqs, eos)
    prof_host.disable()
    _sync()
    buf = io.StringIO()
    pstats.Stats(prof_host, stream=buf).sort_stats("tottime").print_stats(18)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    print("host profile of 3 launches (tottime):")
    print("\n".join(lines[2:26]))


if __name__ == "__main__":
    sys.exit(main())
