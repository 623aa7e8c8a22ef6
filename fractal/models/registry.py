"""Architecture name (config.json "architectures") -> model class."""
from __future__ import annotations

from fractal.errors import FractalError
from fractal.models.base import CausalLM
from fractal.models.config import ARCHITECTURES
from fractal.models.deepseek import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from fractal.models.llama import LlamaForCausalLM, Qwen3ForCausalLM
from fractal.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
}
assert set(MODEL_CLASSES) == set(ARCHITECTURES)


def get_model_class(architecture: str) -> type[CausalLM]:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        raise FractalError(f"architecture {architecture!r} is not supported; valid: {sorted(MODEL_CLASSES)}") from None
