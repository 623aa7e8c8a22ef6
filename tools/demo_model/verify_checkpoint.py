"""Reload a trained checkpoint here and compare its logits with what the training run recorded.

``train.py`` writes ``train_summary.json`` whose ``check`` entry holds the loss and last-position
logits of a fixed held-out input, computed after reloading the saved bf16 checkpoint in fp32.
Running the same computation on this machine (another transformers version, another device)
must agree to float32 rounding; a key whose meaning changed between versions would not.

Usage::

    python3 tools/demo_model/verify_checkpoint.py --model fractal/demo/model --summary runs/demo/train_summary.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import check_logits  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)
    parser.add_argument("--atol", type=float, default=2e-3)
    args = parser.parse_args(argv)
    recorded = json.loads(args.summary.read_text())["check"]
    here = check_logits(args.model, recorded["input_ids"])
    diffs = {
        "loss": abs(here["loss"] - recorded["loss"]),
        "last_logits_first8": max(abs(a - b) for a, b in zip(here["last_logits_first8"], recorded["last_logits_first8"])),
        "last_top5_logits": max(abs(a - b) for a, b in zip(here["last_top5_logits"], recorded["last_top5_logits"])),
    }
    same_top = here["last_top5_ids"] == recorded["last_top5_ids"]
    print(json.dumps({"recorded": recorded["loss"], "here": here["loss"], "max_abs_diff": diffs,
                      "same_top5_ids": same_top}, indent=1))
    ok = same_top and all(v <= args.atol for v in diffs.values())
    print("MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
