"""`fractal.LLM`: the offline API, shaped like vLLM's.

    llm = LLM(model="path/to/model", max_num_seqs=32)
    outs = llm.generate(["Hello", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0))
    outs[0].outputs[0].text

Every keyword other than `model` is an `EngineConfig` field.
"""
from __future__ import annotations

import itertools
import sys
from typing import Iterator

from fractal.engine.config import EngineConfig
from fractal.engine.engine import LLMEngine
from fractal.engine.stats import EngineStats
from fractal.errors import FractalError
from fractal.outputs import RequestOutput
from fractal.sampling_params import SamplingParams


def _as_prompt_list(prompts) -> list:
    """One prompt (str, dict, list of ids) or a list of them -> a list of prompts."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]  # a single prompt given as token ids
        return list(prompts)
    raise FractalError(
        f"prompts of type {type(prompts).__name__} are invalid: give a string, a dict, or a list of them"
    )


class LLM:
    def __init__(self, model: str, **engine_kwargs):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model, **engine_kwargs))
        self._counter = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def _params_list(self, sampling_params, count: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count:
            raise FractalError(f"got {len(params)} sampling params for {count} prompts; give one or one per prompt")
        return params

    def generate(self, prompts, sampling_params=None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; results in prompt order. Bad input raises before anything runs."""
        prompt_list = _as_prompt_list(prompts)
        params = self._params_list(sampling_params, len(prompt_list))
        ids: list[str] = []
        try:
            for prompt, p in zip(prompt_list, params):
                request_id = f"llm-{next(self._counter)}"
                self.engine.add_request(request_id, prompt, p, output_kind="final")
                ids.append(request_id)
        except FractalError as exc:
            for request_id in ids:
                self.engine.abort_request(request_id)
            self.engine.discard_outputs(set(ids))
            raise FractalError(f"prompt {len(ids)}: {exc}") from exc

        wanted = set(ids)
        finished: dict[str, RequestOutput] = {}
        while len(finished) < len(ids):
            for out in self.engine.step():
                if out.finished and out.request_id in wanted:
                    finished[out.request_id] = out
                    if use_tqdm:
                        print(f"\rfinished {len(finished)}/{len(ids)}", end="", file=sys.stderr)
            if not self.engine.has_unfinished_requests() and len(finished) < len(ids):
                raise RuntimeError("engine stopped with requests unfinished")
        if use_tqdm:
            print(file=sys.stderr)
        return [finished[i] for i in ids]

    def generate_stream(self, prompt, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's cumulative RequestOutput each step it gets tokens; the last one is finished.

        Closing the generator early aborts the request.
        """
        request_id = f"llm-{next(self._counter)}"
        self.engine.add_request(request_id, prompt, sampling_params or SamplingParams())
        done = False
        try:
            while not done:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        done = out.finished
                        yield out
        finally:
            if not done:
                self.engine.abort_request(request_id)
                self.engine.discard_outputs({request_id})
