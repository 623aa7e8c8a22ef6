"""POST /v1/completions: text or token-id prompts (one or many), streaming or not, legacy logprobs.

Choice indices follow OpenAI: prompt p's j-th choice has index p * n + j. `usage.prompt_tokens`
counts each prompt once (not once per choice).
"""
from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from fractal.outputs import RequestOutput
from fractal.serve.errors import APIError
from fractal.serve.logprobs import completion_logprobs
from fractal.serve.protocol import CompletionRequest
from fractal.serve.serving import Generation, OpenAIServing, SSEResponse, StreamCursor, now_s, sse

ENDPOINT = "completions"


async def _prompts(serving: OpenAIServing, req: CompletionRequest) -> list[tuple[list[int], str | None]]:
    """[(token ids, text or None)] for each prompt."""
    prompt = req.prompt
    if isinstance(prompt, str):
        texts: list[str] | None = [prompt]
    elif prompt and all(isinstance(p, str) for p in prompt):
        texts = list(prompt)
    else:
        texts = None
    if texts is not None:
        if any(not t for t in texts):
            raise APIError(400, "prompt is empty: give some text or token ids", param="prompt", code="invalid_value")
        return [(await serving.encode(t, add_special_tokens=True), t) for t in texts]
    if not prompt:
        raise APIError(400, "prompt is empty: give some text or token ids", param="prompt", code="invalid_value")
    id_lists = [prompt] if isinstance(prompt[0], int) else prompt
    for ids in id_lists:
        serving.check_token_ids(ids, "prompt")
    return [(list(ids), None) for ids in id_lists]


def _check_supported(req: CompletionRequest) -> None:
    if req.suffix:
        raise APIError(400, "suffix is not supported", param="suffix", code="unsupported")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, f"best_of={req.best_of} is not supported: only best_of equal to n", param="best_of",
                       code="unsupported")
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo together with logprobs needs prompt logprobs, which this server does not "
                            "compute", param="echo", code="unsupported")


async def create_completion(serving: OpenAIServing, req: CompletionRequest, raw_request: Request) -> Response:
    arrival = time.monotonic()
    model = serving.model_name(req.model)
    _check_supported(req)
    prompts = await _prompts(serving, req)
    params = [serving.sampling_params(req, serving.resolve_max_tokens(len(ids), req.max_tokens, "prompt"),
                                      req.logprobs) for ids, _ in prompts]
    generation = serving.admit(len(prompts), "cmpl")
    await generation.start([ids for ids, _ in prompts], params, ENDPOINT, arrival)
    view = _View(serving, req, model, generation.response_id, prompts)
    if req.stream:
        return SSEResponse(view.stream(generation), generation.close)
    outputs = await serving.run_to_end(generation, raw_request)
    return JSONResponse(view.full(outputs))


class _View:
    """Turns engine outputs into completion bodies and chunks."""

    def __init__(self, serving: OpenAIServing, req: CompletionRequest, model: str, response_id: str,
                 prompts: list[tuple[list[int], str | None]]):
        self.serving = serving
        self.req = req
        self.model = model
        self.id = response_id
        self.created = now_s()
        self.prompts = prompts
        self.names = serving.token_text

    def _echo(self, p: int) -> str:
        if not self.req.echo:
            return ""
        ids, text = self.prompts[p]
        if text is not None:
            return text
        return "" if self.serving.tokenizer is None else self.serving.tokenizer.decode(ids)

    def _usage(self, completion_tokens: int) -> dict:
        prompt_tokens = sum(len(ids) for ids, _ in self.prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def full(self, outputs: list[RequestOutput]) -> dict:
        choices, generated = [], 0
        for p, out in enumerate(outputs):
            for comp in out.outputs:
                generated += len(comp.token_ids)
                logprobs = None
                if self.req.logprobs is not None and comp.logprobs is not None:
                    logprobs = completion_logprobs(comp.token_ids, comp.logprobs, self.req.logprobs, self.names, 0)
                choices.append({"index": p * self.req.n + comp.index, "text": self._echo(p) + comp.text,
                                "logprobs": logprobs, "finish_reason": comp.finish_reason,
                                "stop_reason": comp.stop_reason})
        choices.sort(key=lambda c: c["index"])
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(generated)}

    def _chunk(self, index: int, text: str, logprobs: dict | None, finish_reason: str | None,
               stop_reason=None) -> dict:
        chunk = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
                              "stop_reason": stop_reason}]}
        if self.req.stream_options and self.req.stream_options.include_usage:
            chunk["usage"] = None
        return chunk

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        n = self.req.n
        cursor = StreamCursor()
        offsets: dict[tuple[int, int], int] = {}
        try:
            for p in range(len(self.prompts)):
                echo = self._echo(p)
                if echo:
                    for j in range(n):
                        yield sse(self._chunk(p * n + j, echo, None, None))
            async for p, out in generation.outputs():
                for comp in out.outputs:
                    key = (p, comp.index)
                    delta = cursor.advance(key, comp)
                    if delta is None:
                        continue
                    text, new_ids, first_new = delta
                    logprobs = None
                    if self.req.logprobs is not None and comp.logprobs is not None:
                        logprobs = completion_logprobs(new_ids, comp.logprobs[first_new:], self.req.logprobs,
                                                       self.names, offsets.get(key, 0))
                        if logprobs["text_offset"]:
                            last = logprobs["tokens"][-1]
                            offsets[key] = logprobs["text_offset"][-1] + len(last)
                    finish = comp.finish_reason
                    yield sse(self._chunk(p * n + comp.index, text, logprobs, finish,
                                          comp.stop_reason if finish else None))
            if self.req.stream_options and self.req.stream_options.include_usage:
                yield sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                           "choices": [], "usage": self._usage(cursor.num_tokens)})
        except APIError as exc:
            yield sse(exc.body())
        finally:
            generation.close()
        yield "data: [DONE]\n\n"
