"""What every attention layer needs to know about the current batch.

The batch is flattened: the new tokens of all sequences stand one after another (`num_tokens` rows).
Built once per step by the engine's runner from a `SchedulerOutput`, shared by all layers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    # int32 [num_seqs + 1]: new tokens of sequence i are rows query_start_loc[i] : query_start_loc[i+1]
    query_start_loc: torch.Tensor
    # int32 [num_seqs]: tokens in the KV cache after this step (cached context + new tokens)
    seq_lens: torch.Tensor
    # int32 [num_seqs, max_blocks_per_seq]: physical block ids, padded with 0
    block_tables: torch.Tensor
    # int64 [num_tokens]: flat slot (block_id * block_size + offset) where each new token's KV is written
    slot_mapping: torch.Tensor
    block_size: int
    # host copies, so reference paths and kernels' launch logic need no device->host sync
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens_cpu)

    @staticmethod
    def build(
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """From per-sequence new-token counts, cached-token counts and block tables."""
        seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        slots: list[int] = []
        for q, c, table in zip(query_lens, context_lens, block_tables):
            for pos in range(c, c + q):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=1) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return AttentionMetadata(
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(block_tables), width),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_size=block_size,
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=seq_lens,
        )
