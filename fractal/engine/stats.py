"""Engine counters and the shape of the last step. Pure Python.

The last step's shape (sequences, batched tokens, prefill/decode split, summed context) is what the
four-resource model needs to compute that step's floor; with `EngineConfig.floor_gpu` set the engine asks
fractal.perf.floor for it every step and reports it beside `last_step_time_s`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepShape:
    """What ran in one step. Lengths in tokens."""

    num_seqs: int = 0  # sequences with a chunk this step
    num_batched_tokens: int = 0  # new tokens computed (prefill chunk tokens + one per decode)
    num_decode_seqs: int = 0  # chunks of one token that sampled after a computed context
    num_prefill_tokens: int = 0  # tokens of the other (prefill) chunks
    sum_context_len: int = 0  # sum over sequences of tokens in the KV cache after the step
    max_context_len: int = 0
    num_sampled: int = 0  # sequences that got a new token
    new_tokens: list[int] = field(default_factory=list)  # per sequence: tokens computed this step
    context_lens: list[int] = field(default_factory=list)  # per sequence: tokens cached before this step


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    num_preempted_total: int = 0
    num_swapped_out_total: int = 0  # of those, KV kept in host memory (swap_space) instead of recomputed
    num_balance_swaps_total: int = 0  # of those, running decodes that yielded to lagging ones (scheduler.py)
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which were found (tokens)
    prefix_hit_rate: float = 0.0
    num_generated_tokens_total: int = 0
    num_prompt_tokens_total: int = 0
    num_steps_total: int = 0
    last_step_time_s: float = 0.0  # wall time of the last model step (runner.execute), seconds
    last_step: StepShape | None = None  # batch shape of the last step, for a floor comparison
    last_step_floor_s: float | None = None  # the four-resource floor of that step (config.floor_gpu), seconds
    last_step_bound: str | None = None  # the resource that binds that floor: "compute" | "hbm" | "comm"
    step_time_total_s: float = 0.0  # sum of every step's wall time, seconds
    step_floor_total_s: float = 0.0  # sum of those steps' floors (0 without floor_gpu), seconds

    @property
    def last_step_floor_ratio(self) -> float | None:
        """Measured step time over its floor (>= 1; 1.0 would be the floor itself), or None without a floor."""
        if not self.last_step_floor_s or not self.last_step_time_s:
            return None
        return self.last_step_time_s / self.last_step_floor_s

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0
