"""The scheduler's decision for one step: a small explicit object the runner consumes. Pure Python."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ScheduledChunk:
    """One sequence's share of a step.

    `token_ids` are the tokens whose KV is computed this step: a slice of the prompt (chunked prefill,
    after any prefix-cache hit) or the one last sampled token (decode). They sit at positions
    `start_pos .. start_pos + len(token_ids) - 1`; positions below `start_pos` are already in the KV
    cache in the blocks of `block_table` (which covers at least `start_pos + len(token_ids)` tokens).
    `sample` is True when the chunk ends at the sequence's last known token, so the runner samples.
    """

    seq_id: int
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def seq_len(self) -> int:
        """Tokens in the KV cache once this step has run."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes first, then prefill chunks
    preempted_seq_ids: list[int] = field(default_factory=list)  # sent back to waiting (recompute or swap)
    # KV moves the runner makes before the step, in this order: (seq_id, device block ids) of sequences whose
    # computed KV goes to host memory (those blocks are free for this step's chunks afterwards), then of
    # sequences whose KV comes back into newly allocated blocks
    swap_out: list[tuple[int, list[int]]] = field(default_factory=list)
    swap_in: list[tuple[int, list[int]]] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks
