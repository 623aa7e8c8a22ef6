"""Throw-away sequences for a runner step (start-up warm-up, benchmarks, diagnosis): no scheduler involved.

Each row (cached_tokens, new_token_ids) becomes one sequence whose first `cached_tokens` tokens count as already
in the KV cache (whatever the blocks hold) and whose new tokens are computed this step and sampled. Blocks are
handed out in order from `first_block`; the caller checks that they exist in its pool.
"""
from __future__ import annotations

from fractal.engine.request import Sequence
from fractal.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from fractal.sampling_params import SamplingParams


def synthetic_step(
    rows: list[tuple[int, list[int]]], block_size: int, params: SamplingParams, first_seq_id: int,
    first_block: int = 0,
) -> tuple[SchedulerOutput, dict[int, Sequence], int]:
    """(the step, its sequences by id, the next free block). Sequence ids are first_seq_id, first_seq_id + 1, ..."""
    seqs: dict[int, Sequence] = {}
    chunks: list[ScheduledChunk] = []
    block = first_block
    for i, (start, token_ids) in enumerate(rows):
        sid = first_seq_id + i
        need = -(-(start + len(token_ids)) // block_size)
        seqs[sid] = Sequence(seq_id=sid, request_id="synthetic", index=0, order=sid,
                             token_ids=[1] * start + list(token_ids), num_prompt_tokens=start + len(token_ids),
                             params=params)
        chunks.append(ScheduledChunk(seq_id=sid, token_ids=list(token_ids), start_pos=start,
                                     block_table=list(range(block, block + need)), sample=True))
        block += need
    return SchedulerOutput(chunks=chunks), seqs, block
