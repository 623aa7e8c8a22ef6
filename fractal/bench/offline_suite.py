"""The issue-5 offline table: fixed workloads on one GPU, each beside its four-resource floor.

    rows = run_suite("deepseek-v2-lite", gpu="h100")      # shipped config name or a model directory
    print(format_table(rows))
    python3 -m fractal.bench.offline_suite --model llama-3.1-8b [--rows gen-n1,decode-b64-1k] [--json out.json]

Weights are random at the real shapes (load_format="dummy"), bf16, greedy, ignore_eos, random prompt ids.
Engine settings: the peer's batch limits (16384 tokens and 1024 sequences per step, vLLM's offline defaults on an
H100), gpu_memory_utilization 0.9, no prefix caching, CUDA graphs and overlap on.
Rows (ROWS):
  startup            engine construction: dummy weights on the GPU, KV pool, CUDA-graph capture
  gen-n{1,64,256,512}  n requests, input 512 / output 256: the whole generate (prefill included); output tok/s
  prefill-16x512     16 requests of 512 tokens, output 1: the whole generate; input tok/s
  prefill-1x8k       one request of 8192 tokens, output 1; input tok/s
  decode-b{1,8,64,256}-{1k,4k}  one decode step of b sequences with 1024 / 4096 cached tokens each (random KV),
                     the mean of back-to-back launched steps (runner level: CUDA graph + sampling, no scheduler);
                     sequences/s. A row whose KV does not fit the pool says so.
  *-plain            the same rows on the engine's plain path (torch attention/MoE, no graphs) for before/after.
Each row: measured seconds, the floor (fractal.perf.floor.step_floor; for a generate, the sum over the
steps the engine actually ran), measured/floor, the binding resource, MBU and MFU (the floor's bytes and
FLOPs over measured time and the GPU's peak), tokens/s, and the vLLM 0.24 figure of issue 5 where there is one.
With several models each runs in a fresh process (`--same-process` keeps one): a model run after another in one
process finds less free GPU memory, so a smaller KV pool. A note "jit +N" says N Triton binaries were compiled
during the row (its timed part or the row's own untimed warm-up; decode rows warm up before timing, generate
rows do not).
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time

from fractal.errors import FractalError

INPUT_LEN, OUTPUT_LEN = 512, 256
GEN_SIZES = (1, 64, 256, 512)
DECODE_BATCHES = (1, 8, 64, 256)
DECODE_CONTEXTS = {"1k": 1024, "4k": 4096}
ROWS = (
    ["startup"] + [f"gen-n{n}" for n in GEN_SIZES] + ["prefill-16x512", "prefill-1x8k"]
    + [f"decode-b{b}-{c}" for c in DECODE_CONTEXTS for b in DECODE_BATCHES]
)
PLAIN_ROWS = ("decode-b1-1k-plain", "decode-b64-1k-plain", "prefill-16x512-plain")
DEFAULT_ROWS = tuple(ROWS)

# issue 5, vLLM 0.24.0 on one H100 (tokens/s; startup in seconds)
PEER = {
    "deepseek-v2-lite": {"gen-n1": 264, "gen-n64": 5821, "gen-n256": 17003, "gen-n512": 16648,
                         "prefill-16x512": 61949, "startup": 116},
    "llama-3.1-8b": {"gen-n1": 155, "gen-n64": 5516, "gen-n256": 9090, "gen-n512": 9145,
                     "prefill-16x512": 42068, "startup": 84},
    "qwen3-30b-a3b": {"gen-n1": 211, "gen-n64": 2414, "gen-n256": 4813, "gen-n512": 4840,
                      "prefill-16x512": 41066, "startup": 110},
}


# The peer's batch limits: vLLM's offline `LLM` class on a GPU of >= 70 GiB (H100/H200) defaults to 16384 tokens and
# 1024 sequences per step (vllm/engine/arg_utils.py, get_batch_defaults), so the table compares like with like.
SUITE_MAX_NUM_BATCHED_TOKENS = 16384
SUITE_MAX_NUM_SEQS = 1024


def _engine_kwargs(overrides: dict | None) -> dict:
    kwargs = dict(load_format="dummy", dtype="bfloat16", max_model_len=8192 + 64, max_num_seqs=SUITE_MAX_NUM_SEQS,
                  max_num_batched_tokens=SUITE_MAX_NUM_BATCHED_TOKENS, enable_prefix_caching=False,
                  gpu_memory_utilization=0.9)
    kwargs.update(overrides or {})
    return kwargs


class _Floors:
    """Sums fractal.perf.floor.step_floor over step shapes."""

    def __init__(self, model_dir: str, gpu: str) -> None:
        from fractal.perf.floor import load_gpu, load_model_spec

        self.spec = load_model_spec(model_dir)
        self.gpu = load_gpu(gpu)

    def step(self, new_tokens: list[int], context_lens: list[int]):
        from fractal.perf.floor import step_floor

        return step_floor(self.spec, self.gpu, num_seqs=len(new_tokens), new_tokens_per_seq=new_tokens,
                          context_len=context_lens)

    def total(self, shapes) -> dict:
        agg = dict(floor_s=0.0, flops=0.0, hbm_bytes=0.0, compute_s=0.0, hbm_s=0.0)
        for shape in shapes:
            f = self.step(list(shape.new_tokens), list(shape.context_lens))
            agg["floor_s"] += f.floor_s
            agg["flops"] += f.flops
            agg["hbm_bytes"] += f.hbm_bytes
            agg["compute_s"] += f.compute_time_s
            agg["hbm_s"] += f.hbm_time_s
        agg["bound"] = "compute" if agg["compute_s"] >= agg["hbm_s"] else "hbm"
        agg["peak_flops"] = self.gpu.peak_flops("bf16")
        agg["hbm_bw"] = self.gpu.hbm_bw
        return agg


def _row(name: str, seconds: float, floor: dict, tokens: float, unit: str, peer=None, note: str = "") -> dict:
    return dict(
        name=name, time_s=seconds, floor_s=floor["floor_s"], ratio=seconds / floor["floor_s"] if floor["floor_s"] else None,
        bound=floor["bound"], mbu=floor["hbm_bytes"] / (seconds * floor["hbm_bw"]),
        mfu=floor["flops"] / (seconds * floor["peak_flops"]), tokens_per_s=tokens / seconds, unit=unit,
        floor_tokens_per_s=tokens / floor["floor_s"] if floor["floor_s"] else None, peer=peer, note=note,
    )


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompts(rng: random.Random, n: int, length: int, vocab: int) -> list[dict]:
    return [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(length)]} for _ in range(n)]


def _timed_generate(llm, prompts, max_tokens: int):
    from fractal import SamplingParams

    engine = llm.engine
    engine.step_log = []
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    _sync()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    _sync()
    seconds = time.perf_counter() - t0
    shapes = [shape for shape, _ in engine.step_log]
    engine.step_log = None
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return seconds, shapes, produced


class _PlainPath:
    """Context manager: the model runs its plain path (torch backends, torch modules, no graphs) meanwhile."""

    def __init__(self, runner) -> None:
        self.runner = runner

    def __enter__(self):
        from fractal.layers.attention_backends import TorchAttentionBackend
        from fractal.layers.gpu_backends import FastGatedMLP, FastRMSNorm, FastRotaryEmbedding
        from fractal.layers.mlp import GatedMLP
        from fractal.layers.moe import TorchMoEBackend
        from fractal.layers.norm import RMSNorm
        from fractal.layers.rotary import RotaryEmbedding

        self.saved = []
        plain_cls = {FastRMSNorm: RMSNorm, FastGatedMLP: GatedMLP, FastRotaryEmbedding: RotaryEmbedding}
        attn, moe = TorchAttentionBackend(), TorchMoEBackend()
        for module in self.runner.model.modules():
            if type(module) in plain_cls:
                self.saved.append((module, "__class__", type(module)))
                module.__class__ = plain_cls[type(module)]
            if hasattr(module, "backend"):
                self.saved.append((module, "backend", module.backend))
                module.backend = moe if hasattr(module, "experts") else attn
        self.graphs, self.runner.graphs = self.runner.graphs, None
        return self

    def __exit__(self, *exc):
        for module, attr, value in reversed(self.saved):
            setattr(module, attr, value)
        self.runner.graphs = self.graphs
        return False


def _decode_step_time(llm, batch: int, context: int, steps: int = 20) -> tuple[float, str]:
    """Mean seconds of back-to-back launched decode steps of `batch` sequences with `context` cached tokens."""
    from fractal import SamplingParams
    from fractal.engine.synthetic_batch import synthetic_step

    runner = llm.engine.runner
    bs = runner.block_size
    need = -(-(context + 1) // bs)
    if batch * need > runner.num_blocks:
        raise FractalError(f"KV of {batch} x {context + 1} tokens needs {batch * need} blocks; the pool has "
                           f"{runner.num_blocks}")
    params = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
    # sequence i holds blocks i*need .. (i+1)*need - 1; seq ids far from the engine's own
    out, seqs, _ = synthetic_step([(context, [7 + i % 100]) for i in range(batch)], bs, params, first_seq_id=1 << 40)
    eos = frozenset()
    for _ in range(3):
        runner.execute(out, seqs, eos)  # warm-up (captures the graph of this shape)
    _sync()
    t0 = time.perf_counter()
    handle = None
    for _ in range(steps):
        handle = runner.launch(out, seqs, eos)
    handle.result()
    _sync()
    mode = "graph" if runner.graphs is not None and runner.graphs.key_for(batch, context + 1) in runner.graphs.graphs \
        else "eager"
    return (time.perf_counter() - t0) / steps, mode


def run_suite(model: str, *, gpu: str = "h100", rows=None, engine_kwargs: dict | None = None,
              profile_path: str | None = None, log=None) -> list[dict]:
    """Run the wanted rows (default: DEFAULT_ROWS) for `model`; one dict per row (see the module docstring)."""
    import torch

    from fractal import LLM
    from fractal.bench.offline import resolve_model_dir
    from fractal.kernels._triton_support import compiled_variants

    wanted = list(rows or DEFAULT_ROWS)
    unknown = [r for r in wanted if r not in ROWS and r not in PLAIN_ROWS]
    if unknown:
        raise FractalError(f"unknown suite row(s) {unknown}; valid: {', '.join([*ROWS, *PLAIN_ROWS])}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    model_dir, _ = resolve_model_dir(model)
    key = model.lower() if model.lower() in PEER else None
    peer = PEER.get(key, {})
    floors = _Floors(model_dir, gpu)
    results: list[dict] = []

    _sync()
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, **_engine_kwargs(engine_kwargs))
    _sync()
    startup = time.perf_counter() - t0
    runner = llm.engine.runner
    graphs = runner.graphs
    log(f"[{model}] start-up {startup:.1f} s (graph capture {graphs.capture_time_s if graphs else 0:.1f} s, "
        f"{runner.num_blocks} KV blocks, fast modules {runner.fast_modules})")
    results.append(dict(name="startup", time_s=startup, floor_s=None, ratio=None, bound=None, mbu=None, mfu=None,
                        tokens_per_s=None, unit="s", floor_tokens_per_s=None, peer=peer.get("startup"),
                        note=f"graphs {len(graphs.graphs) if graphs else 0}, capture "
                             f"{graphs.capture_time_s if graphs else 0:.1f}s, warm-up "
                             f"{llm.engine.warm_up_s:.1f}s"))
    vocab = runner.model.config.vocab_size
    rng = random.Random(0)

    # warm-up: Triton specialisations of the prefill, mixed and decode paths (not timed)
    t_w = time.perf_counter()
    _timed_generate(llm, _prompts(rng, 32, INPUT_LEN, vocab), 4)
    log(f"[{model}] warm-up {time.perf_counter() - t_w:.1f} s")

    def attempt(name, fn):
        if name not in wanted:
            return
        t_r = time.perf_counter()
        jit0 = compiled_variants()
        try:
            row = fn()
        except Exception as exc:  # one failing row must not hide the others
            row = dict(name=name, error=f"{type(exc).__name__}: {exc}"[:300])
        compiled = compiled_variants() - jit0
        if compiled and "error" not in row:  # Triton compiled new kernel variants inside this row's timing
            row["note"] = f"{row.get('note', '')}, jit +{compiled}".lstrip(", ")
        results.append(row)
        log(f"[{model}] {name}: {json.dumps(row, default=str)} ({time.perf_counter() - t_r:.1f} s)")

    for n in GEN_SIZES:
        def gen(n=n):
            seconds, shapes, produced = _timed_generate(llm, _prompts(rng, n, INPUT_LEN, vocab), OUTPUT_LEN)
            return _row(f"gen-n{n}", seconds, floors.total(shapes), produced, "out tok/s", peer.get(f"gen-n{n}"),
                        note=f"{len(shapes)} steps")
        attempt(f"gen-n{n}", gen)

    def prefill(name, n, length, plain=False):
        _timed_generate(llm, _prompts(rng, n, length, vocab), 1)  # warm-up of this shape
        if plain:
            with _PlainPath(runner):
                seconds, shapes, _ = _timed_generate(llm, _prompts(rng, n, length, vocab), 1)
        else:
            seconds, shapes, _ = _timed_generate(llm, _prompts(rng, n, length, vocab), 1)
        return _row(name, seconds, floors.total(shapes), n * length, "in tok/s", peer.get(name.removesuffix("-plain")),
                    note=f"{len(shapes)} steps")

    attempt("prefill-16x512", lambda: prefill("prefill-16x512", 16, 512))
    attempt("prefill-1x8k", lambda: prefill("prefill-1x8k", 1, 8192))

    kv_filled = False
    for cname, context in DECODE_CONTEXTS.items():
        for b in DECODE_BATCHES:
            def decode(b=b, context=context, cname=cname, plain=False):
                nonlocal kv_filled
                if not kv_filled:  # random KV, never zeros
                    for cache in runner.kv_caches:
                        cache.normal_()
                    kv_filled = True
                if plain:
                    with _PlainPath(runner):
                        seconds, mode = _decode_step_time(llm, b, context, steps=5)
                else:
                    seconds, mode = _decode_step_time(llm, b, context)
                floor = floors.total([_Shape([1] * b, [context] * b)])
                return _row(f"decode-b{b}-{cname}" + ("-plain" if plain else ""), seconds, floor, b, "seq/s",
                            note=mode if not plain else "plain eager")
            attempt(f"decode-b{b}-{cname}", decode)
            if f"decode-b{b}-{cname}-plain" in PLAIN_ROWS:
                attempt(f"decode-b{b}-{cname}-plain", lambda b=b, context=context, cname=cname:
                        decode(b, context, cname, plain=True))
    attempt("prefill-16x512-plain", lambda: prefill("prefill-16x512-plain", 16, 512, plain=True))

    if profile_path:
        try:
            _profile_decode(llm, profile_path)
        except Exception as exc:  # the table matters more than the profile
            log(f"[{model}] profile failed: {exc}")
    llm = runner = graphs = None  # drop the engine (closures above hold the same cells)
    gc.collect()  # the engine holds reference cycles; free its weights, KV pool and graph pool now
    torch.cuda.empty_cache()
    return results


class _Shape:
    def __init__(self, new_tokens, context_lens) -> None:
        self.new_tokens, self.context_lens = new_tokens, context_lens


def _profile_decode(llm, path: str, batches=(1, 64), context: int = 1024) -> None:
    """torch.profiler summaries of decode steps (eager launches, to see every kernel) written to `path`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    runner = llm.engine.runner
    graphs, runner.graphs = runner.graphs, None
    try:
        with open(path, "w", encoding="utf-8") as handle:
            for batch in batches:
                _decode_step_time(llm, batch, context, steps=2)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    _decode_step_time(llm, batch, context, steps=3)
                launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
                handle.write(f"\neager decode, batch {batch}, context {context}: 6 steps (3 warm-up + 3 timed); "
                             f"{launches / 6:.0f} GPU kernels + copies per step\n")
                handle.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
    finally:
        runner.graphs = graphs


