"""output_kind="final" returns one output per request, equal to the last cumulative one."""
from __future__ import annotations

import pytest

from fractal import SamplingParams
from fractal.engine.engine import LLMEngine
from fractal.errors import FractalError
from fractal.models.testing import make_tiny_model

PROMPTS = [[5, 6, 7, 8, 9], [100, 101, 102], [42, 17, 3, 4, 5, 6, 7, 8]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_kind")
    make_tiny_model("llama", path)
    return str(path)


def run(model_dir, kind):
    engine = LLMEngine.from_args(model_dir, dtype="float32", device="cpu", seed=0)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=4 + i, ignore_eos=True),
                           output_kind=kind)
    seen: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out)
    return seen


def test_final_only_once_and_equal_to_cumulative(model_dir):
    cumulative = run(model_dir, "cumulative")
    final = run(model_dir, "final")
    assert set(final) == set(cumulative) == {"r0", "r1", "r2"}
    for rid, outs in final.items():
        assert len(outs) == 1 and outs[0].finished
        assert len(cumulative[rid]) == 4 + int(rid[1:])  # one per generated token
        assert outs[0].outputs[0].token_ids == cumulative[rid][-1].outputs[0].token_ids


def test_unknown_output_kind_rejected(model_dir):
    engine = LLMEngine.from_args(model_dir, dtype="float32", device="cpu")
    with pytest.raises(FractalError, match="output_kind"):
        engine.add_request("x", [1, 2, 3], SamplingParams(), output_kind="delta")
    assert not engine.has_unfinished_requests()
