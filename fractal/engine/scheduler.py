"""Continuous batching: which sequences run this step and how many tokens each. Pure Python (no torch).

One call to `schedule()` fills a token budget (`max_num_batched_tokens`) under a sequence cap
(`max_num_seqs`):

1. running sequences that decode (one token each), oldest first;
2. running sequences in the middle of a chunked prefill, each up to `chunk_cap` tokens;
3. waiting sequences, admitted in "fcfs" order (arrival) or "shortest" order (fewest tokens still to
   compute first, the article's chunk scheduling), taking prefix-cache hits first — unless step 1-2
   had to preempt, in which case nobody new is admitted this step.

When a running sequence needs a block and the pool is empty, the newest running sequence (highest
`order`, possibly itself) is preempted by recompute: its blocks are freed and it goes back to waiting
with `num_computed_tokens = 0` (its output so far is kept and recomputed as part of its prompt).

`num_computed_tokens` advances in `update_from_output`, after the step ran, so a prefix block is only
offered to others once its KV really is in the cache.
"""
from __future__ import annotations

from fractal.engine.config import SchedulerConfig
from fractal.engine.kv_cache_manager import KVCacheManager
from fractal.engine.request import Sequence, SeqStatus
from fractal.engine.scheduler_output import ScheduledChunk, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # admission order
        self.seqs: dict[int, Sequence] = {}  # every unfinished sequence by id
        self.num_preempted_total = 0

    # --- bookkeeping -----------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.seq_id in self.seqs:
            raise RuntimeError(f"sequence {seq.seq_id} added twice")
        seq.status = SeqStatus.WAITING
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End seq (stop, length or abort): release its blocks and forget it. A no-op if already finished."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.RUNNING:
            self.kv.register_computed_blocks(seq)
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.seqs.pop(seq.seq_id, None)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preempted_total += 1
        self.waiting.append(seq)

    # --- the step ----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: dict[int, int] = {}  # seq_id -> new tokens, in batch order
        preempted: list[Sequence] = []

        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in self.running if s.num_uncomputed_tokens != 1]
        for seq in decodes + prefills:
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this step
                continue
            if budget == 0:
                break
            num_new = min(seq.num_uncomputed_tokens, budget, cfg.chunk_cap)
            while not self.kv.allocate_slots(seq, num_new):
                victim = max(self.running, key=lambda s: s.order)
                budget += scheduled.pop(victim.seq_id, 0)
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                scheduled[seq.seq_id] = num_new
                budget -= num_new

        if not preempted:
            budget = self._admit_waiting(budget, scheduled)

        chunks = []
        for seq_id, num_new in scheduled.items():
            seq = self.seqs[seq_id]
            start = seq.num_computed_tokens
            chunks.append(
                ScheduledChunk(
                    seq_id=seq_id,
                    token_ids=seq.token_ids[start : start + num_new],
                    start_pos=start,
                    block_table=list(seq.block_ids),
                    sample=start + num_new == seq.num_tokens,
                )
            )
        return SchedulerOutput(chunks=chunks, preempted_seq_ids=[s.seq_id for s in preempted])

    def _waiting_order(self) -> list[Sequence]:
        if self.config.prefill_order == "shortest":
            return sorted(self.waiting, key=lambda s: (s.num_tokens, s.order))
        return sorted(self.waiting, key=lambda s: s.order)

    def _admit_waiting(self, budget: int, scheduled: dict[int, int]) -> int:
        cfg = self.config
        for seq in self._waiting_order():
            if len(self.running) >= cfg.max_num_seqs or budget == 0:
                break
            parent = seq.parent
            if parent is not None and not parent.is_finished and not (
                parent.status is SeqStatus.RUNNING and parent.prompt_computed
            ):
                continue  # a sibling waits for its parent's prompt, then shares its blocks
            forked = self.kv.shareable_parent_blocks(seq)
            computed = forked or self.kv.cached_prefix_blocks(seq)
            num_computed = len(computed) * cfg.block_size
            remaining = seq.num_tokens - num_computed
            if not cfg.enable_chunked_prefill and remaining > budget:
                break
            num_new = min(remaining, budget, cfg.chunk_cap)
            if not self.kv.allocate_slots(seq, num_new, computed):
                break
            if not forked and cfg.enable_prefix_caching:
                self.kv.record_lookup(seq.num_tokens, num_computed)
            seq.num_computed_tokens = num_computed
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_computed
            seq.status = SeqStatus.RUNNING
            self.waiting.remove(seq)
            self.running.append(seq)
            scheduled[seq.seq_id] = num_new
            budget -= num_new
        return budget

    def update_from_output(self, output: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Advance computed counts after the step ran; append each sampled token. Returns the sequences
        that got a token (in batch order)."""
        grown = []
        for chunk in output.chunks:
            seq = self.seqs.get(chunk.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue  # finished or aborted meanwhile
            seq.num_computed_tokens = chunk.seq_len
            if chunk.sample:
                seq.token_ids.append(sampled[chunk.seq_id])
                grown.append(seq)
            self.kv.register_computed_blocks(seq)
        return grown