def _fmt(x, spec: str, dash: str = "-") -> str:
    return dash if x is None else format(x, spec)


def format_table(rows: list[dict], title: str | None = None) -> str:
    """Fixed-width table of run_suite rows."""
    head = f"{'row':<22}{'time':>10}{'floor':>10}{'x floor':>9}{'bound':>8}{'MBU':>7}{'MFU':>7}" \
           f"{'tok/s':>11}{'floor tok/s':>12}{'vLLM':>9}  note"
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['name']:<22}  ERROR {r['error'][:100]}")
            continue
        t = r["time_s"]
        time_s = f"{t:.2f}s" if t >= 1 else f"{t * 1e3:.2f}ms"
        floor = r.get("floor_s")
        floor_s = "-" if floor is None else (f"{floor:.2f}s" if floor >= 1 else f"{floor * 1e3:.2f}ms")
        lines.append(
            f"{r['name']:<22}{time_s:>10}{floor_s:>10}{_fmt(r.get('ratio'), '.2f'):>9}{(r.get('bound') or '-'):>8}"
            f"{_fmt(r.get('mbu') and 100 * r['mbu'], '.0f'):>6}%{_fmt(r.get('mfu') and 100 * r['mfu'], '.0f'):>6}%"
            f"{_fmt(r.get('tokens_per_s'), ',.0f'):>11}{_fmt(r.get('floor_tokens_per_s'), ',.0f'):>12}"
            f"{_fmt(r.get('peer'), ',.0f'):>9}  {r.get('unit', '')} {r.get('note', '')}"
        )
    return "\n".join(lines)


