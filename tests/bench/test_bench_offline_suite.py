"""The issue-5 suite (fractal/bench/offline_suite.py) on a tiny model on the CPU: rows, floors and the table.

Floors are checked against step_floor summed by hand over the steps the engine must run (one prefill step,
then one decode step per further output token with a context that grows by one), not against the suite itself.
"""
from __future__ import annotations

import pytest

from fractal.bench.offline_suite import INPUT_LEN, OUTPUT_LEN, format_table, run_suite
from fractal.models.testing import make_tiny_model
from fractal.perf.floor import load_gpu, load_model_spec, step_floor


@pytest.fixture(scope="module")
def suite_rows(tmp_path_factory):
    path = str(make_tiny_model("llama", tmp_path_factory.mktemp("suite"), max_position_embeddings=16384))
    rows = run_suite(path, rows=["startup", "gen-n1", "prefill-16x512", "decode-b8-1k", "decode-b1-1k-plain"],
                     engine_kwargs=dict(dtype="float32", device="cpu", max_num_seqs=16), log=lambda m: None)
    return path, {r["name"]: r for r in rows}


def test_rows_present_and_consistent(suite_rows):
    _, rows = suite_rows
    assert set(rows) == {"startup", "gen-n1", "prefill-16x512", "decode-b8-1k", "decode-b1-1k-plain"}
    assert all("error" not in r for r in rows.values()), rows
    gpu = load_gpu("h100")
    for name, r in rows.items():
        assert r["time_s"] > 0
        if name == "startup":
            continue
        assert r["ratio"] == pytest.approx(r["time_s"] / r["floor_s"])
        assert 0 < r["mbu"] < 1 and 0 < r["mfu"] < 1
        assert r["floor_tokens_per_s"] > r["tokens_per_s"]
    assert rows["gen-n1"]["tokens_per_s"] == pytest.approx(OUTPUT_LEN / rows["gen-n1"]["time_s"])
    assert rows["prefill-16x512"]["tokens_per_s"] == pytest.approx(16 * INPUT_LEN / rows["prefill-16x512"]["time_s"])
    assert rows["decode-b8-1k"]["mbu"] * rows["decode-b8-1k"]["time_s"] * gpu.hbm_bw == pytest.approx(
        step_floor(load_model_spec(suite_rows[0]), gpu, num_seqs=8, new_tokens_per_seq=1, context_len=1024).hbm_bytes)


def test_floors_sum_the_steps(suite_rows):
    path, rows = suite_rows
    spec, gpu = load_model_spec(path), load_gpu("h100")
    prefill = step_floor(spec, gpu, num_seqs=16, new_tokens_per_seq=INPUT_LEN, context_len=0).floor_s
    assert rows["prefill-16x512"]["floor_s"] == pytest.approx(prefill)
    gen = step_floor(spec, gpu, num_seqs=1, new_tokens_per_seq=INPUT_LEN, context_len=0).floor_s + sum(
        step_floor(spec, gpu, num_seqs=1, new_tokens_per_seq=1, context_len=INPUT_LEN + i).floor_s
        for i in range(OUTPUT_LEN - 1)
    )
    assert rows["gen-n1"]["floor_s"] == pytest.approx(gen)


def test_format_table(suite_rows):
    _, rows = suite_rows
    text = format_table(list(rows.values()), title="tiny")
    for name in rows:
        assert name in text
    assert text.splitlines()[0] == "tiny"


def test_suite_cli_rejects_unknown_rows_in_one_line(capsys):
    from fractal.cli import main

    assert main(["bench", "offline", "--suite", "--model", "deepseek-v2-lite", "--rows", "gen-n1,nosuch"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown suite row(s) ['nosuch']" in err[0]


def test_suite_runs_each_model_in_its_own_process(tmp_path, capsys):
    """With several --model the suite runs each in a fresh interpreter (as the peer figures were taken), and
    the parent prints and writes every model's rows."""
    import json

    from fractal.bench.offline_suite import main

    paths = [str(make_tiny_model(family, tmp_path / family, max_position_embeddings=16384))
             for family in ("llama", "qwen3")]
    out = tmp_path / "rows.json"
    assert main(["--model", paths[0], "--model", paths[1], "--rows", "startup", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert list(rows) == paths
    printed = capsys.readouterr().out
    for path in paths:
        assert [r["name"] for r in rows[path]] == ["startup"] and "error" not in rows[path][0], rows[path]
        assert f"== {path} (h100 floor) ==" in printed
