"""CUDA graphs for decode steps: one graph per (padded batch size, context bucket), replayed with static inputs.

A decode-only step of B sequences runs the graph captured for the smallest ladder size >= B (`batch_ladder`)
and for `context_bucket(longest sequence)` (the split-K attention kernels are launched for that bound, the
same bound the eager path uses, see fractal/layers/gpu_backends.py). Padded rows read and write one spare
KV block (`pad_block`, outside the scheduler's pool): token 0 at position 0, slot pad_block * block_size.

Static device buffers (filled before each replay with non-blocking copies from pinned host memory):
    input_ids int64 [maxB], positions int64 [maxB], slot_mapping int64 [maxB],
    seq_lens int32 [maxB], block_tables int32 [maxB, max_blocks], query_start_loc int32 [maxB + 1] = 0..maxB.
The graph covers the model's forward (hidden states [B, H]); the LM head and sampling run eagerly after it,
so no graph holds a [B, vocab] buffer. Graphs share one memory pool; capture is lazy (first use) or up front
(`capture`), each after two eager warm-up runs that also compile the Triton kernels.
"""
from __future__ import annotations

import logging
import time

import torch

from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.gpu_backends import context_bucket

log = logging.getLogger(__name__)


def batch_ladder(max_batch: int) -> list[int]:
    """Captured batch sizes: 1, 2, 4, 8, then every 8 to 64, every 16 to 256, every 32 beyond, up to max_batch."""
    sizes = [1, 2, 4] + list(range(8, 65, 8)) + list(range(80, 257, 16)) + list(range(288, 4097, 32))
    out = [s for s in sizes if s < max_batch]
    return out + [max_batch]


class CudaGraphRunner:
    def __init__(self, model, kv_caches: list[torch.Tensor], *, max_batch: int, block_size: int, max_model_len: int,
                 pad_block: int, device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.pad_block = pad_block
        self.device = device
        self.ladder = batch_ladder(max_batch)
        self.max_batch = self.ladder[-1]
        self.max_bucket = context_bucket(max_model_len)
        self.max_blocks = -(-self.max_bucket // block_size)
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), pad_block * block_size, dtype=torch.long, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, self.max_blocks), pad_block, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: set[tuple[int, int]] = set()
        self.pool = None
        self.capture_time_s = 0.0
        self.num_replays = 0

    # --- shapes ---------------------------------------------------------------------------------------
    def padded_batch(self, batch: int) -> int | None:
        for size in self.ladder:
            if size >= batch:
                return size
        return None

    def key_for(self, batch: int, max_seq_len: int) -> tuple[int, int] | None:
        """(padded batch, context bucket), or None when no graph can run this decode step."""
        size = self.padded_batch(batch)
        bucket = context_bucket(max_seq_len)
        if size is None or bucket > self.max_bucket:
            return None
        if (size, bucket) in self.failed:
            return None
        return size, bucket

    # --- capture --------------------------------------------------------------------------------------
    def _meta(self, size: int, bucket: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[: size + 1], seq_lens=self.seq_lens[:size],
            block_tables=self.block_tables[:size], slot_mapping=self.slot_mapping[:size],
            block_size=self.block_size, query_lens_cpu=[1] * size, seq_lens_cpu=[bucket] * size,
        )

    def _forward(self, size: int, bucket: int) -> torch.Tensor:
        return self.model.forward(self.input_ids[:size], self.positions[:size], self._meta(size, bucket),
                                  self.kv_caches)

    def _reset_inputs(self) -> None:
        """Harmless inputs for warm-up and capture: every row decodes token 0 into the pad block."""
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(self.pad_block * self.block_size)
        self.seq_lens.fill_(1)
        self.block_tables[:, 0] = self.pad_block

    @torch.inference_mode()
    def capture_one(self, size: int, bucket: int) -> bool:
        key = (size, bucket)
        if key in self.graphs:
            return True
        t0 = time.perf_counter()
        try:
            self._reset_inputs()
            for _ in range(2):
                self._forward(size, bucket)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(size, bucket)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[key] = (graph, out)
        except RuntimeError as exc:  # e.g. an op that syncs: run this shape eagerly from now on
            log.warning("CUDA graph capture failed for batch %d, context bucket %d: %s", size, bucket, exc)
            self.failed.add(key)
            torch.cuda.synchronize(self.device)
            return False
        finally:
            self.capture_time_s += time.perf_counter() - t0
        return True

    def capture(self, buckets: list[int] | None = None, sizes: list[int] | None = None) -> None:
        """Capture up front, largest batch first (later, smaller graphs reuse the pool's memory)."""
        for bucket in buckets or [context_bucket(1)]:
            if bucket > self.max_bucket:
                continue
            for size in sorted(sizes or self.ladder, reverse=True):
                self.capture_one(size, bucket)

    # --- replay ---------------------------------------------------------------------------------------
    def run(self, key: tuple[int, int], ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            seq_lens: torch.Tensor, block_tables: torch.Tensor, num_real: int, fix_placeholders) -> torch.Tensor | None:
        """Fill the static inputs and replay; returns hidden states [num_real, H] (None if capture failed).

        The host tensors (pinned on CUDA) hold all `size` rows of the key, padded rows included (token 0,
        position 0, the pad slot, seq_len 1, block table [pad_block]); block_tables is [size, width <= max_blocks].
        `fix_placeholders(input_ids_view)` patches input tokens that are still on the device (overlap).
        """
        size, bucket = key
        if key not in self.graphs and not self.capture_one(size, bucket):
            return None
        graph, out = self.graphs[key]
        self.input_ids[:size].copy_(ids, non_blocking=True)
        self.positions[:size].copy_(positions, non_blocking=True)
        self.slot_mapping[:size].copy_(slots, non_blocking=True)
        self.seq_lens[:size].copy_(seq_lens, non_blocking=True)
        self.block_tables[:size, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        fix_placeholders(self.input_ids[:num_real])
        graph.replay()
        self.num_replays += 1
        return out[:num_real]
