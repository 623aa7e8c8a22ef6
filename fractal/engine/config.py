"""Engine configuration: frozen dataclasses built once (from kwargs or the CLI) and passed down. Pure Python.

`EngineConfig` is what users set. The engine derives a `SchedulerConfig` (what the scheduler and the
KV-cache manager need) once the model is loaded and the KV pool is sized, because `max_model_len` and
the number of blocks depend on the model and the memory budget.

Units: lengths and budgets in tokens, memory in bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

from fractal.errors import FractalError
from fractal.models.paths import config_file_for, resolve_model_dir

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
PREFILL_ORDERS = ("fcfs", "shortest")
MLA_MODES = ("auto", "absorb", "mha")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start.

    model: a directory with config.json (+ safetensors unless load_format="dummy", + tokenizer.json
      optionally).
    dtype: weight / activation / KV-cache dtype; "auto" takes the config's torch_dtype on CUDA and
      float32 on the CPU.
    device: "auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N".
    block_size: tokens per KV-cache block.
    max_num_seqs: sequences (running) per step at most.
    max_num_batched_tokens: tokens computed per step at most (decodes count 1 each).
    enable_chunked_prefill: split long prompts across steps; `prefill_chunk_size` caps one prompt's
      chunk per step (None: only the token budget caps it). Without chunked prefill a prompt is computed
      in one step, so max_num_batched_tokens must cover max_model_len.
    enable_prefix_caching: share full KV blocks between requests by content (hash chain).
    prefill_order: "fcfs" (arrival order) or "shortest" (fewest tokens still to compute first).
    preemption_balance: when the KV pool forces preemption, the most output tokens a preempted sequence may
      lag the running ones by near the end of a batch before one of them is swapped out for it (0: never;
      needs swap space; see fractal/engine/scheduler.py and docs/engine.md).
    swap_space: GiB of host memory (pinned on CUDA) that holds the KV of preempted sequences, so that they
      resume without recomputing it; a preemption that does not fit recomputes as without it. None: 4 GiB
      on CUDA (vLLM's former default), 0 on the CPU (the KV is in host memory already).
    kv_cache_memory_bytes: bytes for the KV pool; None takes `gpu_memory_utilization` of the free GPU
      memory after loading on CUDA, and DEFAULT_CPU_KV_BYTES on the CPU.
    num_gpu_blocks: fixes the number of KV blocks (overrides the byte budget).
    max_model_len: longest sequence (prompt + output) in tokens; None takes the model's
      max_position_embeddings, capped by what the KV pool holds.
    seed: seeds torch's default generator (requests without their own seed draw from it) and dummy weights.
    attention_backend / moe_backend: names registered in fractal.layers (None: the device's default).
    mla_mode: "auto" | "absorb" | "mha" for MLA models.
    floor_gpu: a GPU name of fractal.spec (e.g. "h100") or a GPU JSON file: each step's four-resource
      floor on that GPU is computed (fractal.perf.floor) and reported beside its measured time in
      EngineStats; None turns it off.
    enforce_eager: never use CUDA graphs (on CUDA, decode steps otherwise replay graphs captured for a
      ladder of batch sizes up to `cuda_graph_max_batch`, see fractal/engine/cuda_graphs.py).
    async_scheduling: overlap the CPU with the GPU: step N+1 is scheduled and launched before step N's
      tokens reach the host (decode inputs are read on the device from step N's sampled tokens); None
      turns it on for CUDA and off for the CPU. Same tokens as the synchronous loop.
    """

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    prefill_chunk_size: int | None = None
    enable_prefix_caching: bool = True
    prefill_order: str = "fcfs"
    preemption_balance: int = 32
    swap_space: float | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None
    max_model_len: int | None = None
    seed: int = 0
    attention_backend: str | None = None
    moe_backend: str | None = None
    mla_mode: str = "auto"
    floor_gpu: str | None = None
    enforce_eager: bool = False
    cuda_graph_max_batch: int = 512
    async_scheduling: bool | None = None

    def __post_init__(self) -> None:
        def bad(name: str, want: str):
            raise FractalError(f"{name}={getattr(self, name)!r} is invalid: {want}")

        def positive_int(name: str, allow_none: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, "must be an integer >= 1" + (" or None" if allow_none else ""))

        if not isinstance(self.model, str) or not self.model:
            bad("model", "must be a path to a model directory")
        if self.dtype not in DTYPES:
            bad("dtype", f"choose from {', '.join(DTYPES)}")
        if self.load_format not in LOAD_FORMATS:
            bad("load_format", f"choose from {', '.join(LOAD_FORMATS)}")
        if self.prefill_order not in PREFILL_ORDERS:
            bad("prefill_order", f"choose from {', '.join(PREFILL_ORDERS)}")
        if not isinstance(self.preemption_balance, int) or isinstance(self.preemption_balance, bool) \
                or self.preemption_balance < 0:
            bad("preemption_balance", "must be an integer >= 0 (0 turns balancing off)")
        if self.swap_space is not None and (not isinstance(self.swap_space, (int, float))
                                            or isinstance(self.swap_space, bool) or self.swap_space < 0):
            bad("swap_space", "must be a number of GiB >= 0 (0: preempt by recompute) or None (auto)")
        if not isinstance(self.device, str) or not (
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        ):
            bad("device", "choose auto, cpu, cuda or cuda:N")
        if not isinstance(self.enforce_eager, bool):
            bad("enforce_eager", "must be True or False")
        if self.async_scheduling not in (None, True, False):
            bad("async_scheduling", "must be True, False or None (auto: on for CUDA)")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "cuda_graph_max_batch"):
            positive_int(name)
        for name in ("prefill_chunk_size", "num_gpu_blocks", "max_model_len", "kv_cache_memory_bytes"):
            positive_int(name, allow_none=True)
        if not isinstance(self.gpu_memory_utilization, (int, float)) or not 0 < self.gpu_memory_utilization <= 1:
            bad("gpu_memory_utilization", "must be in (0, 1]")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            bad("seed", "must be an integer")
        if self.mla_mode not in MLA_MODES:
            bad("mla_mode", f"choose from {', '.join(MLA_MODES)}")
        if (
            not self.enable_chunked_prefill
            and self.max_model_len is not None
            and self.max_num_batched_tokens < self.max_model_len
        ):
            raise FractalError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than max_model_len="
                f"{self.max_model_len} with chunked prefill off: a long prompt could never be scheduled; "
                "raise max_num_batched_tokens or enable_chunked_prefill"
            )

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> "EngineConfig":
        """Like the constructor, but an unknown keyword gets a FractalError listing the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise FractalError(
                f"unknown engine option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names - {'model'}))}"
            )
        if isinstance(model, str) and model and not os.path.isdir(model):
            # a config.json file or a shipped config name (e.g. "llama-3.1-8b"): real shapes, random weights
            if kwargs.get("load_format", "auto") != "dummy":
                config_file_for(model)  # an unknown name fails here, naming the shipped ones
                raise FractalError(
                    f"model {model!r} is a config without weights; pass load_format='dummy' (--load-format dummy) "
                    f"for random weights at its real shapes, or give a model directory"
                )
            model, _ = resolve_model_dir(model)
        return cls(model=model, **kwargs)


@dataclass(frozen=True)
class SchedulerConfig:
    """What the scheduler and the KV-cache manager need; derived by the engine after sizing the pool."""

    num_blocks: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_chunked_prefill: bool = True
    prefill_chunk_size: int | None = None
    enable_prefix_caching: bool = True
    prefill_order: str = "fcfs"
    preemption_balance: int = 0
    num_host_blocks: int = 0  # swap space for preempted sequences' KV, in blocks (0: preempt by recompute)

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FractalError(f"{name}={value!r} is invalid: must be an integer >= 1")
        if self.prefill_order not in PREFILL_ORDERS:
            raise FractalError(f"prefill_order={self.prefill_order!r} is invalid: choose from {PREFILL_ORDERS}")
        if not isinstance(self.preemption_balance, int) or self.preemption_balance < 0:
            raise FractalError(f"preemption_balance={self.preemption_balance!r} is invalid: must be an integer >= 0")
        if not isinstance(self.num_host_blocks, int) or self.num_host_blocks < 0:
            raise FractalError(f"num_host_blocks={self.num_host_blocks!r} is invalid: must be an integer >= 0")
        capacity = self.num_blocks * self.block_size
        if self.max_model_len > capacity:
            raise FractalError(
                f"max_model_len={self.max_model_len} exceeds the KV pool ({self.num_blocks} blocks x "
                f"{self.block_size} tokens = {capacity} tokens); lower max_model_len or give the KV cache more memory"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise FractalError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is smaller than max_model_len="
                f"{self.max_model_len} with chunked prefill off; raise it or enable chunked prefill"
            )

    @property
    def chunk_cap(self) -> int:
        """Most prompt tokens one sequence computes in one step."""
        if not self.enable_chunked_prefill:
            return self.max_model_len
        return self.prefill_chunk_size or self.max_num_batched_tokens
