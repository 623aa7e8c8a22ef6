"""POST /v1/chat/completions: messages rendered by the tokenizer's chat template, then one engine request.

The template is the model's own (tokenizer_config.json's `chat_template` or chat_template.jinja), or
`fractal serve --chat-template FILE`, or, for models without one, fractal's documented fallback
(`fractal.engine.tokenizer.DEFAULT_CHAT_TEMPLATE`: "<|role|>\\n{content}\\n" per message, then
"<|assistant|>\\n"). The rendered text is encoded without adding special tokens: the template writes them.
"""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

from fastapi.responses import JSONResponse
from starlette.requests import Request
from starlette.responses import Response

from fractal.errors import FractalError
from fractal.outputs import RequestOutput
from fractal.serve.errors import APIError, from_fractal_error
from fractal.serve.logprobs import chat_logprobs
from fractal.serve.protocol import ChatCompletionRequest
from fractal.serve.serving import Generation, OpenAIServing, SSEResponse, StreamCursor, now_s, sse

ENDPOINT = "chat"


def _check_supported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise APIError(400, "tools are not supported by this server", param="tools", code="unsupported")
    if req.response_format is not None and req.response_format.type != "text":
        raise APIError(400, f"response_format type {req.response_format.type!r} is not supported: only 'text'",
                       param="response_format", code="unsupported")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value")


async def _encode_chat(serving: OpenAIServing, req: ChatCompletionRequest) -> list[int]:
    serving.need_tokenizer("chat completions")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
    try:
        return await asyncio.to_thread(serving.tokenizer.encode_chat, messages, req.add_generation_prompt)
    except FractalError as exc:
        error = from_fractal_error(exc)
        error.param = "messages"
        raise error from exc


async def create_chat_completion(serving: OpenAIServing, req: ChatCompletionRequest, raw_request: Request) -> Response:
    arrival = time.monotonic()
    model = serving.model_name(req.model)
    _check_supported(req)
    ids = await _encode_chat(serving, req)
    serving.check_token_ids(ids, "messages")
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = serving.resolve_max_tokens(len(ids), requested, "messages")
    top = (req.top_logprobs or 0) if req.logprobs else None
    params = serving.sampling_params(req, max_tokens, top)
    generation = serving.admit(1, "chatcmpl")
    await generation.start([ids], [params], ENDPOINT, arrival)
    view = _View(serving, req, model, generation.response_id, len(ids))
    if req.stream:
        return SSEResponse(view.stream(generation), generation.close)
    outputs = await serving.run_to_end(generation, raw_request)
    return JSONResponse(view.full(outputs[0]))


class _View:
    """Turns engine outputs into chat bodies and chunks."""

    def __init__(self, serving: OpenAIServing, req: ChatCompletionRequest, model: str, response_id: str,
                 prompt_tokens: int):
        self.req = req
        self.model = model
        self.id = response_id
        self.created = now_s()
        self.prompt_tokens = prompt_tokens
        self.names = serving.token_text
        self.top = (req.top_logprobs or 0) if req.logprobs else None
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def _usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def full(self, out: RequestOutput) -> dict:
        choices = []
        for comp in sorted(out.outputs, key=lambda c: c.index):
            logprobs = None
            if self.top is not None and comp.logprobs is not None:
                logprobs = chat_logprobs(comp.token_ids, comp.logprobs, self.top, self.names)
            choices.append({"index": comp.index, "message": {"role": "assistant", "content": comp.text},
                            "logprobs": logprobs, "finish_reason": comp.finish_reason,
                            "stop_reason": comp.stop_reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self._usage(sum(len(c.token_ids) for c in out.outputs))}

    def _chunk(self, index: int, delta: dict, logprobs: dict | None, finish_reason: str | None) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    async def stream(self, generation: Generation) -> AsyncIterator[str]:
        cursor = StreamCursor()
        try:
            for j in range(self.req.n):
                yield sse(self._chunk(j, {"role": "assistant", "content": ""}, None, None))
            async for _, out in generation.outputs():
                for comp in out.outputs:
                    delta = cursor.advance(comp.index, comp)
                    if delta is None:
                        continue
                    text, new_ids, first_new = delta
                    logprobs = None
                    if self.top is not None and comp.logprobs is not None and new_ids:
                        logprobs = chat_logprobs(new_ids, comp.logprobs[first_new:], self.top, self.names)
                    yield sse(self._chunk(comp.index, {"content": text} if text else {}, logprobs, comp.finish_reason))
            if self.include_usage:
                yield sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "choices": [], "usage": self._usage(cursor.num_tokens)})
        except APIError as exc:
            yield sse(exc.body())
        finally:
            generation.close()
        yield "data: [DONE]\n\n"
