"""`fractal bench serve`: load an OpenAI-compatible server and measure it.

Requests go out at the times `arrivals.arrival_times` gives (Poisson / gamma at --request-rate), with at
most --max-concurrency in flight; warm-up requests go first and are not counted. The result's keys follow
`vllm bench serve --save-result` (completed, total_input_tokens, request_throughput, mean_ttft_ms, ...,
p99_e2el_ms, request_goodput, input_lens, output_lens, ttfts, itls, generated_texts, errors), so the JSON of
both tools compares field by field. Durations: the benchmark's wall time from the first send to the last
response; throughputs divide by it.
"""
from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime

import httpx

from fractal.bench.arrivals import arrival_times
from fractal.bench.datasets import BenchRequest
from fractal.bench.progress import Progress
from fractal.bench.serve_client import RequestResult, build_payload, send_request
from fractal.bench.stats import SLO, summarize


@dataclass(frozen=True)
class ServeBenchConfig:
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    warmup: int = 1
    ignore_eos: bool = False
    temperature: float = 0.0
    api_key: str | None = None
    seed: int = 0
    slo: SLO = field(default_factory=SLO)
    progress: bool = True
    extra_body: dict | None = None

    @property
    def chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("chat/completions")


async def _run(cfg: ServeBenchConfig, requests: list[BenchRequest], tokenizer=None) -> tuple[list[RequestResult], float, int]:
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    limit = cfg.max_concurrency or max(len(requests), 1)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    sem = asyncio.Semaphore(limit)
    in_flight = peak = 0

    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        async def one(req: BenchRequest) -> RequestResult:
            nonlocal in_flight, peak
            async with sem:
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    payload = build_payload(cfg.chat, cfg.model, req.prompt, req.output_len,
                                            ignore_eos=cfg.ignore_eos, temperature=cfg.temperature,
                                            extra=cfg.extra_body)
                    return await send_request(client, url, payload, chat=cfg.chat, prompt_len=req.prompt_len,
                                              headers=headers, tokenizer=tokenizer)
                finally:
                    in_flight -= 1

        if cfg.warmup:
            warm = [requests[i % len(requests)] for i in range(cfg.warmup)]
            results = await asyncio.gather(*(one(r) for r in warm))
            failed = [r.error for r in results if not r.success]
            if failed:
                raise RuntimeError(f"warm-up request failed: {failed[0]}")
        peak = 0
        times = arrival_times(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)
        bar = Progress(len(requests), "bench serve", cfg.progress)

        async def scheduled(req: BenchRequest, at: float, t0: float) -> RequestResult:
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result = await one(req)
            bar.update()
            return result

        t0 = time.perf_counter()
        results = await asyncio.gather(*(scheduled(r, at, t0) for r, at in zip(requests, times)))
        duration = time.perf_counter() - t0
    return list(results), duration, peak


def run_serve_benchmark(cfg: ServeBenchConfig, requests: list[BenchRequest], tokenizer=None,
                        tokenizer_id: str | None = None) -> dict:
    """Run the benchmark and return the result dict (vLLM-compatible keys)."""
    results, duration, peak = asyncio.run(_run(cfg, requests, tokenizer))
    return summarize_results(cfg, results, duration, peak, tokenizer_id)


def summarize_results(cfg: ServeBenchConfig, results: list[RequestResult], duration: float, peak: int,
                      tokenizer_id: str | None = None) -> dict:
    ok = [r for r in results if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    tpots = [r.tpot_s for r in ok if r.tpot_s is not None]
    itls = [gap for r in ok for gap in r.itl_s]
    good = sum(1 for r in ok if cfg.slo.met(r.ttft_s, r.tpot_s, r.e2el_s)) if cfg.slo.any else None
    out: dict = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if cfg.chat else "openai",
        "endpoint": cfg.endpoint,
        "base_url": cfg.base_url,
        "model_id": cfg.model,
        "tokenizer_id": tokenizer_id,
        "num_prompts": len(results),
        "request_rate": "inf" if math.isinf(cfg.request_rate) else cfg.request_rate,
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "request_goodput": (good / duration if duration > 0 else 0.0) if good is not None else None,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "max_concurrent_requests": peak,
        "slo": {k: v for k, v in asdict(cfg.slo).items() if v is not None} or None,
        "good_requests": good,
    }
    out.update(summarize("ttft", [r.ttft_s for r in ok]))
    out.update(summarize("tpot", tpots))
    out.update(summarize("itl", itls))
    out.update(summarize("e2el", [r.e2el_s for r in ok]))
    out.update({
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft_s for r in results],
        "itls": [r.itl_s for r in results],
        "generated_texts": [r.text for r in results],
        "errors": [r.error for r in results],
    })
    return out


def format_report(result: dict) -> str:
    """The human-readable summary, laid out like vLLM's."""
    rows: list[str] = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]

    def row(label: str, value) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        rows.append(f"{label:<45}{text:>15}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    row("Maximum request concurrency:", result["max_concurrency"] or "unlimited")
    row("Request rate (req/s):", result["request_rate"])
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    if result["request_goodput"] is not None:
        row("Request goodput (req/s):", result["request_goodput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    for key, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                       ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        rows.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        name = key.upper() if key != "e2el" else "E2EL"
        row(f"Mean {name} (ms):", result[f"mean_{key}_ms"])
        row(f"Median {name} (ms):", result[f"median_{key}_ms"])
        row(f"P90 {name} (ms):", result[f"p90_{key}_ms"])
        row(f"P99 {name} (ms):", result[f"p99_{key}_ms"])
    rows.append("=" * 60)
    errors = [e for e in result["errors"] if e]
    if errors:
        rows.append(f"first error: {errors[0]}")
    return "\n".join(rows)
