"""Where a model lives: a directory, a config.json file, or the name of a shipped config. Pure Python (no torch)."""
from __future__ import annotations

import os
import tempfile

from fractal.errors import FractalError


def config_file_for(model: str) -> str:
    """The config.json behind a config file path or a shipped config name (e.g. "deepseek-v2-lite")."""
    if os.path.isfile(model):
        return model
    from fractal.spec.model import MODELS_DIR, shipped_models

    path = str(MODELS_DIR / f"{model.lower()}.json")
    if not os.path.isfile(path):
        raise FractalError(f"model {model!r} is neither a model directory, a config.json nor a shipped "
                           f"config; shipped: {', '.join(shipped_models())}")
    return path


def resolve_model_dir(model: str) -> tuple[str, bool]:
    """(model directory, made_up): a directory as is; a config.json path or a shipped config name becomes a
    temporary directory holding that config alone (weights: load_format="dummy")."""
    if os.path.isdir(model):
        return model, False
    path = config_file_for(model)
    tmp = tempfile.mkdtemp(prefix="fractal-model-")
    with open(path, encoding="utf-8") as src, open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as dst:
        dst.write(src.read())
    return tmp, True
