"""Engine logprobs -> the two OpenAI shapes.

The engine gives, per generated token, a dict {token_id: logprob} holding the sampled token and the
top-k (k + 1 entries when the sampled token is outside the top-k). Token strings are the decoded text
of the single token (a byte-level piece of a multi-byte character decodes to U+FFFD; the chat shape's
`bytes` then holds that replacement character's UTF-8, as decoding lost the raw bytes).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any


class TokenText:
    """Cached single-token decoding (the same ids recur across requests)."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        self.text = lru_cache(maxsize=1 << 16)(self._decode)

    def _decode(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"<{token_id}>"
        return self._tokenizer.decode([token_id], skip_special_tokens=False)


def _top(entry: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:k]


def completion_logprobs(token_ids: list[int], entries: list[dict[int, float]], k: int, names: TokenText,
                        text_offset: int) -> dict:
    """Legacy /v1/completions shape: tokens, token_logprobs, top_logprobs (k per token), text_offset."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for token_id, entry in zip(token_ids, entries):
        text = names.text(token_id)
        tokens.append(text)
        token_logprobs.append(_finite(entry.get(token_id)))
        top: dict[str, float | None] = {}
        for t, lp in _top(entry, k):  # ids that decode alike share a key: keep the likelier
            top.setdefault(names.text(t), _finite(lp))
        top_logprobs.append(top)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(token_ids: list[int], entries: list[dict[int, float]], k: int, names: TokenText) -> dict:
    """Chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], "refusal": None}."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        text = names.text(token_id)
        content.append({
            "token": text,
            "logprob": _finite(entry.get(token_id)),
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": names.text(t), "logprob": _finite(lp), "bytes": list(names.text(t).encode("utf-8"))}
                for t, lp in _top(entry, k)
            ],
        })
    return {"content": content, "refusal": None}


def _finite(value: float | None) -> float | None:
    """JSON has no -inf: clamp to the most negative float OpenAI clients accept (as vLLM does)."""
    if value is None:
        return None
    value = float(value)
    return max(value, -9999.0) if value == value else -9999.0
