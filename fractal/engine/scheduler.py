"""Continuous batching: which sequences run this step and how many tokens each. Pure Python (no torch).

One call to `schedule()` fills a token budget (`max_num_batched_tokens`) under a sequence cap
(`max_num_seqs`):

1. running sequences that decode (one token each), oldest first;
2. running sequences in the middle of a chunked prefill, each up to `chunk_cap` tokens;
3. waiting sequences, admitted in "fcfs" order (arrival) or "shortest" order (fewest tokens still to
   compute first, the article's chunk scheduling), taking prefix-cache hits first — unless step 1-2
   had to preempt, in which case nobody new is admitted this step.

When a running sequence needs a block and the pool is empty, the newest running sequence (highest
`order`, possibly itself) is preempted: its blocks are freed and it goes back to waiting with
`num_computed_tokens = 0`. With swap space (`num_host_blocks`) that can take its computed KV, the KV is
swapped out (`SchedulerOutput.swap_out`; the runner copies it to host memory before the step) and comes back
on admission into new blocks (`swap_in`) instead of being computed again; otherwise it is preempted by
recompute (its output so far is kept and recomputed as part of its prompt).

Balancing in the endgame (`preemption_balance` = B > 0, with swap space): once every unfinished sequence's
tokens add up to at most BALANCE_WINDOW pools, and a preempted sequence waits B or more output tokens behind
the most advanced running decode, that decode is swapped out in its place (up to BALANCE_SWAPS such pairs per
step, each only if the swap space takes its KV), and waiting sequences are admitted least output first.
Without it, sequences preempted in a batch that outgrows the pool wait until the rest finish and then decode
alone at a small batch for most of their output (a "second wave"), although an MoE decode step costs nearly
the same at batch 60 as at 250 (every expert's weights are read either way). With it the unfinished sequences
finish close together, at the cost of two copies over PCIe per swap. Balancing by recompute instead lost
(each swap made a graph-replayed decode step an eager mixed one with a ~600-token recompute), hence "only by
swapping". Measurements: docs/engine.md and docs/perf-notes.md round 8.

`num_computed_tokens` advances in `update_from_output`, after the step ran, so a prefix block is only
offered to others once its KV really is in the cache.
"""
from __future__ import annotations

from fractal.engine.config import SchedulerConfig
from fractal.engine.kv_cache_manager import KVCacheManager, cdiv
from fractal.engine.request import Sequence, SeqStatus
from fractal.engine.scheduler_output import ScheduledChunk, SchedulerOutput

