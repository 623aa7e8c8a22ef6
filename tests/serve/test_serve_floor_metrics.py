"""/metrics carries the four-resource floor of the engine's steps (--floor-gpu): live distance to the GPU's limits."""
from __future__ import annotations

import pytest

from fractal import SamplingParams
from fractal.engine.engine import LLMEngine
from fractal.models.testing import make_tiny_model
from fractal.perf.floor import load_gpu, load_model_spec, step_floor
from fractal.serve.metrics import ServerMetrics


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dsv2"))
    make_tiny_model("deepseek_v2", path)
    engine = LLMEngine.from_args(path, dtype="float32", device="cpu", floor_gpu="h100")
    engine.step_log = []
    for i in range(3):
        engine.add_request(f"r{i}", list(range(3, 9 + i)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return path, engine


def test_floor_totals_match_an_independent_sum(run):
    path, engine = run
    stats = engine.get_stats()
    model, gpu = load_model_spec(path), load_gpu("h100")
    expected = sum(
        step_floor(model, gpu, num_seqs=shape.num_seqs, new_tokens_per_seq=list(shape.new_tokens),
                   context_len=list(shape.context_lens), weight_dtype="fp32", kv_dtype="fp32").floor_s
        for shape, _ in engine.step_log
    )
    assert stats.step_floor_total_s == pytest.approx(expected, rel=1e-9)
    assert stats.step_time_total_s == pytest.approx(sum(t for _, t in engine.step_log), rel=1e-9)


def test_metrics_expose_the_floor(run):
    _, engine = run
    stats = engine.get_stats()
    metrics = ServerMetrics()
    metrics.update_engine_stats(stats)
    text = metrics.render()
    assert metric(text, "fractal_engine_last_step_floor_seconds") == pytest.approx(stats.last_step_floor_s)
    assert metric(text, "fractal_engine_last_step_floor_ratio") == pytest.approx(stats.last_step_floor_ratio)
    assert metric(text, "fractal_engine_step_floor_seconds_total") == pytest.approx(stats.step_floor_total_s)
    # a CPU is far slower than an H100's floor: the ratio says so
    assert metric(text, "fractal_engine_last_step_floor_ratio") > 1.0


def test_no_floor_gpu_reports_zero():
    metrics = ServerMetrics()
    metrics.update_engine_stats({"last_step_time_s": 0.01})
    text = metrics.render()
    assert metric(text, "fractal_engine_last_step_floor_ratio") == 0.0


def test_metrics_expose_preemption_counts():
    metrics = ServerMetrics()
    metrics.update_engine_stats({"num_preempted_total": 7, "num_swapped_out_total": 5, "num_balance_swaps_total": 2})
    text = metrics.render()
    assert metric(text, "fractal_num_preemptions_total") == 7
    assert metric(text, "fractal_num_swapped_out_total") == 5
    assert metric(text, "fractal_num_balance_swaps_total") == 2
