"""`fractal bench serve|offline`.

    fractal bench serve --base-url http://127.0.0.1:8000 --num-prompts 200 --input-len 512 --output-len 128 \\
        --request-rate 8 --max-concurrency 32 --slo-ttft 500 --slo-tpot 50 --result-json out.json
    fractal bench offline --model deepseek-v2-lite --load-format dummy --input-len 512 --output-len 256 \\
        --num-prompts 64 --gpu h100
    fractal bench offline --suite --model deepseek-v2-lite --model llama-3.1-8b --model qwen3-30b-a3b   # GPU table
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from fractal.errors import FractalError


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fractal bench serve",
                                description="Benchmark any OpenAI-compatible server (streams every request).")
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default $OPENAI_API_KEY)")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer directory: prompts of exact token lengths (else ~1 token per word)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--dataset", default="fixed", choices=["fixed", "random", "uniform", "sharegpt-like"],
                   help="length distribution: fixed (= vLLM's random), uniform, or ShareGPT-like lognormal")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens (the mean for sharegpt-like)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens per request (the mean for sharegpt-like)")
    p.add_argument("--range-ratio", type=float, default=0.5, help="uniform: lengths in len*(1±ratio)")
    p.add_argument("--max-input-len", type=int, default=None, help="clip sampled prompt lengths")
    p.add_argument("--max-output-len", type=int, default=None, help="clip sampled output lengths")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals: 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    p.add_argument("--warmup", type=int, default=1, help="uncounted requests sent first")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so every output has --output-len tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--slo-ttft", type=float, default=None, help="goodput SLO: TTFT in ms")
    p.add_argument("--slo-tpot", type=float, default=None, help="goodput SLO: TPOT in ms")
    p.add_argument("--slo-e2el", type=float, default=None, help="goodput SLO: end-to-end latency in ms")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-json", default=None, help="write the full result (vLLM-like keys) here")
    p.add_argument("--no-progress", action="store_true")
    return p


def _offline_parser() -> argparse.ArgumentParser:
    from fractal.serve.engine_args import add_engine_args

    p = argparse.ArgumentParser(prog="fractal bench offline",
                                description="Offline generate throughput, with the four-resource floor beside it.")
    p.add_argument("--model", required=True, help="model directory, config.json, or shipped config name")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--gpu", default=None, help="GPU for the floor (default h100 on CUDA; on the CPU: n/a unless given)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--result-json", default=None)
    add_engine_args(p)
    return p


def _first_model(base_url: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        resp = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        raise FractalError(f"could not read the model name from {base_url}/v1/models ({exc}); pass --model") from exc


def serve_main(argv: list[str]) -> int:
    args = _serve_parser().parse_args(argv)
    from fractal.bench.datasets import build_requests
    from fractal.bench.serve_bench import ServeBenchConfig, format_report, run_serve_benchmark
    from fractal.bench.stats import SLO

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise FractalError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise FractalError(f"--max-concurrency {args.max_concurrency} is invalid: must be >= 1")
    tokenizer = None
    if args.tokenizer:
        from fractal.engine.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer is None:
            raise FractalError(f"--tokenizer {args.tokenizer!r} holds no tokenizer.json")
    model = args.model or _first_model(args.base_url, args.api_key)
    requests = build_requests(args.num_prompts, args.dataset, args.input_len, args.output_len, seed=args.seed,
                              range_ratio=args.range_ratio, max_input_len=args.max_input_len,
                              max_output_len=args.max_output_len, tokenizer=tokenizer)
    cfg = ServeBenchConfig(base_url=args.base_url, model=model, endpoint=args.endpoint,
                           request_rate=args.request_rate, burstiness=args.burstiness,
                           max_concurrency=args.max_concurrency, warmup=args.warmup, ignore_eos=args.ignore_eos,
                           temperature=args.temperature, api_key=args.api_key, seed=args.seed,
                           slo=SLO(args.slo_ttft, args.slo_tpot, args.slo_e2el), progress=not args.no_progress)
    try:
        result = run_serve_benchmark(cfg, requests, tokenizer, tokenizer_id=args.tokenizer)
    except RuntimeError as exc:
        raise FractalError(str(exc)) from exc
    result["dataset"] = args.dataset
    print(format_report(result))
    if args.result_json:
        with open(args.result_json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0 if result["completed"] else 1


def offline_main(argv: list[str]) -> int:
    args = _offline_parser().parse_args(argv)
    from fractal.bench.offline import format_offline, run_offline, write_json

    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise FractalError(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: must be >= 1")
    result = run_offline(args)
    print(format_offline(result))
    if args.result_json:
        write_json(args.result_json, result)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: fractal bench {serve,offline} [options]\n\n"
              "  serve    load an OpenAI-compatible server: TTFT, TPOT, ITL, E2E, throughput, goodput\n"
              "  offline  offline generate throughput beside the four-resource floor\n"
              "           (--suite: the fixed GPU table of docs/perf-notes.md for each --model, dummy weights)\n\n"
              "`fractal bench serve --help` / `fractal bench offline --help` for options.")
        return 0
    if argv[0] == "serve":
        return serve_main(argv[1:])
    if argv[0] == "offline":
        if "--suite" in argv[1:]:  # the issue-5 table: fixed workloads per model, the floor beside each row
            from fractal.bench import offline_suite

            return offline_suite.main([a for a in argv[1:] if a != "--suite"])
        return offline_main(argv[1:])
    print(f"fractal bench: unknown mode {argv[0]!r}; choose serve or offline", file=sys.stderr)
    return 2