# balancing runs while the unfinished sequences' tokens are at most this many KV pools (module docstring)
BALANCE_WINDOW = 1.5
BALANCE_SWAPS = 1  # swaps per step at most


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []  # admission order
        self.seqs: dict[int, Sequence] = {}  # every unfinished sequence by id
        self.num_preempted_total = 0
        self.num_swapped_out_total = 0  # preemptions that kept the KV in host memory
        self.host_free_blocks = config.num_host_blocks
        self._swap_out: list[tuple[int, list[int]]] = []  # this step's KV moves (SchedulerOutput)
        self._swap_in: list[tuple[int, list[int]]] = []
        self.num_balance_swaps = 0  # preemptions made by balancing (module docstring)
        self._endgame = False  # balancing is on for this step (see schedule)

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
            self._drop_swapped(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.seqs.pop(seq.seq_id, None)

    def _host_blocks(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.config.block_size)

    def _drop_swapped(self, seq: Sequence) -> None:
        """A swapped-out sequence ends while waiting: its host blocks are free again (the runner drops the copy)."""
        if seq.num_swapped_tokens:
            self.host_free_blocks += self._host_blocks(seq.num_swapped_tokens)
            seq.num_swapped_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        blocks = self._host_blocks(seq.num_computed_tokens)
        if 0 < blocks <= self.host_free_blocks and blocks <= len(seq.block_ids):
            self._swap_out.append((seq.seq_id, list(seq.block_ids[:blocks])))
            seq.num_swapped_tokens = seq.num_computed_tokens
            self.host_free_blocks -= blocks
            self.num_swapped_out_total += 1
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
        self._swap_out, self._swap_in = [], []
        swapped = self._balance_progress()

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
            budget = self._admit_waiting(budget, scheduled, exclude=swapped)
        preempted = swapped + preempted

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
        return SchedulerOutput(chunks=chunks, preempted_seq_ids=[s.seq_id for s in preempted],
                               swap_out=self._swap_out, swap_in=self._swap_in)

    def _balance_progress(self) -> list[Sequence]:
        """The endgame swaps (module docstring): decide whether balancing is on for this step and, while a
        preempted sequence lags the most advanced running decode by `preemption_balance` output tokens or more,
        preempt that decode (at most BALANCE_SWAPS per step; returned, so that none is re-admitted in the same
        step)."""
        cfg = self.config
        self._endgame = False
        if cfg.preemption_balance <= 0 or not any(s.num_preemptions for s in self.waiting):
            return []
        capacity = cfg.num_blocks * cfg.block_size
        if sum(s.num_tokens for s in self.seqs.values()) > BALANCE_WINDOW * capacity:
            return []
        self._endgame = True
        lagging = sorted((s for s in self.waiting if s.num_preemptions), key=lambda s: (s.num_output_tokens, s.order))
        leaders = sorted((s for s in self.running if s.num_uncomputed_tokens == 1 and s.num_output_tokens > 0),
                         key=lambda s: (-s.num_output_tokens, s.order))
        swapped = []
        for lag, leader in zip(lagging[:BALANCE_SWAPS], leaders):
            if leader.num_output_tokens - lag.num_output_tokens < cfg.preemption_balance:
                break
            if self._host_blocks(leader.num_computed_tokens) > self.host_free_blocks:
                break  # only by swapping: a recompute per swap costs more than the balance gains (R8-3)
            self._preempt(leader)
            self.num_balance_swaps += 1
            swapped.append(leader)
        return swapped

    def _waiting_order(self) -> list[Sequence]:
        if self._endgame:  # least output first: the lagging catch up, the swapped-out leaders wait
            return sorted(self.waiting, key=lambda s: (s.num_output_tokens, s.order))
        if self.config.prefill_order == "shortest":
            return sorted(self.waiting, key=lambda s: (s.num_tokens, s.order))
        return sorted(self.waiting, key=lambda s: s.order)

    def _admit_waiting(self, budget: int, scheduled: dict[int, int], exclude: list[Sequence] = ()) -> int:
        cfg = self.config
        for seq in self._waiting_order():
            if len(self.running) >= cfg.max_num_seqs or budget == 0:
                break
            if any(seq is x for x in exclude):
                continue  # preempted in this very step: its newest token may still be in flight (overlap)
            if seq.num_swapped_tokens:
                if not self._swap_in_admit(seq, budget, scheduled):
                    break
                budget -= scheduled[seq.seq_id]
                continue
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

    def _swap_in_admit(self, seq: Sequence, budget: int, scheduled: dict[int, int]) -> bool:
        """Admit a swapped-out sequence: blocks for its swapped KV and this step's tokens, the KV copied back into
        them before the step (swap_in). False (nothing changed) when the pool or the budget is short."""
        cfg = self.config
        num_computed = seq.num_swapped_tokens
        remaining = seq.num_tokens - num_computed
        if not cfg.enable_chunked_prefill and remaining > budget:
            return False
        num_new = min(remaining, budget, cfg.chunk_cap)
        seq.num_computed_tokens = num_computed
        if not self.kv.allocate_slots(seq, num_new):
            seq.num_computed_tokens = 0
            return False
        blocks = self._host_blocks(num_computed)
        self._swap_in.append((seq.seq_id, list(seq.block_ids[:blocks])))
        self.host_free_blocks += blocks
        seq.num_swapped_tokens = 0
        seq.status = SeqStatus.RUNNING
        self.waiting.remove(seq)
        self.running.append(seq)
        scheduled[seq.seq_id] = num_new
        return True

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
