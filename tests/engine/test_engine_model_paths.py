"""A model given as a config.json file or a shipped config name: real shapes with load_format="dummy"."""
from __future__ import annotations

import os

import pytest

from fractal import LLM, SamplingParams
from fractal.engine.config import EngineConfig
from fractal.errors import FractalError
from fractal.models.testing import make_tiny_model


def test_config_file_runs_with_dummy_weights(tmp_path):
    path = make_tiny_model("qwen3", tmp_path / "m")
    config_file = os.path.join(path, "config.json")
    llm = LLM(config_file, load_format="dummy", dtype="float32", device="cpu")
    out = llm.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3


def test_config_without_dummy_is_a_clear_error(tmp_path):
    path = make_tiny_model("llama", tmp_path / "m")
    with pytest.raises(FractalError, match="config without weights.*load_format='dummy'"):
        EngineConfig.from_kwargs(os.path.join(path, "config.json"))
    with pytest.raises(FractalError, match="config without weights"):
        EngineConfig.from_kwargs("llama-3.1-8b")


def test_shipped_name_resolves_and_unknown_name_lists_shipped():
    config = EngineConfig.from_kwargs("deepseek-v2-lite", load_format="dummy")
    assert os.path.isfile(os.path.join(config.model, "config.json"))
    with pytest.raises(FractalError, match="shipped: .*deepseek-v2-lite"):
        EngineConfig.from_kwargs("no-such-model", load_format="dummy")
