"""The model runner: owns the model, the KV-cache tensors and the sampler; runs one SchedulerOutput.

Per step (`launch`, then `StepHandle.result`; `execute` does both):
  1. flatten the chunks on the host: input_ids [T], positions [T] (start_pos .. start_pos + len - 1 per chunk),
     slot_mapping [T], query/sequence lengths, block tables (numpy for long chunks);
  2. copy them to the device without a stream sync (pinned staging, non-blocking), so the host can prepare
     the next step while the device still runs this one; a decode token that is still a placeholder
     (`PLACEHOLDER`, overlap mode) is read on the device from the previous step's sampled tokens;
  3. decode-only steps replay a CUDA graph (fractal/engine/cuda_graphs.py) when one fits; otherwise
     `model.forward(...)` runs eagerly with an AttentionMetadata built from the same tensors;
  4. the last row of each chunk that samples -> `model.compute_logits` -> sampling (all-greedy steps on CUDA:
     one kernel over the model-dtype logits gives the argmax and its logprob; otherwise float32 logits and the
     Sampler with a SamplingBatch moved to the device non-blocking);
  5. the sampled ids and logprobs are copied to pinned host memory behind a CUDA event; `result()` waits for
     that event only.
On CUDA the default backends are the Triton ones (fractal/layers/gpu_backends.py) and RMSNorm / RoPE / the
gated MLP activation are swapped for kernel-backed modules; attention_backend="torch" keeps the plain path.

The KV pool is sized here (`size_kv_pool`), from `model.kv_cache_spec()` and the memory budget; with CUDA
graphs one extra block (index num_blocks, never handed out by the scheduler) takes the padded rows' writes.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from fractal.engine.config import EngineConfig
from fractal.engine.request import Sequence
from fractal.engine.scheduler_output import SchedulerOutput
from fractal.errors import FractalError
from fractal.kernels.greedy_sample import greedy_sample
from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.sampler import Sampler, SamplingBatch, make_generator

# KV budget on the CPU when none is given; never more than max_num_seqs full-length sequences need.
DEFAULT_CPU_KV_BYTES = 256 * 1024**2
# Most device memory the swap-ins' staging buffer takes (swap_staging_blocks): it comes out of the headroom that
# the KV pool's sizing leaves to activations.
SWAP_STAGING_MAX_BYTES = 256 * 1024**2
log = logging.getLogger(__name__)
# token id of a decode input that is still on the device (the previous step's sample, overlap mode)
PLACEHOLDER = -1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FractalError(f"device={name!r} is invalid: CUDA is not available here; use device='cpu'")
    return device


def resolve_dtype(name: str, device: torch.device, hf_config: dict) -> torch.dtype:
    """"auto": the checkpoint's dtype on CUDA (bfloat16 if unknown), float32 on the CPU."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        name = hf_config.get("dtype") or hf_config.get("torch_dtype")
        name = name if name in ("float32", "bfloat16", "float16") else "bfloat16"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def swap_staging_blocks(bytes_per_block: int, block_size: int, max_model_len: int, num_host_blocks: int,
                        max_bytes: int = SWAP_STAGING_MAX_BYTES) -> int:
    """Blocks of the device buffer that swap-ins are staged through (CUDA, init_swap_space): one sequence of
    max_model_len tokens, so that a swap-in usually takes one chunk, but no more than the host pool holds (no
    step swaps in more) nor over max_bytes (longer swap-ins take several chunks), and at least 1."""
    per_sequence = -(-max_model_len // block_size)
    return max(1, min(per_sequence, num_host_blocks, max_bytes // bytes_per_block))


@dataclass
class SampleResult:
    token_id: int
    logprob: float
    top: dict[int, float] | None  # top-k logprobs when the request asked for them


class StepHandle:
    """A launched step. `result()` waits for its sampled tokens and returns {seq_id: SampleResult}."""

    def __init__(self, seq_ids: list[int], num_logprobs: list[int | None], tokens, logprobs, top_ids, top_lps,
                 event) -> None:
        self.seq_ids = seq_ids
        self.num_logprobs = num_logprobs
        self._tensors = (tokens, logprobs, top_ids, top_lps)
        self._event = event
        self._results: dict[int, SampleResult] | None = None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def result(self) -> dict[int, SampleResult]:
        if self._results is not None:
            return self._results
        if self._event is not None:
            self._event.synchronize()
        tokens_t, logprobs_t, top_ids_t, top_lps_t = self._tensors
        tokens = tokens_t.tolist() if tokens_t is not None else []
        logprobs = logprobs_t.tolist() if logprobs_t is not None else []
        top_ids = top_ids_t.tolist() if top_ids_t is not None else None
        top_lps = top_lps_t.tolist() if top_lps_t is not None else None
        results = {}
        for i, seq_id in enumerate(self.seq_ids):
            top = None
            k = self.num_logprobs[i]
            if k is not None:
                top = {tokens[i]: logprobs[i]}
                if k > 0 and top_ids is not None:
                    top.update(zip(top_ids[i][:k], top_lps[i][:k]))
            results[seq_id] = SampleResult(token_id=tokens[i], logprob=logprobs[i], top=top)
        self._results = results
        self._tensors = (None, None, None, None)
        return results


_EMPTY = StepHandle([], [], None, None, None, None, None)


@dataclass
class _HostBatch:
    """One step flattened on the host (lists / numpy), before any device copy."""

    ids: list[int]
    positions: np.ndarray | list[int]
    slots: np.ndarray | list[int]
    query_lens: list[int]
    seq_lens: list[int]
    tables: list[list[int]]
    sample_rows: list[int]
    sample_seqs: list[Sequence]
    placeholder_rows: list[int]
    placeholder_seq_ids: list[int]

    @property
    def decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)


def _simple_greedy(params) -> bool:
    return (params.temperature == 0.0 and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0 and not params.logprobs)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: dict):
        from fractal.models.loader import load_model

        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, hf_config)
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda:
            import fractal.layers.gpu_backends  # noqa: F401  registers the Triton backends as CUDA defaults
        torch.manual_seed(config.seed)
        self.model = load_model(
            config.model, dtype=self.dtype, device=self.device, load_format=config.load_format,
            attention_backend=config.attention_backend, moe_backend=config.moe_backend,
            mla_mode=config.mla_mode, seed=config.seed,
        )
        self.fast_modules: dict[str, int] = {}
        attn_name = getattr(self.model.attention_backend, "name", "torch")
        moe_name = getattr(self.model.moe_backend, "name", "torch")
        if self.is_cuda and attn_name != "torch":
            from fractal.layers.gpu_backends import accelerate_model

            self.fast_modules = accelerate_model(self.model)
        has_moe = self.model.config.moe is not None
        self.use_cuda_graphs = (
            self.is_cuda and not config.enforce_eager
            and getattr(self.model.attention_backend, "supports_cuda_graphs", False)
            and not (has_moe and moe_name == "torch")
        )
        if self.use_cuda_graphs:
            from fractal.layers.gpu_backends import fast_decode_supported

            self.use_cuda_graphs = fast_decode_supported(self.model)
        self.kv_spec = self.model.kv_cache_spec()
        self.block_size = config.block_size
        self.num_blocks = 0
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}
        self.graphs = None  # CudaGraphRunner once the KV cache exists
        # the previous step's sampled ids on the device, and each sampled sequence's row in it (overlap)
        self._prev_sampled: torch.Tensor | None = None
        self._prev_rows: dict[int, int] = {}
        self._swapped: dict[int, list[int]] = {}  # seq_id -> host blocks of its swapped-out KV (apply_swaps)
        self._host_pool: torch.Tensor | None = None
        self._host_free: list[int] = []
        self._copy_stream = None  # CUDA: the swap copies' stream (init_swap_space)
        self._staging: torch.Tensor | None = None  # CUDA: the swap-ins' host -> device staging buffer
        self._staging_blocks = 0  # its capacity in blocks; 0 (CPU, no buffer): a step's swap-ins in one chunk
        self._staging_free = None  # CUDA: event after the last scatters that read the staging buffer

    # --- KV pool -------------------------------------------------------------------------------------
    def size_kv_pool(self, max_model_len: int) -> int:
        """Number of KV blocks: the override, else the byte budget (explicit, the free GPU memory, or the CPU default)."""
        cfg = self.config
        bytes_per_block = self.kv_spec.bytes_per_token * self.block_size
        if cfg.num_gpu_blocks is not None:
            return cfg.num_gpu_blocks
        if cfg.kv_cache_memory_bytes is not None:
            budget = cfg.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(free - total * (1.0 - cfg.gpu_memory_utilization))
        else:
            needed = cfg.max_num_seqs * -(-max_model_len // self.block_size) * bytes_per_block
            budget = min(DEFAULT_CPU_KV_BYTES, needed)
        num_blocks = budget // bytes_per_block
        if self.use_cuda_graphs:
            num_blocks -= 1  # the pad block
        if num_blocks < 1:
            raise FractalError(
                f"the KV-cache budget ({budget} bytes) holds no block of {self.block_size} tokens "
                f"({bytes_per_block} bytes each); raise kv_cache_memory_bytes or gpu_memory_utilization"
            )
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int, max_model_len: int | None = None) -> None:
        self.num_blocks = num_blocks
        extra = 1 if self.use_cuda_graphs else 0
        self.kv_caches = self.kv_spec.allocate(num_blocks + extra, self.block_size, self.device)
        if self.use_cuda_graphs:
            from fractal.engine.cuda_graphs import CudaGraphRunner

            self.graphs = CudaGraphRunner(
                self.model, self.kv_caches, max_batch=min(self.config.max_num_seqs, self.config.cuda_graph_max_batch),
                block_size=self.block_size, max_model_len=max_model_len or self.model.config.max_position_embeddings,
                pad_block=num_blocks, device=self.device,
            )

    def capture_cuda_graphs(self) -> float:
        """Capture the decode graphs of the smallest context bucket for every ladder size; returns seconds."""
        if self.graphs is None:
            return 0.0
        t0 = time.perf_counter()
        self.graphs.capture()
        return time.perf_counter() - t0

    def warm_up(self, max_num_batched_tokens: int, max_model_len: int, force: bool = False) -> float:
        """Run a few steps on throw-away sequences (CUDA only): a full-budget prefill of long prompts, a mixed
        decode+prefill step, 1k / 2k / 4k-token prefills and a one-prompt prefill; returns seconds. The first real
        steps then find the caching allocator grown, cuBLAS/CUTLASS plans made and the eager Triton kernels compiled
        (the first 8k-token step of a cold engine took 2x its warm time, docs/perf-notes.md round 5). The KV it
        writes lands in free blocks and is never read by a request."""
        if not (self.is_cuda or force) or self.num_blocks == 0:
            return 0.0
        from fractal.engine.synthetic_batch import synthetic_step
        from fractal.sampling_params import SamplingParams

        t0 = time.perf_counter()
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        vocab = self.model.config.vocab_size
        # step 1: long prompts (the long-query prefill configs); step 2: decodes + 512-token prompts (the short ones)
        long_len = max(1, min(2048, max_model_len - 1))
        seq_len = max(1, min(512, max_model_len - 1))
        # then mid-size prefills: the MoE experts' Triton configs for 1k-4k token steps (eager only; 4k reaches the
        # XL tiles of 6-expert models)
        steps = [(0, max_num_batched_tokens, long_len),
                 (min(32, self.config.max_num_seqs), max_num_batched_tokens - 32, seq_len)]
        steps += [(0, n, seq_len) for n in (1024, 2048, 4096) if n < max_num_batched_tokens]
        # one prompt: its one sampled row takes the lm_head GEMV kernel eagerly (a wide vocabulary, a wider tile)
        steps.append((0, seq_len, seq_len))
        for n_decode, prefill_tokens, prompt_len in steps:
            rows = [(seq_len, [(7 * i + 3) % vocab]) for i in range(n_decode)]
            left = max(0, prefill_tokens)
            while left > 0:
                n = min(prompt_len, left)
                rows.append((0, [(11 * len(rows) + k) % vocab for k in range(n)]))
                left -= n
            # negative ids: never a request's
            output, seqs, blocks = synthetic_step(rows, self.block_size, params, first_seq_id=-(1 << 40))
            if blocks > self.num_blocks:
                break  # a pool this small serves short batches only; nothing to warm at this size
            self.execute(output, seqs, frozenset())
        self._prev_sampled, self._prev_rows = None, {}  # no request sampled in these steps
        if self.is_cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    # --- helpers ---------------------------------------------------------------------------------------
    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            # sibling i of a seeded request draws from seed + i, so the n outputs differ yet repeat
            gen = make_generator(seq.params.seed + seq.index, self.device)
            self.generators[seq.seq_id] = gen
        return gen

    def free(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)
        self._release_host_blocks(self._swapped.pop(seq_id, None) or [])

    # --- swap space: preempted sequences' KV in host memory ------------------------------------------------------
    def init_swap_space(self, num_host_blocks: int, max_model_len: int | None = None) -> int:
        """One host buffer (pinned on CUDA) of `num_host_blocks` KV blocks, each holding one block of every layer
        contiguously, allocated once: pinning memory per swap costs tens of milliseconds (R8-6). On CUDA also the
        device buffer that swap-ins are staged through (`swap_staging_blocks` blocks of sequences up to
        `max_model_len` tokens; call it after allocate_kv_cache, so that it cannot take the pool's memory). Returns
        the blocks the host buffer holds: 0 (preemption by recompute) when the host, or the device for the staging
        buffer, cannot give that much memory."""
        self._host_pool, self._host_free = None, []
        self._staging, self._staging_blocks, self._staging_free = None, 0, None
        if num_host_blocks <= 0:
            return 0
        layer = self.kv_spec.layer_shape(1, self.block_size)
        block_shape = (self.kv_spec.num_layers, *layer[:self._block_dim], *layer[self._block_dim + 1:])
        try:
            self._host_pool = torch.empty((num_host_blocks, *block_shape), dtype=self.kv_spec.dtype,
                                          pin_memory=self.is_cuda)
        except RuntimeError as exc:  # out of (pinnable) host memory
            log.warning("no swap space (%d KV blocks): %s; preempted sequences will be recomputed", num_host_blocks,
                        str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return 0
        if self.is_cuda:
            block_bytes = self.kv_spec.bytes_per_block(self.block_size)
            max_len = max_model_len or self.config.max_model_len or self.model.config.max_position_embeddings
            blocks = swap_staging_blocks(block_bytes, self.block_size, max_len, num_host_blocks)
            try:
                self._staging = torch.empty((blocks, *block_shape), dtype=self.kv_spec.dtype, device=self.device)
            except RuntimeError as exc:  # out of device memory
                log.warning("no swap space: no device memory for its %d-block staging buffer (%.1f MiB): %s; "
                            "preempted sequences will be recomputed", blocks, blocks * block_bytes / 2**20,
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self._host_pool = None
                return 0
            self._staging_blocks = blocks
            log.info("swap space: %d host KV blocks; swap-ins staged through %d device blocks (%.1f MiB: "
                     "%d-token sequences, at most %d MiB)", num_host_blocks, blocks, blocks * block_bytes / 2**20,
                     max_len, SWAP_STAGING_MAX_BYTES // 2**20)
        self._host_free = list(range(num_host_blocks))
        self._copy_stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        return num_host_blocks

    @property
    def _block_dim(self) -> int:
        return 1 if self.kv_spec.kind == "gqa" else 0  # the block axis of a layer's cache

    @staticmethod
    def _runs(ids: list[int]):
        """(first host block, count, offset in ids) of each run of consecutive ids."""
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[i - 1] + 1:
                yield ids[start], i - start, start
                start = i

    @staticmethod
    def _chunks(swap_in: list[tuple[int, list[int]]], capacity: int):
        """The swap-ins' blocks, in order, in chunks of at most `capacity` blocks (what the staging buffer holds):
        lists of (seq_id, slice of its blocks); small sequences share a chunk, a large one spans several."""
        if capacity < 1:
            raise ValueError(f"a chunk must hold at least one block, not {capacity}")
        chunk, room = [], capacity
        for seq_id, blocks in swap_in:
            start = 0
            while start < len(blocks):
                take = min(room, len(blocks) - start)
                chunk.append((seq_id, slice(start, start + take)))
                start, room = start + take, room - take
                if room == 0:
                    yield chunk
                    chunk, room = [], capacity
        if chunk:
            yield chunk

    def apply_swaps(self, output: SchedulerOutput) -> None:
        """The step's KV moves, enqueued before its forward. On the compute stream, in order: the swap-out gathers
        (each sequence's blocks of every layer into one staging tensor; they see every earlier step's writes, and
        this step may hand those blocks to others) and then the swap-in scatters (into the new blocks, possibly
        the same ones). The PCIe copies run on a copy stream so that they overlap the GPU's work: device -> host
        starts after its gather and overlaps this step; host -> device goes through the runner's staging buffer
        (init_swap_space, `swap_staging_blocks`), not memory of the copy stream's pool, whose segments the compute
        stream could never reuse (R8-12). The swap-ins go in chunks of what the buffer holds (`_chunks`): the
        first is copied at once (the previous step is usually still running), before the gathers; each chunk's
        scatters wait for its copy (event), and the next copy into the buffer, this step's or a later one's, waits
        for those scatters (event). Host blocks are reused only by later copies on the copy stream, so after the
        copies that read them."""
        if not (output.swap_out or output.swap_in):
            return
        dim, pool = self._block_dim, self._host_pool
        cuda = self.is_cuda
        main = torch.cuda.current_stream() if cuda else None
        copy = self._copy_stream
        host_ids = {seq_id: self._swapped.pop(seq_id) for seq_id, _ in output.swap_in}
        capacity = self._staging_blocks or max(1, sum(len(blocks) for _, blocks in output.swap_in))
        chunks = list(self._chunks(output.swap_in, capacity))
        staged = self._stage(chunks[0], host_ids) if chunks else None  # nothing on the GPU has to finish for it
        for seq_id, blocks in output.swap_out:
            index = self._h2d(blocks, torch.long)
            gathered = torch.empty((len(blocks), *pool.shape[1:]), dtype=pool.dtype, device=self.device)
            for layer, cache in enumerate(self.kv_caches):
                gathered[:, layer].copy_(cache.index_select(dim, index).movedim(dim, 0))
            ids, self._host_free = self._host_free[:len(blocks)], self._host_free[len(blocks):]
            if cuda:
                copy.wait_stream(main)  # after the gather
                gathered.record_stream(copy)
            with torch.cuda.stream(copy) if cuda else _nullcontext():
                for first, count, offset in self._runs(ids):
                    pool[first:first + count].copy_(gathered[offset:offset + count], non_blocking=cuda)
            self._swapped[seq_id] = ids
        blocks_of = dict(output.swap_in)
        for i, chunk in enumerate(chunks):
            if i:
                staged = self._stage(chunk, host_ids)
            buffer, arrived = staged
            if cuda:
                main.wait_event(arrived)
            index = self._h2d([b for seq_id, part in chunk for b in blocks_of[seq_id][part]], torch.long)
            for layer, cache in enumerate(self.kv_caches):
                cache.index_copy_(dim, index, buffer[:, layer].movedim(0, dim))
            if cuda:
                self._staging_free = main.record_event()  # the buffer's next copy waits for these reads

    def _stage(self, chunk: list[tuple[int, slice]], host_ids: dict[int, list[int]]):
        """Enqueue one chunk's host -> device copies (CUDA: into the staging buffer, on the copy stream, after the
        scatters that read its previous contents; CPU: into a tensor of its own). Returns the staged blocks and,
        on CUDA, the event of their arrival. The chunk's host blocks go back to the free list once their copies
        are enqueued."""
        pool, cuda, copy = self._host_pool, self.is_cuda, self._copy_stream
        size = sum(part.stop - part.start for _, part in chunk)
        with torch.cuda.stream(copy) if cuda else _nullcontext():
            if self._staging is not None:
                if self._staging_free is not None:
                    copy.wait_event(self._staging_free)
                buffer = self._staging[:size]
            else:
                buffer = torch.empty((size, *pool.shape[1:]), dtype=pool.dtype, device=self.device)
            at = 0
            for seq_id, part in chunk:
                ids = host_ids[seq_id][part]
                for first, count, offset in self._runs(ids):
                    buffer[at + offset:at + offset + count].copy_(pool[first:first + count], non_blocking=cuda)
                at += len(ids)
                self._release_host_blocks(ids)
            arrived = copy.record_event() if cuda else None
        return buffer, arrived

    def _release_host_blocks(self, host_ids: list[int]) -> None:
        """Host blocks back to the free list, kept sorted so that later swap-outs get long consecutive runs."""
        if host_ids:
            self._host_free = sorted(self._host_free + host_ids)

    def _h2d(self, data, dtype: torch.dtype) -> torch.Tensor:
        """Host data -> device tensor; on CUDA through pinned memory without a stream sync."""
        t = torch.as_tensor(data, dtype=dtype)
        if not self.is_cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    def _d2h(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None or not self.is_cuda:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    # --- one step ------------------------------------------------------------------------------------
    def _flatten(self, output: SchedulerOutput, seqs: dict[int, Sequence]) -> _HostBatch:
        bs = self.block_size
        ids: list[int] = []
        pos_parts: list = []
        slot_parts: list = []
        short_pos: list[int] = []
        short_slots: list[int] = []
        q_lens, seq_lens, tables = [], [], []
        sample_rows, sample_seqs, ph_rows, ph_seqs = [], [], [], []
        row = 0
        for chunk in output.chunks:
            n, start, table = chunk.num_tokens, chunk.start_pos, chunk.block_table
            ids.extend(chunk.token_ids)
            if n <= 8:
                for p in range(start, start + n):
                    short_pos.append(p)
                    short_slots.append(table[p // bs] * bs + p % bs)
            else:
                if short_pos:
                    pos_parts.append(np.asarray(short_pos, dtype=np.int64))
                    slot_parts.append(np.asarray(short_slots, dtype=np.int64))
                    short_pos, short_slots = [], []
                p = np.arange(start, start + n, dtype=np.int64)
                pos_parts.append(p)
                slot_parts.append(np.asarray(table, dtype=np.int64)[p // bs] * bs + p % bs)
            if chunk.token_ids[-1] < 0 or (n > 1 and min(chunk.token_ids) < 0):
                for j, t in enumerate(chunk.token_ids):
                    if t < 0:
                        ph_rows.append(row + j)
                        ph_seqs.append(chunk.seq_id)
            q_lens.append(n)
            seq_lens.append(start + n)
            tables.append(table)
            row += n
            if chunk.sample:
                sample_rows.append(row - 1)
                sample_seqs.append(seqs[chunk.seq_id])
        if pos_parts:
            if short_pos:
                pos_parts.append(np.asarray(short_pos, dtype=np.int64))
                slot_parts.append(np.asarray(short_slots, dtype=np.int64))
            positions, slots = np.concatenate(pos_parts), np.concatenate(slot_parts)
        else:
            positions, slots = short_pos, short_slots
        return _HostBatch(ids, positions, slots, q_lens, seq_lens, tables, sample_rows, sample_seqs, ph_rows, ph_seqs)

    def _block_table_array(self, tables: list[list[int]], rows: int | None = None, pad: int = 0) -> np.ndarray:
        rows = len(tables) if rows is None else rows
        width = max((len(t) for t in tables), default=1) or 1
        arr = np.full((rows, width), pad, dtype=np.int32)
        for i, t in enumerate(tables):
            arr[i, : len(t)] = t
        return arr

    def _placeholder_fixer(self, hb: _HostBatch):
        """A function that writes the device-side tokens of placeholder rows into an input_ids view."""
        if not hb.placeholder_rows:
            return lambda ids: None
        if self._prev_sampled is None:
            raise RuntimeError("a placeholder token was scheduled but no previous step sampled on the device")
        try:
            src = [self._prev_rows[s] for s in hb.placeholder_seq_ids]
        except KeyError as exc:
            raise RuntimeError(f"sequence {exc.args[0]} has a placeholder token but did not sample last step") from None
        rows_t = self._h2d(hb.placeholder_rows, torch.long)
        src_t = self._h2d(src, torch.long)
        prev = self._prev_sampled

        def fix(ids: torch.Tensor) -> None:
            ids[rows_t] = prev[src_t]

        return fix

    def _forward(self, hb: _HostBatch) -> torch.Tensor:
        """Hidden states of the sampling rows [B, H] (graph replay when it fits, else eager)."""
        fix = self._placeholder_fixer(hb)
        num_rows = len(hb.ids)
        if self.graphs is not None and hb.decode_only:
            key = self.graphs.key_for(num_rows, max(hb.seq_lens))
            if key is not None:
                size = key[0]
                pad = size - num_rows
                pad_slot = self.graphs.pad_block * self.block_size
                ids = self._h2d([max(t, 0) for t in hb.ids] + [0] * pad, torch.long)
                hidden = self.graphs.run(
                    key, ids,
                    self._h2d(list(hb.positions) + [0] * pad, torch.long),
                    self._h2d(list(hb.slots) + [pad_slot] * pad, torch.long),
                    self._h2d(hb.seq_lens + [1] * pad, torch.int32),
                    self._h2d(self._block_table_array(hb.tables, size, self.graphs.pad_block), torch.int32),
                    num_rows, fix,
                )
                if hidden is not None:
                    return hidden  # decode-only: every row samples, in order
        ids = self._h2d([max(t, 0) for t in hb.ids], torch.long)
        fix(ids)
        starts = [0]
        for q in hb.query_lens:
            starts.append(starts[-1] + q)
        meta = AttentionMetadata(
            query_start_loc=self._h2d(starts, torch.int32),
            seq_lens=self._h2d(hb.seq_lens, torch.int32),
            block_tables=self._h2d(self._block_table_array(hb.tables), torch.int32),
            slot_mapping=self._h2d(hb.slots, torch.long),
            block_size=self.block_size,
            query_lens_cpu=list(hb.query_lens),
            seq_lens_cpu=list(hb.seq_lens),
        )
        hidden = self.model.forward(ids, self._h2d(hb.positions, torch.long), meta, self.kv_caches)
        if len(hb.sample_rows) == num_rows:
            return hidden
        return hidden.index_select(0, self._h2d(hb.sample_rows, torch.long))

    def _fast_greedy(self, seqs: list[Sequence]) -> bool:
        """All rows greedy with nothing to apply (penalties, min_tokens, logprobs): on CUDA one kernel reads the
        model-dtype logits for the argmax and its logprob (fractal/kernels/greedy_sample.py)."""
        return self.is_cuda and all(_simple_greedy(s.params) and s.num_output_tokens >= s.params.min_tokens
                                    for s in seqs)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], eos_token_ids):
        """(sampled ids [B], their logprobs [B], top ids [B, K] | None, top logprobs | None) on the device."""
        batch = SamplingBatch.build(
            params=[s.params for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            output_token_ids=[s.output_token_ids for s in seqs],
            generators=[self._generator(s) for s in seqs],
            device="cpu" if self.is_cuda else self.device,
            eos_token_ids=set(eos_token_ids),
        )
        if self.is_cuda:  # built on the host, moved without a stream sync
            moved = {f.name: self._h2d(getattr(batch, f.name), getattr(batch, f.name).dtype)
                     for f in dataclasses.fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}
            batch = dataclasses.replace(batch, **moved)
        out = self.sampler(logits, batch)
        return out.sampled, out.sampled_logprob, out.top_ids, out.top_logprobs

    @torch.inference_mode()
    def launch(
        self, output: SchedulerOutput, seqs: dict[int, Sequence], eos_token_ids: set[int] | frozenset[int]
    ) -> StepHandle:
        """Enqueue the step on the device; the host returns before it finishes (on CUDA)."""
        if output.is_empty:
            return _EMPTY
        hb = self._flatten(output, seqs)
        hidden = self._forward(hb)
        if not hb.sample_seqs:
            return _EMPTY
        if self._fast_greedy(hb.sample_seqs):
            sampled, logprob = greedy_sample(self.model.compute_logits(hidden, upcast=False))
            top_ids = top_lps = None
        else:
            logits = self.model.compute_logits(hidden)
            sampled, logprob, top_ids, top_lps = self._sample(logits, hb.sample_seqs, eos_token_ids)
        self._prev_sampled = sampled
        self._prev_rows = {s.seq_id: i for i, s in enumerate(hb.sample_seqs)}
        event = None
        host = [self._d2h(t) for t in (sampled, logprob, top_ids, top_lps)]
        if self.is_cuda:
            event = torch.cuda.Event()
            event.record()
        return StepHandle([s.seq_id for s in hb.sample_seqs], [s.params.logprobs for s in hb.sample_seqs],
                          *host, event)

    def execute(
        self, output: SchedulerOutput, seqs: dict[int, Sequence], eos_token_ids: set[int] | frozenset[int]
    ) -> dict[int, SampleResult]:
        """Run the step; returns the sampled token of every chunk with `sample=True`, by seq_id."""
        return self.launch(output, seqs, eos_token_ids).result()
