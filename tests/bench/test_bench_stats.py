"""Benchmark statistics, arrivals and length distributions against hand-worked numbers and numpy."""
from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest

from fractal.bench.arrivals import arrival_times
from fractal.bench.datasets import build_requests, sample_lengths, tokenizer_prompt, word_prompt
from fractal.bench.serve_bench import ServeBenchConfig, summarize_results
from fractal.bench.serve_client import RequestResult
from fractal.bench.stats import SLO, percentile, summarize
from fractal.errors import FractalError


def test_percentile_hand_worked():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 20, 30, 40, 50], 90) == pytest.approx(46.0)  # pos 3.6 -> 40 + 0.6 * 10
    assert percentile([5], 99) == 5
    assert percentile([], 50) == 0.0
    rng = random.Random(1)
    data = [rng.expovariate(1.0) for _ in range(101)]
    for q in (0, 13, 50, 90, 99, 100):
        assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)))


def test_summarize_keys_and_units():
    s = summarize("ttft", [0.1, 0.2, 0.3])
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["std_ttft_ms"] == pytest.approx(float(np.std([100, 200, 300])))
    assert s["p99_ttft_ms"] == pytest.approx(298.0)
    assert set(s) == {"mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p90_ttft_ms", "p99_ttft_ms"}


def _result(ttft, e2e, tokens, prompt=10):
    gaps = [(e2e - ttft) / (tokens - 1)] * (tokens - 1) if tokens > 1 else []
    return RequestResult(success=True, prompt_len=prompt, output_tokens=tokens, ttft_s=ttft, itl_s=gaps, e2el_s=e2e)


def test_results_summary_and_goodput_hand_worked():
    results = [_result(0.1, 1.1, 11), _result(0.3, 0.8, 6), _result(0.05, 2.05, 5),
               RequestResult(success=False, error="HTTP 503")]
    # TPOTs: (1.1-0.1)/10 = 0.1 s, (0.8-0.3)/5 = 0.1 s, (2.05-0.05)/4 = 0.5 s
    cfg = ServeBenchConfig(base_url="http://x", model="m", slo=SLO(ttft_ms=200, tpot_ms=150))
    r = summarize_results(cfg, results, duration=4.0, peak=3)
    assert r["completed"] == 3 and r["failed"] == 1
    assert r["total_input_tokens"] == 30 and r["total_output_tokens"] == 22
    assert r["request_throughput"] == pytest.approx(0.75)
    assert r["output_throughput"] == pytest.approx(5.5)
    assert r["total_token_throughput"] == pytest.approx(13.0)
    assert r["mean_tpot_ms"] == pytest.approx((100 + 100 + 500) / 3)
    assert r["median_e2el_ms"] == pytest.approx(1100.0)
    # good: the first only (the second's TTFT 300 ms > 200, the third's TPOT 500 ms > 150)
    assert r["good_requests"] == 1 and r["request_goodput"] == pytest.approx(0.25)
    assert r["errors"][3] == "HTTP 503"
    assert len(r["itls"]) == 4 and len(r["itls"][0]) == 10


def test_no_slo_means_no_goodput():
    r = summarize_results(ServeBenchConfig(base_url="http://x", model="m"), [_result(0.1, 0.2, 2)], 1.0, 1)
    assert r["request_goodput"] is None


def test_poisson_and_gamma_arrivals():
    n = 20000
    for burstiness in (1.0, 0.25, 4.0):
        times = arrival_times(n, rate=50.0, burstiness=burstiness, seed=3)
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert times[0] == 0.0 and all(g >= 0 for g in gaps)
        assert statistics.fmean(gaps) == pytest.approx(1 / 50.0, rel=0.05)
        cv = statistics.pstdev(gaps) / statistics.fmean(gaps)
        assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.06)
    assert arrival_times(5, rate=math.inf) == [0.0] * 5
    assert arrival_times(50, 10.0, seed=7) == arrival_times(50, 10.0, seed=7)
    with pytest.raises(FractalError):
        arrival_times(3, rate=0.0)


def test_length_distributions():
    rng = random.Random(0)
    assert sample_lengths("fixed", 128, 5, rng) == [128] * 5
    uni = sample_lengths("uniform", 100, 5000, rng, range_ratio=0.5)
    assert min(uni) >= 50 and max(uni) <= 150 and min(uni) <= 52 and max(uni) >= 148
    assert statistics.fmean(uni) == pytest.approx(100, rel=0.03)
    logn = sample_lengths("sharegpt-like", 200, 20000, rng, sigma=1.0)
    assert statistics.fmean(logn) == pytest.approx(200, rel=0.06)  # the mean is the given length
    assert statistics.median(logn) == pytest.approx(200 * math.exp(-0.5), rel=0.06)  # lognormal median
    clipped = sample_lengths("sharegpt-like", 200, 2000, rng, min_len=4, max_len=300)
    assert min(clipped) >= 4 and max(clipped) == 300
    with pytest.raises(FractalError):
        sample_lengths("zipf", 10, 1, rng)


def test_prompts_have_the_asked_token_length(tmp_path):
    from fractal.engine.tokenizer import load_tokenizer
    from fractal.engine.tokenizer_testing import make_tiny_tokenizer

    tok = load_tokenizer(make_tiny_tokenizer(str(tmp_path)))
    rng = random.Random(5)
    for n in (1, 7, 64, 333):
        text, count = tokenizer_prompt(tok, n, rng)
        assert count == n
        assert len(tok.encode(text, add_special_tokens=False)) == n
    reqs = build_requests(20, "uniform", 40, 10, range_ratio=0.5, tokenizer=tok, seed=2)
    for r in reqs:
        assert len(tok.encode(r.prompt, add_special_tokens=False)) == r.prompt_len
        assert 20 <= r.prompt_len <= 60 and 5 <= r.output_len <= 15
    assert len({r.prompt.split()[0] for r in reqs}) > 5  # prompts do not all share a prefix
    assert len(word_prompt(50, rng).split()) == 50
