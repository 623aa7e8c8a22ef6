"""A tiny random DeepSeek-V2 model with a tiny BPE tokenizer, for server and benchmark tests.

Needs transformers (a test dependency): the weights are built by `fractal.models.testing`.
"""
from __future__ import annotations

from pathlib import Path


def make_tiny_serve_model(path: str | Path, max_position_embeddings: int = 1024, seed: int = 0) -> str:
    """Write a tiny random DeepSeek-V2 (MLA + MoE with shared experts) and its tokenizer into `path`.

    The vocabulary is the tokenizer's 512 ids (bos 0, eos 1, as both the model config and the tokenizer
    say). Returns the path as a string.
    """
    from fractal.engine.tokenizer_testing import make_tiny_tokenizer
    from fractal.models.testing import make_tiny_model

    make_tiny_model("deepseek_v2", path, seed=seed, vocab_size=512,
                    max_position_embeddings=max_position_embeddings)
    make_tiny_tokenizer(str(path), vocab_size=512)
    return str(path)
