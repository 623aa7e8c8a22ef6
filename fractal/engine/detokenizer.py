"""Incremental detokenisation with stop strings, one object per generated sequence.

Text is decoded with the prefix/read-offset technique: each new token decodes a small window
`ids[prefix_offset:]` and the part beyond `decode(ids[prefix_offset:read_offset])` is new text; while the
window's text ends in U+FFFD (a character whose bytes span tokens not all generated yet) nothing is emitted,
so no replacement character appears in the middle of a stream. The window starts with up to 5 prompt tokens
for context (tokenizers that strip a leading space need it), unless those end in a partial character.

Stop strings: the visible text holds back the longest tail that is a proper prefix of a stop string, so a
streamed delta never contains stop text. When a stop string completes (only once min_tokens are generated,
as vLLM does), the text is cut before it, or after it with include_stop_str_in_output (then nothing is held
back). The token that ends a request, EOS (unless ignore_eos) or one of stop_token_ids, adds no text (unless
include_stop_str_in_output) and, like the max_tokens-th token, flushes what was held back. A request that
ends any other way (context length, abort) calls `flush()` for the rest.

Invariants: the concatenation of all deltas equals `.text` at every point; with no stop string hit, after
the last token `.text == tokenizer.decode(output ids)` for byte-level BPE tokenizers.
"""
from __future__ import annotations

from fractal.errors import FractalError
from fractal.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated ids one at a time with `append`; read `.text` (visible output so far)."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: set[int] | None = None):
        self.tokenizer = tokenizer
        self.params = params
        self.stop_strings: list[str] = list(params.stop or [])
        if tokenizer is None and self.stop_strings:
            raise FractalError(f"stop={self.stop_strings!r} needs a tokenizer, and this model has none")
        self._stop_ids = set(params.stop_token_ids or [])
        if not params.ignore_eos:
            self._stop_ids |= set(eos_token_ids if eos_token_ids is not None
                                  else getattr(tokenizer, "eos_token_ids", set()) or set())
        self._skip = params.skip_special_tokens
        self._hold_back = bool(self.stop_strings) and not params.include_stop_str_in_output
        self.num_tokens = 0
        self.finished = False
        self.stop_reason: str | None = None
        self._full = ""  # all decoded output text (nothing cut, nothing held back)
        self._emitted = 0  # len of the visible prefix of _full
        self._checked = 0  # _full[:_checked] was already searched for stop strings
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        if tokenizer is not None and prompt_token_ids:
            context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
            if not tokenizer.decode(context, skip_special_tokens=self._skip).endswith(_REPLACEMENT):
                self._ids = context
                self._read_offset = len(context)

    @property
    def text(self) -> str:
        """The visible output text so far (equal to the concatenation of all deltas)."""
        return self._full[: self._emitted]

    def append(self, token_id: int) -> tuple[str, str | None]:
        """Add one generated id; return (new visible text, the stop string hit or None)."""
        if self.finished:
            return "", None
        self.num_tokens += 1
        if self.tokenizer is None:
            return "", None
        terminal = token_id in self._stop_ids
        max_tokens = self.params.max_tokens
        last = terminal or (max_tokens is not None and self.num_tokens >= max_tokens)
        if not terminal or self.params.include_stop_str_in_output:
            self._ids.append(token_id)
            self._full += self._decode_new()
        if last:
            self._full += self._decode_pending()
        return self._advance(flush=last)

    def flush(self) -> str:
        """End of the request: release held-back text and any undecodable tail; return the delta."""
        if self.finished or self.tokenizer is None:
            self.finished = True
            return ""
        self._full += self._decode_pending()
        delta, _ = self._advance(flush=True)
        return delta

    # ---- decoding -----------------------------------------------------------------------------------------
    def _decode_new(self) -> str:
        """New text of the window, or "" while it ends in an incomplete character."""
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=self._skip)
        new_text = decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._trim()
            return new_text[len(prefix_text):]
        return ""

    def _decode_pending(self) -> str:
        """Whatever the window holds beyond what was emitted, replacement characters included."""
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], skip_special_tokens=self._skip)
        new_text = decode(self._ids[self._prefix_offset:], skip_special_tokens=self._skip)
        self._prefix_offset = self._read_offset = len(self._ids)
        self._trim()
        return new_text[len(prefix_text):]

    def _trim(self) -> None:
        """Drop ids before the window so memory stays constant."""
        if self._prefix_offset > 0:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0

    # ---- stop strings and visible text --------------------------------------------------------------------
    def _advance(self, flush: bool) -> tuple[str, str | None]:
        start = self._emitted
        stop = self._find_stop() if self.stop_strings else None
        if stop is not None:
            index, stop_str = stop
            cut = index + len(stop_str) if self.params.include_stop_str_in_output else index
            self._full = self._full[: max(cut, self._emitted)]
            self._emitted = len(self._full)
            self.finished = True
            self.stop_reason = stop_str
            return self._full[start:], stop_str
        if flush:
            self.finished = True
            self._emitted = len(self._full)
        else:
            self._emitted = len(self._full) - (self._held_back_length() if self._hold_back else 0)
            self._emitted = max(self._emitted, start)
        return self._full[start:self._emitted], None

    def _find_stop(self) -> tuple[int, str] | None:
        """Earliest stop string that ends in the text added since the last check (longest on a tie)."""
        checked, self._checked = self._checked, len(self._full)
        if self.num_tokens < self.params.min_tokens:
            return None
        best: tuple[int, str] | None = None
        for stop_str in self.stop_strings:
            index = self._full.find(stop_str, max(0, checked - len(stop_str) + 1))
            if index >= 0 and (best is None or (index, -len(stop_str)) < (best[0], -len(best[1]))):
                best = (index, stop_str)
        return best

    def _held_back_length(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        longest = max(len(s) for s in self.stop_strings) - 1
        for length in range(min(longest, len(self._full)), 0, -1):
            tail = self._full[-length:]
            if any(len(s) > length and s.startswith(tail) for s in self.stop_strings):
                return length
        return 0
