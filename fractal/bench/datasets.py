"""Benchmark prompts: length distributions and prompt text of a given token length. Pure Python.

Length distributions (input and output alike):
- fixed ("random" in `vllm bench serve`): every request has exactly the given length;
- uniform: integers uniform in [len * (1 - range_ratio), len * (1 + range_ratio)];
- sharegpt-like: lognormal with the given *mean* and shape sigma (input 1.0, output 0.9 by default,
  close to the ShareGPT conversations serving papers use: many short turns, a long tail), clipped to
  [min_len, max_len].

Prompt text: a remote server's tokenizer is not at hand, so with a local tokenizer (`--tokenizer`)
the text is cut until it encodes to exactly the wanted number of tokens (special tokens not counted);
without one it is that many words from a fixed English word list, about one token per word for
common BPE vocabularies. A random word starts each prompt so prompts do not share a cacheable prefix.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from fractal.errors import FractalError

DATASETS = ("fixed", "random", "uniform", "sharegpt-like")

WORDS = (
    "the of and to in is that for it as with was on be by at this are from or have an not but which one "
    "all were they had there can their more will would when what so about if time up out into only other "
    "some could its them then these two may first new any way also like people than now over after world "
    "year many most work day use well even state life because government through long much before where "
    "made must old each great good house part school used while place same during under three last small "
    "water might under system never between city country both again public number home another around "
    "group power change hand high right point program early light family thought still game market report "
    "river mountain garden window letter music paper story question answer reason energy science history "
    "model engine token memory compute bandwidth network server client request batch cache expert layer"
).split()


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    prompt_len: int  # tokens the prompt was built to have (server usage may add special tokens)
    output_len: int


def sample_lengths(kind: str, length: int, num: int, rng: random.Random, *, range_ratio: float = 0.0,
                   sigma: float = 1.0, min_len: int = 1, max_len: int | None = None) -> list[int]:
    """`num` lengths of distribution `kind` around `length` (see the module docstring)."""
    if kind not in DATASETS:
        raise FractalError(f"dataset={kind!r} is invalid: choose from {', '.join(DATASETS)}")
    if not isinstance(length, int) or length < 1:
        raise FractalError(f"length={length!r} is invalid: must be an integer >= 1")
    upper = max_len if max_len is not None else 1 << 30
    if kind in ("fixed", "random"):
        values = [length] * num
    elif kind == "uniform":
        if not 0.0 <= range_ratio < 1.0:
            raise FractalError(f"range_ratio={range_ratio} is invalid: must be in [0, 1)")
        lo = max(1, math.floor(length * (1 - range_ratio)))
        hi = max(lo, math.ceil(length * (1 + range_ratio)))
        values = [rng.randint(lo, hi) for _ in range(num)]
    else:
        if not sigma > 0:
            raise FractalError(f"sigma={sigma} is invalid: must be > 0")
        mu = math.log(length) - sigma * sigma / 2.0  # so that the mean is `length`
        values = [max(1, round(rng.lognormvariate(mu, sigma))) for _ in range(num)]
    return [min(max(v, min_len), upper) for v in values]


def word_prompt(num_tokens: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_tokens))


def tokenizer_prompt(tokenizer: Any, num_tokens: int, rng: random.Random) -> tuple[str, int]:
    """Text that `tokenizer.encode(text, add_special_tokens=False)` turns into `num_tokens` ids (or the
    closest length found); returns (text, its token count)."""
    text = word_prompt(num_tokens + 8, rng)
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < num_tokens:  # a vocabulary with multi-word tokens: add more words
        text += " " + word_prompt(num_tokens, rng)
        ids = tokenizer.encode(text, add_special_tokens=False)
    best = None
    cut = num_tokens
    for _ in range(8):  # decoding and re-encoding a cut can merge or split at the edge: nudge the cut
        candidate = tokenizer.decode(ids[:cut], skip_special_tokens=True)
        count = len(tokenizer.encode(candidate, add_special_tokens=False))
        if best is None or abs(count - num_tokens) < abs(best[1] - num_tokens):
            best = (candidate, count)
        if count == num_tokens:
            break
        cut += 1 if count < num_tokens else -1
        if cut < 1:
            break
    return best


def build_requests(num: int, dataset: str, input_len: int, output_len: int, *, seed: int = 0,
                   range_ratio: float = 0.0, input_sigma: float = 1.0, output_sigma: float = 0.9,
                   max_input_len: int | None = None, max_output_len: int | None = None,
                   tokenizer: Any = None) -> list[BenchRequest]:
    """The benchmark's requests, deterministic for a seed."""
    rng = random.Random(seed)
    in_lens = sample_lengths(dataset, input_len, num, rng, range_ratio=range_ratio, sigma=input_sigma,
                             min_len=4 if dataset == "sharegpt-like" else 1, max_len=max_input_len)
    out_lens = sample_lengths(dataset, output_len, num, rng, range_ratio=range_ratio, sigma=output_sigma,
                              max_len=max_output_len)
    requests = []
    for in_len, out_len in zip(in_lens, out_lens):
        if tokenizer is not None:
            text, count = tokenizer_prompt(tokenizer, in_len, rng)
        else:
            text, count = word_prompt(in_len, rng), in_len
        requests.append(BenchRequest(prompt=text, prompt_len=count, output_len=out_len))
    return requests
