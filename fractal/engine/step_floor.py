"""The four-resource floor of each engine step (fractal.perf.floor), for live metrics. Pure Python.

Built once from the model directory (its config.json becomes a ModelSpec) and a GPU name; called with
the StepShape of every step. Weight and KV dtypes follow the engine's dtype.
"""
from __future__ import annotations

from fractal.engine.stats import StepShape

_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def floor_dtype(dtype) -> str:
    """fractal.spec's name ("fp32", "bf16", "fp16") of a torch dtype or of its name ("float32",
    "torch.float32"); "bf16" for anything else."""
    return _DTYPE_NAMES.get(str(dtype).removeprefix("torch."), "bf16")


class StepFloorModel:
    def __init__(self, model_dir: str, gpu: str, dtype_name: str):
        from fractal.perf.floor import load_gpu, load_model_spec

        self.model = load_model_spec(model_dir)
        self.gpu = load_gpu(gpu)
        self.dtype = floor_dtype(dtype_name)
        self(StepShape(num_seqs=1, new_tokens=[1], context_lens=[0]))  # fail at start-up, not mid-run

    def __call__(self, shape: StepShape):
        """The Floor (floor_s, bound, flops, bytes, ...) of a step of this shape."""
        from fractal.perf.floor import step_floor

        return step_floor(
            self.model, self.gpu, num_seqs=shape.num_seqs, new_tokens_per_seq=list(shape.new_tokens),
            context_len=list(shape.context_lens), weight_dtype=self.dtype, kv_dtype=self.dtype,
        )
