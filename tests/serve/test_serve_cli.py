"""`fractal serve` argument handling (the server itself is exercised in the other test_serve_* files)."""
from __future__ import annotations

import pytest

from fractal import cli
from fractal.errors import FractalError
from fractal.serve import cli as serve_cli
from fractal.serve.config import ServerConfig


def test_missing_demo_model_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(serve_cli, "demo_model_dir", lambda: tmp_path / "nowhere")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "demo model folder" in err and "nowhere" in err


def test_incomplete_demo_model_is_reported(monkeypatch, tmp_path, capsys):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setattr(serve_cli, "demo_model_dir", lambda: tmp_path)
    assert cli.main(["serve"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_names_default_to_the_model_argument():
    args = serve_cli.build_parser().parse_args(["some/dir"])
    assert serve_cli._model_and_names(args) == ("some/dir", ("some/dir",))
    args = serve_cli.build_parser().parse_args(["some/dir", "--served-model-name", "a", "--served-model-name", "b"])
    assert serve_cli._model_and_names(args)[1] == ("a", "b")


@pytest.mark.parametrize("kwargs", [dict(model_names=()), dict(model_names=("m",), max_queue=-1),
                                    dict(model_names=("m",), api_key=""), dict(model_names=("m",), max_n=0)])
def test_server_config_rejects_bad_values(kwargs):
    with pytest.raises(FractalError):
        ServerConfig(**kwargs)


def test_capacity_is_running_plus_queue():
    assert ServerConfig(model_names=("m",), max_running=4, max_queue=3).capacity == 7


def test_generate_shares_the_engine_options_with_serve(tmp_path):
    from fractal.engine import cli as generate_cli
    from fractal.engine.config import EngineConfig
    from fractal.serve.engine_args import engine_kwargs

    argv = ["--max-num-seqs", "7", "--gpu-memory-utilization", "0.5", "--no-prefix-caching", "--dtype", "float32"]
    served = engine_kwargs(serve_cli.build_parser().parse_args(["m", *argv, "--seed", "3"]))
    generate = generate_cli.build_parser().parse_args(["--model", "m", *argv, "--engine-seed", "3", "--seed", "11"])
    assert engine_kwargs(generate) == served
    assert generate.sampling_seed == 11  # generate's --seed is the requests' sampling seed
    config = EngineConfig.from_kwargs(str(tmp_path), **served)  # a directory: taken as is
    assert (config.max_num_seqs, config.gpu_memory_utilization, config.enable_prefix_caching, config.seed) == (
        7, 0.5, False, 3)
