"""What both generation endpoints share: model names, admission, tokenisation, sampling settings,
length checks, and running one or more engine requests to completion or as a stream.

Everything here runs on the event loop except tokenisation, which goes to a worker thread
(`asyncio.to_thread`) so a long prompt never delays other clients' streamed tokens.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Callable

from starlette.requests import Request
from starlette.responses import StreamingResponse

from fractal.errors import FractalError
from fractal.outputs import RequestOutput
from fractal.sampling_params import SamplingParams
from fractal.serve.async_engine import AsyncEngine, RequestStream
from fractal.serve.config import ServerConfig
from fractal.serve.errors import APIError, from_fractal_error
from fractal.serve.logprobs import TokenText
from fractal.serve.protocol import SamplingFields


def sse(data: dict | str) -> str:
    """One server-sent event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response that runs `on_close` however it ends (finished, client gone, error)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Generation:
    """The engine requests of one HTTP request (one per prompt) and their clean-up.

    `close()` is idempotent: it aborts every request that has not finished (freeing its KV blocks) and
    gives the admission slots back.
    """

    def __init__(self, serving: "OpenAIServing", response_id: str, request_ids: list[str]):
        self.serving = serving
        self.response_id = response_id
        self.request_ids = request_ids
        self.streams: list[RequestStream] = []
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        started = {s.request_id for s in self.streams}
        for stream in self.streams:
            if not stream.finished:
                self.serving.engine.abort(stream.request_id)
        for request_id in self.request_ids:  # submitted but not acknowledged yet
            if request_id not in started:
                self.serving.engine.abort(request_id)
        self.serving.engine.in_flight -= len(self.request_ids)
        self.serving.engine.metrics.in_flight.set(self.serving.engine.in_flight)

    async def start(self, prompts: list[list[int]], params: list[SamplingParams], endpoint: str,
                    arrival: float) -> None:
        """Submit every prompt (with its own params); on any failure abort the ones already in and re-raise."""
        try:
            for request_id, ids, p in zip(self.request_ids, prompts, params):
                self.streams.append(await self.serving.engine.add(
                    request_id, ids, p, endpoint=endpoint, arrival=arrival))
        except BaseException:
            self.close()
            raise

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) as they come, until every request finished."""
        if len(self.streams) == 1:
            stream = self.streams[0]
            while not stream.finished:
                yield 0, await stream.next()
            return
        pending = {i: asyncio.ensure_future(s.next()) for i, s in enumerate(self.streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
                for i in sorted(i for i, fut in pending.items() if fut in done):
                    out = pending.pop(i).result()
                    yield i, out
                    if not self.streams[i].finished:
                        pending[i] = asyncio.ensure_future(self.streams[i].next())
        finally:
            for fut in pending.values():
                fut.cancel()

    async def final(self) -> list[RequestOutput]:
        """The finished output of every prompt."""
        last: list[RequestOutput | None] = [None] * len(self.streams)
        async for i, out in self.outputs():
            last[i] = out
        return [out for out in last if out is not None]


class StreamCursor:
    """How much of each choice's cumulative output a stream has sent (text characters, tokens), by choice key."""

    def __init__(self) -> None:
        self.sent_text: dict = {}
        self.sent_tokens: dict = {}
        self.done: set = set()

    def advance(self, key, comp) -> tuple[str, list[int], int] | None:
        """(new text, new token ids, index of the first new token) of `comp` (a CompletionOutput) since the
        last call, marking them sent; None when nothing changed or the choice already finished."""
        if key in self.done:
            return None
        text = comp.text[self.sent_text.get(key, 0):]
        first_new = self.sent_tokens.get(key, 0)
        new_ids = comp.token_ids[first_new:]
        if not text and not new_ids and comp.finish_reason is None:
            return None
        self.sent_text[key] = len(comp.text)
        self.sent_tokens[key] = len(comp.token_ids)
        if comp.finish_reason is not None:
            self.done.add(key)
        return text, new_ids, first_new

    @property
    def num_tokens(self) -> int:
        """Tokens sent over every choice."""
        return sum(self.sent_tokens.values())


