"""CPU/GPU overlap (async scheduling) gives the same results as the synchronous loop, on the CPU.

The reference is the synchronous engine (itself checked against HF transformers in test_engine_generate.py).
Async runs must actually overlap: the runner has to see placeholder tokens (decode inputs read from the
previous step's samples) — checked through a wrapper around ModelRunner.launch.
"""
from __future__ import annotations

import pytest

from fractal import LLM, SamplingParams
from fractal.engine import overlap
from fractal.engine.engine import LLMEngine
from fractal.models.testing import make_tiny_model

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [3],
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112],
    [42, 17, 200, 9],
    [250, 2, 77, 31, 64, 128, 15, 16, 90, 91, 92],
    [7, 70, 170, 27, 72, 172, 37, 73, 173, 11, 12],
    [7, 70, 170, 27, 72, 172, 37, 73, 173, 21],
]


@pytest.fixture(scope="module", params=["llama", "deepseek_v2", "qwen3_moe"])
def model_path(request, tmp_path_factory):
    return str(make_tiny_model(request.param, tmp_path_factory.mktemp(request.param)))


def _count_placeholders(llm: LLM) -> list[int]:
    seen = [0]
    launch = llm.engine.runner.launch

    def spy(output, seqs, eos):
        seen[0] += sum(t == overlap.PLACEHOLDER for c in output.chunks for t in c.token_ids)
        return launch(output, seqs, eos)

    llm.engine.runner.launch = spy
    return seen


def _run(path, params, async_scheduling, **kwargs):
    llm = LLM(model=path, async_scheduling=async_scheduling, **kwargs)
    seen = _count_placeholders(llm)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    stats = llm.get_stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    if async_scheduling:
        assert llm.engine._inflight is None
    return outs, seen[0], stats


def _summary(outs):
    """Tokens, finish reasons and top-logprob ids exactly; logprob values to 1e-4 (batches differ in
    composition, e.g. prefix hits come a step later, so float32 sums round differently)."""
    return [[_Close(c) for c in o.outputs] for o in outs]


class _Close:
    def __init__(self, c) -> None:
        self.c = c

    def __eq__(self, other) -> bool:
        a, b = self.c, other.c
        if (a.token_ids, a.finish_reason) != (b.token_ids, b.finish_reason):
            return False
        if abs(a.cumulative_logprob - b.cumulative_logprob) > 1e-3 or (a.logprobs is None) != (b.logprobs is None):
            return False
        for x, y in zip(a.logprobs or [], b.logprobs or []):
            if set(x) != set(y) or any(abs(x[k] - y[k]) > 1e-4 for k in x):
                return False
        return True

    def __repr__(self) -> str:
        return f"({self.c.token_ids}, {self.c.finish_reason}, {self.c.cumulative_logprob:.4f})"


CASES = {
    "greedy": (SamplingParams(temperature=0.0, max_tokens=9), dict(block_size=4)),
    "chunked_prefix": (SamplingParams(temperature=0.0, max_tokens=7, logprobs=2),
                       dict(block_size=4, prefill_chunk_size=3, max_num_batched_tokens=10)),
    "preempt": (SamplingParams(temperature=0.0, max_tokens=8),
                dict(block_size=4, num_gpu_blocks=10, max_model_len=32)),
    # one output token of lag is enough for a swap: running decodes yield to preempted ones (endgame balancing)
    "preempt_swap": (SamplingParams(temperature=0.0, max_tokens=12),
                     dict(block_size=4, num_gpu_blocks=10, max_model_len=32, preemption_balance=1, swap_space=0.01)),
    "seeded_n2": (SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=2, max_tokens=6, min_tokens=3),
                  dict(block_size=4)),
    "penalties": (SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4, max_tokens=8),
                  dict(block_size=4)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_async_matches_sync(model_path, case):
    params, kwargs = CASES[case]
    sync_outs, sync_seen, _ = _run(model_path, params, False, **kwargs)
    async_outs, async_seen, stats = _run(model_path, params, True, **kwargs)
    assert sync_seen == 0
    if case == "penalties":
        assert async_seen == 0  # penalties read every output token: each step is resolved before the next
    else:
        assert async_seen > 0  # decode inputs really came from the device-side samples
    assert _summary(async_outs) == _summary(sync_outs)
    if case.startswith("preempt"):
        assert stats.num_preempted_total > 0
    if case == "preempt_swap":
        assert stats.num_balance_swaps_total > 0
        assert stats.num_swapped_out_total == stats.num_preempted_total


def test_async_spends_no_step_on_certain_stops(model_path):
    """Sequences that must stop at their newest token (max_tokens) are parked, not scheduled once more:
    with ignore_eos the async engine runs exactly as many steps as the synchronous one."""
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    sync_outs, _, sync_stats = _run(model_path, params, False, block_size=4)
    async_outs, _, async_stats = _run(model_path, params, True, block_size=4)
    assert _summary(async_outs) == _summary(sync_outs)
    assert async_stats.num_steps_total == sync_stats.num_steps_total
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm = LLM(model=model_path, block_size=4, async_scheduling=True)
    llm.generate([{"prompt_token_ids": p} for p in PROMPTS], one)
    assert llm.get_stats().num_steps_total == 1


def test_async_abort_midway(model_path):
    engine = LLMEngine.from_args(model_path, block_size=4, prefill_chunk_size=3, max_num_batched_tokens=10,
                                 async_scheduling=True)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    engine.abort_request("r2")
    engine.abort_request("r0")
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["r0"].outputs[0].finish_reason == "abort"
    sync = LLM(model=model_path, block_size=4, async_scheduling=False)
    for i in (1, 3, 4, 5, 6):
        ref = sync.generate({"prompt_token_ids": PROMPTS[i]}, params)[0].outputs[0].token_ids
        assert finals[f"r{i}"].outputs[0].token_ids == ref
    assert engine.get_stats().kv_blocks_used == 0
    assert all(t >= 0 for r in finals.values() for t in r.outputs[0].token_ids)
