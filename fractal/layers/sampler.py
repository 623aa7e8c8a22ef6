"""Turn one step's logits into tokens: penalties, masks, temperature, top-k/top-p/min-p, then a draw.

Order of processing, per row (each step only runs when some row of the batch needs it):
  1. repetition penalty (HF/CTRL) over the prompt and output tokens: a seen token's logit is divided by
     the penalty when positive and multiplied by it when negative;
  2. presence and frequency penalties (OpenAI) over the output tokens:
     logit -= frequency_penalty * count + presence_penalty * (count > 0);
  3. min_tokens: while fewer than min_tokens tokens were generated, EOS (unless ignore_eos) and the
     request's stop_token_ids are masked to -inf;
  4. temperature 0 (greedy): argmax of the penalised logits, ties to the lowest id (torch.argmax), no noise;
     otherwise logits / temperature, then
  5. top-k: keep tokens whose logit is >= the k-th largest (ties at the boundary are all kept);
  6. top-p: keep the smallest set of most likely tokens whose probability reaches top_p (a token is kept when
     the probability of the tokens strictly before it in descending order is < top_p; ties at the boundary kept);
  7. min-p: keep tokens with probability >= min_p * the largest probability;
  8. sample from the softmax of what is left with the exponential race `argmax(probs / E)`, E ~ Exponential(1)
     i.i.d. per token. A row with its own torch.Generator draws its E with it (a loop over those rows only),
     so a seeded request samples the same tokens whatever else is in the batch; other rows share one draw.

Logprobs are those of the model's raw distribution, log_softmax of the unprocessed logits (what vLLM returns
by default), for the sampled token and for the K most likely tokens, K = the largest `logprobs` asked.
Generators must live on the logits' device (see `make_generator`). Nothing here syncs with the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fractal.sampling_params import SamplingParams


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for a seeded request, on the device the logits will be on."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _pad(rows: list[list[int]], device) -> Tensor:
    """Rows of ids as a [B, L] long tensor padded with -1 (L >= 1)."""
    width = max(1, max((len(r) for r in rows), default=0))
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def _scatter_counts(ids: Tensor, vocab_size: int, dtype=torch.float32) -> Tensor:
    """[B, V] counts of each id per row; padding (-1) and ids >= V are dropped."""
    ids = ids.masked_fill((ids < 0) | (ids >= vocab_size), vocab_size)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=dtype, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=dtype))
    return counts[:, :vocab_size]


@dataclass
class SamplingBatch:
    """Per-row sampling tensors for one step, built once by `build`. Optional tensors are None when no row
    needs that step; python flags say which steps run (decided from the params, never from device values)."""

    temperature: Tensor  # [B] float32; 1.0 on greedy rows
    greedy: Tensor  # [B] bool
    top_k: Tensor | None  # [B] long, values in [1, inf); disabled rows hold a huge k
    max_top_k: int  # the largest enabled k (0 when none)
    top_p: Tensor | None  # [B] float32 in (0, 1]
    min_p: Tensor | None  # [B] float32 in [0, 1]
    repetition_penalty: Tensor | None  # [B] float32
    frequency_penalty: Tensor | None  # [B] float32
    presence_penalty: Tensor | None  # [B] float32
    seen_ids: Tensor | None  # [B, L] prompt+output ids of rows with a repetition penalty, -1 padded
    output_ids: Tensor | None  # [B, L] output ids of rows with presence/frequency penalties, -1 padded
    banned_ids: Tensor | None  # [B, L] ids masked by min_tokens this step, -1 padded
    generators: list[torch.Generator | None]
    all_greedy: bool
    any_greedy: bool
    max_num_logprobs: int  # K of the top logprobs (0: none asked)

    @property
    def batch_size(self) -> int:
        return len(self.generators)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        device: torch.device | str,
        eos_token_ids: set[int] | list[int] | None = None,
    ) -> "SamplingBatch":
        """One row per sequence sampled this step. `output_token_ids[i]` are the tokens generated so far
        (they count for penalties and min_tokens); `eos_token_ids` are masked while min_tokens is unmet."""
        n = len(params)
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == n):
            raise ValueError(
                f"build needs one entry per row: params {n}, prompts {len(prompt_token_ids)}, "
                f"outputs {len(output_token_ids)}, generators {len(generators)}"
            )
        eos = sorted(eos_token_ids or ())
        greedy = [p.temperature == 0.0 for p in params]
        temperature = torch.tensor([1.0 if g else float(p.temperature) for p, g in zip(params, greedy)],
                                   dtype=torch.float32, device=device)
        # Sampling knobs only matter on random rows.
        ks = [p.top_k if (not g and p.top_k > 0) else 0 for p, g in zip(params, greedy)]
        max_top_k = max(ks, default=0)
        top_k = None
        if max_top_k > 0:
            top_k = torch.tensor([k if k > 0 else 2**62 for k in ks], dtype=torch.long, device=device)
        top_p = min_p = None
        if any(p.top_p < 1.0 and not g for p, g in zip(params, greedy)):
            top_p = torch.tensor([1.0 if g else p.top_p for p, g in zip(params, greedy)], dtype=torch.float32,
                                 device=device)
        if any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)):
            min_p = torch.tensor([0.0 if g else p.min_p for p, g in zip(params, greedy)], dtype=torch.float32,
                                 device=device)

        rep = [p.repetition_penalty != 1.0 for p in params]
        freq_pres = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
        repetition_penalty = seen_ids = None
        if any(rep):
            repetition_penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32,
                                              device=device)
            seen_ids = _pad([list(pr) + list(out) if r else [] for pr, out, r in
                             zip(prompt_token_ids, output_token_ids, rep)], device)
        frequency_penalty = presence_penalty = output_ids = None
        if any(freq_pres):
            frequency_penalty = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=device)
            presence_penalty = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=device)
            output_ids = _pad([list(out) if f else [] for out, f in zip(output_token_ids, freq_pres)], device)

        banned = []
        for p, out in zip(params, output_token_ids):
            row: list[int] = []
            if len(out) < p.min_tokens:
                row = list(p.stop_token_ids) + ([] if p.ignore_eos else eos)
            banned.append(row)
        banned_ids = _pad(banned, device) if any(banned) else None

        return cls(
            temperature=temperature,
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            seen_ids=seen_ids,
            output_ids=output_ids,
            banned_ids=banned_ids,
            generators=list(generators),
            all_greedy=all(greedy),
            any_greedy=any(greedy),
            max_num_logprobs=max((p.logprobs or 0 for p in params), default=0),
        )


@dataclass
class SamplerOutput:
    """Sampled ids and raw-distribution logprobs ([B] each); top_* are [B, K] or None when nobody asked."""

    sampled: Tensor  # [B] long
    sampled_logprob: Tensor  # [B] float32
    top_ids: Tensor | None  # [B, K] long, most likely first
    top_logprobs: Tensor | None  # [B, K] float32


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Steps 1-3 in place on [B, V] logits: repetition, presence/frequency penalties, min_tokens masking."""
    vocab_size = logits.shape[-1]
    if batch.repetition_penalty is not None:
        seen = _scatter_counts(batch.seen_ids, vocab_size) > 0
        penalty = batch.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalised, logits))
    if batch.frequency_penalty is not None:
        counts = _scatter_counts(batch.output_ids, vocab_size)
        logits.sub_(batch.frequency_penalty[:, None] * counts + batch.presence_penalty[:, None] * (counts > 0))
    if batch.banned_ids is not None:
        banned = _scatter_counts(batch.banned_ids, vocab_size) > 0
        logits.masked_fill_(banned, float("-inf"))
    return logits


