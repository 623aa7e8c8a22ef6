"""One streamed request against an OpenAI-compatible server, timed the way `vllm bench serve` times it.

TTFT: send -> the first chunk that carries generated text. ITL: gaps between later chunks that carry
text (a chunk holding several tokens counts as one gap). E2E: send -> the end of the stream. Output
tokens: the server's `usage.completion_tokens` (asked for with stream_options.include_usage), else
the local tokenizer's count of the text, else the number of text chunks. Clock: time.perf_counter.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0  # the server's usage.prompt_tokens when given, else the length the prompt was built to
    output_tokens: int = 0
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2el_s: float = 0.0
    start_s: float = 0.0  # perf_counter at send
    text: str = ""
    error: str = ""

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1); None for a single output token."""
        if self.output_tokens < 2:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)


def build_payload(chat: bool, model: str, prompt: str, max_tokens: int, *, ignore_eos: bool,
                  temperature: float = 0.0, extra: dict | None = None) -> dict:
    payload = {"model": model, "max_tokens": max_tokens, "temperature": temperature, "stream": True,
               "stream_options": {"include_usage": True}}
    if chat:
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if ignore_eos:
        payload["ignore_eos"] = True
    payload.update(extra or {})
    return payload


def _chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, *, chat: bool, prompt_len: int,
                       headers: dict | None = None, tokenizer=None) -> RequestResult:
    """POST `payload` to `url` (a full endpoint URL), read the SSE stream, return timings."""
    result = RequestResult(prompt_len=prompt_len)
    start = result.start_s = time.perf_counter()
    last = start
    pieces: list[str] = []
    usage = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode("utf-8", "replace")
                result.error = f"HTTP {resp.status_code}: {body[:500]}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:500]
                    return result
                if chunk.get("usage"):
                    usage = chunk["usage"]
                text = _chunk_text(chunk, chat)
                if not text:
                    continue
                now = time.perf_counter()
                if not pieces:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                pieces.append(text)
        result.e2el_s = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.text = "".join(pieces)
    if usage and usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
        if usage.get("prompt_tokens") is not None:
            result.prompt_len = int(usage["prompt_tokens"])
    elif tokenizer is not None:
        result.output_tokens = len(tokenizer.encode(result.text, add_special_tokens=False))
    else:
        result.output_tokens = len(pieces)
    if not pieces and result.output_tokens == 0:
        result.error = "the stream carried no generated text"
        return result
    if not pieces:  # tokens without visible text (e.g. only special tokens): count TTFT at the end
        result.ttft_s = result.e2el_s
    result.success = True
    return result
