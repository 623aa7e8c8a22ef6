"""fractal: LLM inference for DeepSeek-family MoE models, sized and steered by a four-resource model.

`fractal.LLM` and `fractal.SamplingParams` mirror vLLM's offline API. They are imported lazily so that
the pure-Python parts (spec, perf, planner) never pull in torch.
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name):
    if name == "SamplingParams":
        from fractal.sampling_params import SamplingParams

        return SamplingParams
    if name in ("RequestOutput", "CompletionOutput"):
        from fractal import outputs

        return getattr(outputs, name)
    if name == "LLM":
        from fractal.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'fractal' has no attribute {name!r}")
