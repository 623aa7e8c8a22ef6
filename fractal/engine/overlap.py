"""CPU/GPU overlap ("async scheduling"): the scheduler's bookkeeping in two halves. Pure Python (no torch).

The synchronous loop does schedule -> run -> wait for the tokens -> `Scheduler.update_from_output`. With
overlap, the engine launches step N+1 before step N's tokens reach the host, so the update is split:

- `advance(scheduler, output)` right after a step is launched: each chunk's tokens count as computed, and each
  sampling chunk appends `PLACEHOLDER` to its sequence. The next `schedule()` then sees those sequences as
  decodes whose one uncomputed token is the placeholder; the runner reads its value on the device from the
  previous step's sampled tokens (fractal/engine/runner.py).
- `resolve(scheduler, output, sampled)` once the step's tokens are on the host (after the next step was
  launched): each placeholder becomes the real token, newly full blocks go to the prefix cache (only now,
  so no hash ever covers a placeholder), and the sequences that got a token are returned for the stop
  checks, the detokenizer and the outputs.

A sequence whose placeholder is its last token for certain (max_tokens or the context length reached) is
`park`ed: taken out of the scheduler's running list until its step resolves, so no step is spent on it.
A sequence that stops otherwise at step N (EOS, a stop id or string) was already scheduled in step N+1: that
step's row for it is computed and thrown away (its blocks are freed at the stop; the device writes into them before anything reuses them,
since steps run in order on one stream). Penalties need every output token on the host when sampling, so
the engine resolves a step before scheduling the next whenever one of its sequences uses them
(`needs_host_tokens`).
"""
from __future__ import annotations

from fractal.engine.request import Sequence, SeqStatus
from fractal.engine.scheduler import Scheduler
from fractal.engine.scheduler_output import SchedulerOutput
from fractal.sampling_params import SamplingParams

PLACEHOLDER = -1  # must match fractal.engine.runner.PLACEHOLDER


def needs_host_tokens(params: SamplingParams) -> bool:
    """True when sampling this sequence reads its earlier output tokens (repetition/frequency/presence penalties)."""
    return params.repetition_penalty != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def advance(scheduler: Scheduler, output: SchedulerOutput) -> None:
    """After launching `output`: computed counts move on, each sampling chunk gets a placeholder token."""
    for chunk in output.chunks:
        seq = scheduler.seqs.get(chunk.seq_id)
        if seq is None or seq.status is not SeqStatus.RUNNING:
            continue
        seq.num_computed_tokens = chunk.seq_len
        if chunk.sample:
            if len(seq.token_ids) != chunk.seq_len:
                raise RuntimeError(f"sequence {seq.seq_id} has {len(seq.token_ids)} tokens, expected {chunk.seq_len}")
            seq.token_ids.append(PLACEHOLDER)


def certain_to_finish(seq: Sequence, max_model_len: int) -> bool:
    """Whether the sequence stops at its newest token whatever that token is (max_tokens or context length)."""
    limit = seq.params.max_tokens
    return (limit is not None and seq.num_output_tokens >= limit) or seq.num_tokens >= max_model_len


def park(scheduler: Scheduler, output: SchedulerOutput, max_model_len: int) -> list[Sequence]:
    """After `advance`: take the sequences that will surely stop at their placeholder out of the running list
    (they keep their blocks); `unpark` them before their step resolves. Returns the parked sequences."""
    parked = []
    for chunk in output.chunks:
        seq = scheduler.seqs.get(chunk.seq_id) if chunk.sample else None
        if seq is not None and seq.status is SeqStatus.RUNNING and certain_to_finish(seq, max_model_len):
            parked.append(seq)
    if parked:
        ids = {id(s) for s in parked}
        scheduler.running = [s for s in scheduler.running if id(s) not in ids]
    return parked


def unpark(scheduler: Scheduler, parked: list[Sequence]) -> None:
    """Put parked sequences back into the running list (so that finishing them works as usual)."""
    for seq in parked:
        if seq.status is SeqStatus.RUNNING:
            scheduler.running.append(seq)


def resolve(scheduler: Scheduler, output: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
    """Once `output`'s tokens are known: fill the placeholders, register full blocks; returns the sequences
    that got a token (in batch order), skipping those finished or aborted meanwhile."""
    grown = []
    for chunk in output.chunks:
        seq = scheduler.seqs.get(chunk.seq_id)
        if seq is None or seq.is_finished:
            continue
        if chunk.sample:
            index = chunk.seq_len
            if index >= len(seq.token_ids) or seq.token_ids[index] != PLACEHOLDER:
                raise RuntimeError(f"sequence {seq.seq_id} has no placeholder at position {index}")
            seq.token_ids[index] = sampled[chunk.seq_id]
            grown.append(seq)
        if seq.status is SeqStatus.RUNNING:
            scheduler.kv.register_computed_blocks(seq)
    return grown