def apply_top_k_top_p_min_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Steps 5-7 in place on temperature-scaled [B, V] logits; masked tokens become -inf."""
    vocab_size = logits.shape[-1]
    if batch.top_p is not None:
        sorted_logits = logits.sort(dim=-1, descending=True).values
        if batch.top_k is not None:
            k = batch.top_k.clamp(max=vocab_size)
            kth = sorted_logits.gather(1, (k - 1)[:, None])
            sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
            logits.masked_fill_(logits < kth, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each position (exclusive cumsum: non-decreasing, so `keep` is a prefix).
        before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(dim=-1)[:, :-1]], dim=-1)
        keep = (before < batch.top_p[:, None]) | (batch.top_p[:, None] >= 1.0)
        num_kept = keep.sum(dim=-1).clamp(min=1)
        cutoff = sorted_logits.gather(1, (num_kept - 1)[:, None])
        logits.masked_fill_(logits < cutoff, float("-inf"))
    elif batch.top_k is not None:
        top_values = logits.topk(min(batch.max_top_k, vocab_size), dim=-1).values
        kth = top_values.gather(1, (batch.top_k.clamp(max=top_values.shape[-1]) - 1)[:, None])
        # Rows with top-k disabled hold a k above every enabled one: they keep everything.
        disabled = batch.top_k[:, None] > batch.max_top_k
        kth = kth.masked_fill(disabled, float("-inf"))
        logits.masked_fill_(logits < kth, float("-inf"))
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        threshold = batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        logits.masked_fill_(probs < threshold, float("-inf"))
    return logits


def exponential_race(probs: Tensor, generators: list[torch.Generator | None]) -> Tensor:
    """Sample one id per row from (unnormalised) probs: argmax(probs / E), E ~ Exponential(1).

    Rows with a generator draw their own E; the rest share one draw from the global RNG."""
    noise = torch.empty_like(probs)
    if any(g is None for g in generators):
        noise.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            noise[row].exponential_(generator=generator)
    # E can be exactly 0; keep 0/0 out (it would be NaN, and argmax picks NaN).
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def process_logits(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Steps 1-7 on a copy of [B, V] float32 logits: what random rows sample from (softmax of it). Greedy rows
    get penalties and masks only (temperature 1, no top-k/top-p/min-p): their argmax is the greedy token."""
    x = apply_penalties(logits.clone(), batch)
    if not batch.all_greedy:
        x.div_(batch.temperature[:, None])
        apply_top_k_top_p_min_p(x, batch)
    return x


class Sampler(torch.nn.Module):
    """logits [B, V] -> SamplerOutput. The input logits are not modified."""

    def forward(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        x = process_logits(logits, batch)
        if batch.all_greedy:
            sampled = x.argmax(dim=-1)
        else:
            sampled = exponential_race(x.softmax(dim=-1), batch.generators)
            if batch.any_greedy:  # greedy rows are left at temperature 1 with no masks: argmax is theirs
                sampled = torch.where(batch.greedy, x.argmax(dim=-1), sampled)
        sampled_logprob = raw_logprobs.gather(1, sampled[:, None]).squeeze(1)
        top_ids = top_logprobs = None
        if batch.max_num_logprobs > 0:
            top_logprobs, top_ids = raw_logprobs.topk(min(batch.max_num_logprobs, logits.shape[-1]), dim=-1)
        return SamplerOutput(sampled=sampled, sampled_logprob=sampled_logprob, top_ids=top_ids,
                             top_logprobs=top_logprobs)