async def until_disconnect(raw_request: Request) -> None:
    """Returns when the client hangs up (the request body must already be read)."""
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServing:
    """Shared plumbing of /v1/completions and /v1/chat/completions."""

    def __init__(self, engine: AsyncEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.tokenizer = engine.tokenizer
        self.token_text = TokenText(engine.tokenizer)  # single-token strings for logprobs, cached

    # ---- checks ---------------------------------------------------------------------------------------------
    def model_name(self, requested: str | None) -> str:
        if requested is None:
            return self.config.model_names[0]
        if requested not in self.config.model_names:
            raise APIError(404, f"The model `{requested}` does not exist; this server serves "
                                f"{', '.join(self.config.model_names)}", param="model", code="model_not_found")
        return requested

    def need_tokenizer(self, what: str) -> None:
        if self.tokenizer is None:
            raise APIError(400, f"this model has no tokenizer, so {what} cannot be used; send token ids "
                                "to /v1/completions instead", code="no_tokenizer")

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.need_tokenizer("text prompts")
        try:
            return await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens)
        except Exception as exc:  # the tokenizer refused this text: the client's input is at fault
            raise APIError(400, f"the prompt could not be tokenized: {exc}", param="prompt",
                           code="invalid_value") from exc

    def check_token_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param} is empty: give at least one token", param=param, code="invalid_value")
        vocab = getattr(self.tokenizer, "vocab_size", None)
        if vocab and any(not 0 <= t < vocab for t in ids):
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise APIError(400, f"{param} holds token id {bad}, outside the vocabulary [0, {vocab})",
                           param=param, code="invalid_value")

    def resolve_max_tokens(self, prompt_len: int, max_tokens: int | None, prompt_param: str) -> int:
        """max_tokens after the context checks; None means 'up to the context length'."""
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, the "
                                f"{prompt_param} is {prompt_len} tokens, which leaves no room to generate. "
                                "Shorten the prompt.", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            return limit - prompt_len
        if isinstance(max_tokens, int) and max_tokens >= 1 and prompt_len + max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you "
                                f"requested {prompt_len + max_tokens} tokens ({prompt_len} in the {prompt_param}, "
                                f"{max_tokens} in the completion). Reduce max_tokens to at most "
                                f"{limit - prompt_len}.", param="max_tokens", code="context_length_exceeded")
        return max_tokens

    def sampling_params(self, req: SamplingFields, max_tokens: int, logprobs: int | None) -> SamplingParams:
        if req.n > self.config.max_n:
            raise APIError(400, f"n={req.n} is invalid: this server allows at most {self.config.max_n} "
                                "choices per request", param="n", code="invalid_value")
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias", code="unsupported")
        try:
            return SamplingParams(
                n=req.n,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k,
                min_p=req.min_p,
                presence_penalty=req.presence_penalty,
                frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty,
                seed=req.seed,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
            )
        except FractalError as exc:
            raise from_fractal_error(exc) from exc

    # ---- admission ------------------------------------------------------------------------------------------
    def admit(self, count: int, prefix: str) -> Generation:
        """Reserve `count` slots or answer 503 (queue full / draining)."""
        engine = self.engine
        if engine.draining:
            raise APIError(503, "the server is shutting down and takes no new requests", code="shutting_down")
        if engine.in_flight + count > self.config.capacity:
            engine.metrics.rejected.inc()
            raise APIError(503, f"the server is overloaded: {engine.in_flight} requests in flight, capacity "
                                f"{self.config.capacity} ({self.config.max_running} running + "
                                f"{self.config.max_queue} queued); retry later", code="server_overloaded",
                           headers={"Retry-After": "1"})
        engine.in_flight += count
        engine.metrics.in_flight.set(engine.in_flight)
        base = f"{prefix}-{uuid.uuid4().hex}"
        ids = [base] if count == 1 else [f"{base}-{i}" for i in range(count)]
        return Generation(self, base, ids)

    async def run_to_end(self, generation: Generation, raw_request: Request) -> list[RequestOutput]:
        """Collect the final outputs; if the client hangs up first, abort (close) and raise a 499 APIError."""
        collect = asyncio.ensure_future(generation.final())
        hangup = asyncio.ensure_future(until_disconnect(raw_request))
        try:
            done, _ = await asyncio.wait({collect, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if collect in done:
                return collect.result()
            raise APIError(499, "the client closed the connection before the response", code="client_closed")
        finally:
            for task in (collect, hangup):
                task.cancel()
            generation.close()


def now_s() -> int:
    return int(time.time())
