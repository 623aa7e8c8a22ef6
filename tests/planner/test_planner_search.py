"""`fractal plan`: search size and speed, feasibility of what it returns, SLO filtering."""
import time

import pytest

from fractal.errors import FractalError
from fractal.perf.ops import StepShape
from fractal.perf.step import Workload, phase_result, step_cost
from fractal.planner.cli import main, parse_duration
from fractal.planner.search import PlanQuery, phase_plans, search
from fractal.spec.gpu import load_gpu
from fractal.spec.model import load_model_spec
from fractal.spec.precision import parse_precision


def _query(**kw):
    m = load_model_spec("deepseek-v3")
    base = dict(model=m, gpu=load_gpu("h800"), precision=parse_precision("fp8"), gpus=32, isl=3260, osl=1100,
                ttft_s=2.0, tpot_s=0.05)
    base.update(kw)
    return PlanQuery(**base)


@pytest.fixture(scope="module")
def timed():
    t0 = time.process_time()
    res = search(_query(), top=5)
    return res, time.process_time() - t0


def test_search_size_speed_and_slos(timed):
    res, cpu = timed
    assert res.searched >= 10_000 and cpu < 10
    assert res.best and res.feasible > 0
    modes = {c.mode for c in res.best}
    assert modes == {"aggregated", "disaggregated"}
    for c in res.best:
        assert c.ttft_s <= 2.0 and c.tpot_s <= 0.05 and c.gpus_used <= 32
    ranked = [c.tokens_per_s_per_gpu for c in res.best[:5]]
    assert ranked == sorted(ranked, reverse=True)


def test_disaggregated_candidate_recomputes(timed):
    q, res = _query(), timed[0]
    c = next(c for c in res.best if c.mode == "disaggregated")
    prec = q.precision
    dec = phase_result(q.model, q.gpu, prec, c.decode, "decode", Workload(c.decode_batch, q.isl, q.osl))
    assert c.tpot_s == pytest.approx(dec.latency_s)
    n = c.prefill_chunk // q.isl
    pre = step_cost(q.model, q.gpu, prec, c.prefill, StepShape.uniform(n, q.isl, 0), kv_tokens_held=n * q.isl,
                    kv_transfer_tokens=n * q.isl)
    assert c.ttft_s == pytest.approx(c.prefill.pp * pre.step_time_s)
    d_rate = c.d_instances * c.decode_batch * c.decode.dp / (dec.step.step_time_s * q.osl)
    p_rate = c.p_instances * n * c.prefill.dp / pre.step_time_s
    assert c.tokens_per_s_per_gpu == pytest.approx(min(d_rate, p_rate) * q.osl / c.gpus_used)
    # what it returns fits in memory
    assert dec.step.memory.total <= q.gpu.hbm_bytes


def test_impossible_targets_give_a_note():
    res = search(_query(tpot_s=0.001, gpus=16, modes=("disaggregated",)))
    assert not res.best and res.notes


def test_dense_plans_have_no_ep():
    plans = phase_plans(load_model_spec("llama-3.1-8b"), 16, 8)
    assert plans and all(p.ep == 1 and p.dp == 1 for p in plans)


def test_cli(capsys):
    assert main(["--model", "llama-3.1-8b", "--gpu", "h100", "--gpus", "8", "--isl", "1000", "--osl", "200",
                 "--ttft", "500ms", "--tpot", "20ms"]) == 0
    out = capsys.readouterr().out
    assert "candidates" in out and "tok/s/GPU" in out
    assert parse_duration("2s") == 2 and parse_duration("50ms") == 0.05
    with pytest.raises(FractalError, match="duration"):
        parse_duration("fast")
