"""`fractal report`: required JSON keys, text table, one-line errors."""
import json
import subprocess
import sys

import pytest

from fractal.cli import main as fractal_main
from fractal.errors import FractalError
from fractal.perf.cli import main

W4A8 = ["--weights", "attn=fp8,dense=fp8,moe=w4a8,shared=fp8"]
BASE = ["--model", "deepseek-v3", "--gpu", "h20", "--phase", "decode", "--plan", "dp8-ep8", "--batch", "32",
        "--isl", "3260", "--osl", "1100"]


def test_json_keys(capsys):
    assert main(BASE + W4A8 + ["--json", "--by-op"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("params_total", "params_activated", "phase", "step_time_s", "tokens_per_s_per_gpu", "bottleneck"):
        assert k in out
    pg = out["per_gpu"]
    for res, keys in (("compute", ("flops", "time_s")), ("hbm", ("bytes", "time_s")),
                      ("memory", ("bytes", "capacity_bytes")), ("comm", ("bytes", "time_s"))):
        for k in keys:
            assert isinstance(pg[res][k], (int, float))
    assert out["phase"] == "decode" and out["bottleneck"] in ("compute", "hbm", "comm")
    assert pg["memory"]["capacity_bytes"] == 96e9
    assert out["tokens_per_s_per_gpu"] == pytest.approx(32 / out["step_time_s"])  # dp8 on 8 GPUs
    assert abs(out["params_total"] / 1e9 - 671) < 1
    assert sum(o["flops"] for o in out["ops"]) == pytest.approx(pg["compute"]["flops"])


def test_text_table(capsys):
    assert main(BASE + W4A8 + ["--by-op"]) == 0
    text = capsys.readouterr().out
    for word in ("compute", "memory", "hbm", "comm", "TPOT", "bottleneck", "experts(routed)", "attn_core(absorb)"):
        assert word in text
    assert main(["--model", "deepseek-v3", "--gpu", "h20", "--phase", "prefill", "--plan", "tp8-ep8"] + W4A8) == 0
    assert "TTFT" in capsys.readouterr().out


def test_does_not_fit_is_one_line_error(capsys):
    with pytest.raises(FractalError, match="does not fit on h20"):
        main(BASE)  # FP8 MoE weights alone are ~82 GB per GPU at EP8 with attention replicated by DP
    assert fractal_main(["report"] + BASE) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fractal report: error: plan dp8-ep8 does not fit") and "\n" not in err


def test_plan_that_does_not_divide(capsys):
    assert fractal_main(["report", "--model", "llama-3.1-8b", "--gpu", "h100", "--plan", "tp3"]) == 2
    assert "tp3 does not divide" in capsys.readouterr().err


def test_seed_tables_cli(capsys):
    assert main(["--seed-tables"]) == 0
    out = capsys.readouterr().out
    assert "166912" in out and "Footnotes" in out and "self-consistent rows agree" in out


def test_no_torch_imported():
    code = ("import sys, fractal.perf.floor, fractal.perf.cli, fractal.perf.seed_tables, fractal.planner.cli, "
            "fractal.planner.search; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