def _suite_in_child(model: str, args: argparse.Namespace, rows: list[str]) -> list[dict]:
    """run_suite for one model in a fresh interpreter (same options); its rows come back through a JSON file."""
    import os
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "fractal.bench.offline_suite", "--model", model, "--json", out,
               "--gpu", args.gpu, "--load-format", args.load_format, "--rows", ",".join(rows)]
        if args.profile_dir:
            cmd += ["--profile-dir", args.profile_dir]
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL)
        if not os.path.exists(out):
            raise FractalError(f"the suite's process for {model} exited with {proc.returncode} and no rows")
        with open(out, encoding="utf-8") as handle:
            return json.load(handle)[model]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fractal bench offline --suite", description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="shipped config name or model dir (repeat)")
    parser.add_argument("--gpu", default="h100")
    parser.add_argument("--load-format", default="dummy", choices=["dummy", "auto", "safetensors"],
                        help="dummy (default): random weights at the config's shapes; auto: the model dir's checkpoint")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all)")
    parser.add_argument("--plain", action="store_true", help="also the plain-path rows (before/after)")
    parser.add_argument("--json", default=None, help="write all rows here")
    parser.add_argument("--profile-dir", default=None, help="write a torch.profiler summary per model here")
    parser.add_argument("--same-process", action="store_true",
                        help="run every --model in this process (default: one fresh process per model, as the peer "
                             "figures were taken; a model run after another here finds less free GPU memory, e.g. "
                             "a 2 %% smaller KV pool for Qwen3-30B-A3B after DeepSeek-V2-Lite)")
    args = parser.parse_args(argv)
    rows = args.rows.split(",") if args.rows else list(DEFAULT_ROWS) + (list(PLAIN_ROWS) if args.plain else [])
    unknown = [r for r in rows if r not in ROWS and r not in PLAIN_ROWS]
    if unknown:  # before any model loads: a one-line error, not a table of errors
        raise FractalError(f"unknown suite row(s) {unknown}; valid: {', '.join([*ROWS, *PLAIN_ROWS])}")
    everything, tables = {}, []
    for model in args.model:
        profile = f"{args.profile_dir}/profile-{model.replace('/', '_')}.txt" if args.profile_dir else None
        try:
            if len(args.model) > 1 and not args.same_process:
                result = _suite_in_child(model, args, rows)
            else:
                result = run_suite(model, gpu=args.gpu, rows=rows, profile_path=profile,
                                   engine_kwargs={"load_format": args.load_format})
        except Exception as exc:
            result = [dict(name="suite", error=f"{type(exc).__name__}: {exc}")]
        everything[model] = result
        tables.append(format_table(result, title=f"== {model} ({args.gpu} floor) =="))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(everything, handle, indent=1, default=str)
        print(tables[-1], flush=True)
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
