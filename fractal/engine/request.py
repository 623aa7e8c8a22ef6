"""Requests and their sequences: the state the scheduler and the engine share. Pure Python (no torch).

A `Request` carries one prompt and `params.n` `Sequence`s. Each sequence owns its token ids (prompt +
output), how many of them already have KV in the cache (`num_computed_tokens`), its KV block ids and
its status. Sequence 0 is the "parent": the others fork from it once its prompt is computed, sharing
the prompt's full blocks.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from fractal.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fractal.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (KV dropped, will recompute)
    RUNNING = "running"  # holds KV blocks; gets a prefill chunk or a decode each step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # position among the request's n outputs
    order: int  # admission priority: lower = older; preemption takes the highest first
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # content hashes of full blocks, in order
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    parent: "Sequence | None" = None  # for index > 0: the sequence whose prompt blocks it shares
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    num_swapped_tokens: int = 0  # preempted by swapping: tokens whose KV waits in host memory (else 0)
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache or the parent at admission
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    detokenizer: Any = None  # engine-side IncrementalDetokenizer, or None without a tokenizer

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def prompt_computed(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    # "cumulative": an output every step the request gets tokens (streaming); "final": only when it finishes
    output_kind: str = "cumulative"

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def to_output(self) -> RequestOutput:
        """Cumulative output so far (text and token ids of every sequence)."""
        outputs = []
        for s in self.seqs:
            text = s.detokenizer.text if s.detokenizer is not None else ""
            outputs.append(
                CompletionOutput(
                    index=s.index,
                    text=text,
                    token_ids=s.output_token_ids,  # a slice: already a copy
                    cumulative_logprob=s.cumulative_logprob,
                    logprobs=None if s.logprobs is None else list(s.logprobs),
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,  # shared, never changed after admission: read-only
            outputs=outputs,
            finished=self.finished,
            metrics=replace(self.metrics),  # a snapshot: later steps keep updating the request's own
        )


def check_token_stop(
    seq: Sequence, eos_token_ids: set[int] | frozenset[int], max_model_len: int
) -> tuple[str, int | None] | None:
    """Token-level stop after the last appended token: (finish_reason, stop_reason) or None.

    EOS (unless ignore_eos) and stop_token_ids count only once min_tokens outputs exist; then
    max_tokens and the context length end the sequence with "length".
    """
    params = seq.params
    last = seq.token_ids[-1]
    if seq.num_output_tokens >= params.min_tokens:
        if last in params.stop_token_ids:
            return "stop", last
        if not params.ignore_eos and last in eos_token_ids:
            return "stop", None
    if params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens:
        return "length", None
    if seq.num_tokens >= max_model_len:
        return "length", None
    return None
