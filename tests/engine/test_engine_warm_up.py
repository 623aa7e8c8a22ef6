"""The start-up warm-up step (a full-budget prefill and a mixed step on throw-away sequences) leaves the engine
serving the same tokens: the KV it writes sits in free blocks that requests overwrite before reading."""
from __future__ import annotations

import pytest

from fractal import SamplingParams
from fractal.engine.engine import LLMEngine
from fractal.models.testing import make_tiny_model

PROMPTS = [[5, 6, 7, 8, 9] * 7, [100, 101, 102], [42, 17, 3, 4, 5, 6, 7, 8] * 3]


@pytest.fixture(scope="module", params=["llama", "deepseek_v2"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"warm_{request.param}")
    make_tiny_model(request.param, path)
    return str(path)


def generate(engine):
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def test_warm_up_then_same_tokens(model_dir):
    kwargs = dict(dtype="float32", device="cpu", seed=0, max_num_batched_tokens=96, num_gpu_blocks=64,
                  enable_prefix_caching=False)
    cold = generate(LLMEngine.from_args(model_dir, **kwargs))
    engine = LLMEngine.from_args(model_dir, **kwargs)
    assert engine.warm_up_s == 0.0  # CPU: no warm-up unless forced
    runner, calls = engine.runner, []
    execute = runner.execute
    runner.execute = lambda out, seqs, eos: calls.append(out.num_batched_tokens) or execute(out, seqs, eos)
    assert runner.warm_up(96, engine.max_model_len, force=True) > 0.0
    del runner.execute
    assert calls and calls[0] == 96  # the full-budget prefill step ran
    assert engine.scheduler.kv.num_used_blocks == 0  # nothing of the warm-up stays allocated
    assert generate(engine) == cold


def test_warm_up_skips_a_pool_too_small(model_dir):
    engine = LLMEngine.from_args(model_dir, dtype="float32", device="cpu", seed=0, max_num_batched_tokens=4096,
                                 num_gpu_blocks=8, enable_prefix_caching=False, max_model_len=64)
    engine.runner.warm_up(4096, engine.max_model_len, force=True)  # needs > 8 blocks: runs nothing, raises nothing
    assert generate(engine)
