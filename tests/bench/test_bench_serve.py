"""`fractal bench serve` and `fractal bench offline`, end to end.

1. Against a scripted SSE server whose timing is known (first token after 120 ms, then one every 15 ms):
   the measured TTFT / ITL / TPOT must come out at those values, the concurrency cap must hold (the
   server counts its peak), and a request rate must spread the sends over the expected time.
2. Against our own tiny server: token counts agree with the server's own /metrics accounting.
3. The offline bench on a tiny model: the tokens it claims, and its floor equals the sum of step floors.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from fractal.bench import cli as bench_cli
from fractal.bench.datasets import build_requests
from fractal.bench.serve_bench import ServeBenchConfig, run_serve_benchmark

TTFT_S, ITL_S = 0.120, 0.015


class ScriptedServer:
    """An OpenAI-style streaming endpoint with fixed timing; counts concurrent requests."""

    def __init__(self):
        self.active = self.peak = self.calls = 0
        self.send_times: list[float] = []

        async def completions(request):
            body = await request.json()
            self.calls += 1
            self.send_times.append(time.perf_counter())
            n = int(body["max_tokens"])

            async def gen():
                self.active += 1
                self.peak = max(self.peak, self.active)
                try:
                    await asyncio.sleep(TTFT_S)
                    for i in range(n):
                        if i:
                            await asyncio.sleep(ITL_S)
                        yield "data: " + json.dumps({"choices": [{"index": 0, "text": f" w{i}"}]}) + "\n\n"
                    usage = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                    yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    self.active -= 1

            return StreamingResponse(gen(), media_type="text/event-stream")

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": "scripted", "object": "model"}]})

        app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                                Route("/v1/models", models)])
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def scripted():
    with ScriptedServer() as srv:
        yield srv


def test_measures_known_timings_and_caps_concurrency(scripted):
    requests = build_requests(12, "fixed", 8, 9, seed=0)
    cfg = ServeBenchConfig(base_url=scripted.url, model="scripted", max_concurrency=3, warmup=0, progress=False)
    scripted.peak = 0
    r = run_serve_benchmark(cfg, requests)
    assert r["completed"] == 12 and r["failed"] == 0
    assert r["total_output_tokens"] == 12 * 9 and r["total_input_tokens"] == 12 * 7  # from usage
    assert scripted.peak == 3 and r["max_concurrent_requests"] == 3
    assert r["median_ttft_ms"] == pytest.approx(TTFT_S * 1000, abs=40)
    assert r["median_itl_ms"] == pytest.approx(ITL_S * 1000, abs=8)
    assert r["median_tpot_ms"] == pytest.approx(ITL_S * 1000, abs=8)
    expected_e2e = TTFT_S + 8 * ITL_S
    assert r["median_e2el_ms"] == pytest.approx(expected_e2e * 1000, abs=40)
    # 12 requests, 3 at a time, each ~0.24 s: about 4 rounds
    assert r["duration"] == pytest.approx(4 * expected_e2e, rel=0.35)
    assert r["request_throughput"] == pytest.approx(12 / r["duration"])


def test_request_rate_paces_the_sends(scripted):
    requests = build_requests(10, "fixed", 4, 2, seed=1)
    cfg = ServeBenchConfig(base_url=scripted.url, model="scripted", request_rate=20.0, warmup=0, progress=False,
                           seed=4)
    from fractal.bench.arrivals import arrival_times

    planned = arrival_times(10, 20.0, 1.0, seed=4)
    scripted.send_times.clear()
    run_serve_benchmark(cfg, requests)
    sent = [t - scripted.send_times[0] for t in scripted.send_times]
    assert sent[-1] == pytest.approx(planned[-1], abs=0.15)
    assert planned[-1] > 0.2  # the plan itself spreads the sends (10 at 20/s)


def test_failed_requests_are_counted_not_fatal(scripted):
    cfg = ServeBenchConfig(base_url=scripted.url, model="scripted", endpoint="/v1/nowhere", warmup=0,
                           progress=False)
    r = run_serve_benchmark(cfg, build_requests(3, "fixed", 4, 2))
    assert r["completed"] == 0 and r["failed"] == 3
    assert all(e.startswith("HTTP 404") for e in r["errors"])


# --- against our own server ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    from fractal.engine.engine import LLMEngine
    from fractal.serve.config import ServerConfig
    from fractal.serve.server import ServerThread
    from fractal.serve.testing import make_tiny_serve_model

    path = make_tiny_serve_model(tmp_path_factory.mktemp("tiny_bench"), max_position_embeddings=512)
    engine = LLMEngine.from_args(path, max_num_seqs=4)
    with ServerThread(engine, ServerConfig(model_names=("tiny",), max_running=4, max_queue=64)) as srv:
        srv.model_dir = path
        yield srv


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_bench_cli_against_our_server(tiny_server, tmp_path, capsys, endpoint):
    out = tmp_path / "result.json"
    gen0 = _metric(tiny_server.url, "fractal_generation_tokens_total")
    prompt0 = _metric(tiny_server.url, "fractal_prompt_tokens_total")
    argv = ["serve", "--base-url", tiny_server.url, "--endpoint", endpoint, "--num-prompts", "8",
            "--dataset", "uniform", "--input-len", "24", "--output-len", "12", "--range-ratio", "0.5",
            "--ignore-eos", "--max-concurrency", "3", "--request-rate", "50", "--burstiness", "0.5",
            "--warmup", "1", "--tokenizer", tiny_server.model_dir, "--slo-ttft", "60000",
            "--result-json", str(out)]
    assert bench_cli.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["model_id"] == "tiny"  # taken from /v1/models
    assert r["completed"] == 8 and r["failed"] == 0
    gen = _metric(tiny_server.url, "fractal_generation_tokens_total") - gen0
    prompt = _metric(tiny_server.url, "fractal_prompt_tokens_total") - prompt0
    warm = r["output_lens"][0]  # the warm-up repeats the first request
    assert r["total_output_tokens"] == sum(r["output_lens"]) == gen - warm
    assert 8 * 6 <= r["total_output_tokens"] <= 8 * 18
    assert r["total_input_tokens"] == prompt - r["input_lens"][0]
    assert r["max_concurrent_requests"] <= 3
    assert r["request_goodput"] == pytest.approx(r["request_throughput"])  # a 60 s TTFT SLO: all good
    for key in ("mean_ttft_ms", "median_tpot_ms", "p99_itl_ms", "p90_e2el_ms", "output_throughput"):
        assert r[key] > 0
    assert r["median_ttft_ms"] <= r["median_e2el_ms"]
    printed = capsys.readouterr()
    assert "Serving Benchmark Result" in printed.out and "bench serve [" in printed.err


def test_offline_bench_reports_tokens_and_floor(tiny_server, capsys, tmp_path):
    from fractal.perf.floor import step_floor

    out = tmp_path / "offline.json"
    argv = ["offline", "--model", tiny_server.model_dir, "--input-len", "16", "--output-len", "3",
            "--num-prompts", "5", "--max-num-seqs", "2", "--gpu", "h100", "--device", "cpu", "--result-json", str(out)]
    assert bench_cli.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["output_tokens"] == 15
    assert r["output_throughput"] == pytest.approx(15 / r["elapsed_s"])
    # waves of 2, 2, 1: each one prefill of 16 tokens per sequence, then 2 decode steps (context 16, 17);
    # dtype "auto" runs in float32 on the CPU, and the floor follows the dtype the engine really uses
    expected = 0.0
    fp32 = dict(weight_dtype="fp32", kv_dtype="fp32")
    for size in (2, 2, 1):
        expected += step_floor(tiny_server.model_dir, "h100", num_seqs=size, new_tokens_per_seq=16, context_len=0,
                               **fp32).floor_s
        expected += sum(step_floor(tiny_server.model_dir, "h100", num_seqs=size, new_tokens_per_seq=1,
                                   context_len=16 + i, **fp32).floor_s for i in range(2))
    assert r["floor_s"] == pytest.approx(expected, rel=1e-9)
    assert r["floor_fraction"] == pytest.approx(expected / r["elapsed_s"])
    text = capsys.readouterr().out
    assert "engine start-up" in text and "5 x 16 -> 3" in text


def test_offline_bench_without_gpu_prints_na(tiny_server, capsys):
    assert bench_cli.main(["offline", "--model", tiny_server.model_dir, "--input-len", "4", "--output-len", "2",
                           "--num-prompts", "1", "--device", "cpu"]) == 0
    assert "n/a" in capsys.readouterr().out


def test_offline_bench_accepts_a_shipped_config_name():
    import os
    import shutil

    from fractal.bench.offline import resolve_model_dir
    from fractal.errors import FractalError
    from fractal.spec.model import MODELS_DIR

    path, made_up = resolve_model_dir("deepseek-v2-lite")
    try:
        assert made_up
        with open(os.path.join(path, "config.json")) as got, open(MODELS_DIR / "deepseek-v2-lite.json") as want:
            assert json.load(got) == json.load(want)
    finally:
        shutil.rmtree(path)
    with pytest.raises(FractalError, match="shipped"):
        resolve_model_dir("no-such-model")
