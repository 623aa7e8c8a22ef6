"""The model runner: owns the model, the KV-cache tensors and the sampler; runs one SchedulerOutput.

Per step (`execute`):
  1. flatten the chunks: input_ids [T] and positions [T] (start_pos .. start_pos + len - 1 per chunk);
  2. `AttentionMetadata.build` from query lengths, cached context lengths (= start_pos) and block tables;
  3. `model.forward(...)` -> hidden [T, H]; every attention layer writes the new tokens' KV into the
     cache slots and attends over its sequence's blocks;
  4. keep the last row of each chunk that samples, `model.compute_logits` -> fp32 [B, V];
  5. `Sampler` with a `SamplingBatch` of those sequences' params, tokens so far and generators.

The KV pool is sized here (`size_kv_pool`), from `model.kv_cache_spec()` and the memory budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fractal.engine.config import EngineConfig
from fractal.engine.request import Sequence
from fractal.engine.scheduler_output import SchedulerOutput
from fractal.errors import FractalError
from fractal.layers.attention_metadata import AttentionMetadata
from fractal.layers.sampler import Sampler, SamplingBatch, make_generator

# KV budget on the CPU when none is given; never more than max_num_seqs full-length sequences need.
DEFAULT_CPU_KV_BYTES = 256 * 1024**2


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


@dataclass
class SampleResult:
    token_id: int
    logprob: float
    top: dict[int, float] | None  # top-k logprobs when the request asked for them


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config: dict):
        from fractal.models.loader import load_model

        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, hf_config)
        torch.manual_seed(config.seed)
        self.model = load_model(
            config.model, dtype=self.dtype, device=self.device, load_format=config.load_format,
            attention_backend=config.attention_backend, moe_backend=config.moe_backend,
            mla_mode=config.mla_mode, seed=config.seed,
        )
        self.kv_spec = self.model.kv_cache_spec()
        self.block_size = config.block_size
        self.num_blocks = 0
        self.kv_caches: list[torch.Tensor] = []
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}

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
        if num_blocks < 1:
            raise FractalError(
                f"the KV-cache budget ({budget} bytes) holds no block of {self.block_size} tokens "
                f"({bytes_per_block} bytes each); raise kv_cache_memory_bytes or gpu_memory_utilization"
            )
        return num_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.kv_caches = self.kv_spec.allocate(num_blocks, self.block_size, self.device)

    # --- one step -----------------------------------------------------------------------------------
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

    @torch.inference_mode()
    def execute(
        self, output: SchedulerOutput, seqs: dict[int, Sequence], eos_token_ids: set[int] | frozenset[int]
    ) -> dict[int, SampleResult]:
        """Run the step; returns the sampled token of every chunk with `sample=True`, by seq_id."""
        if output.is_empty:
            return {}
        input_ids: list[int] = []
        positions: list[int] = []
        for chunk in output.chunks:
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start_pos, chunk.seq_len))
        meta = AttentionMetadata.build(
            query_lens=[c.num_tokens for c in output.chunks],
            context_lens=[c.start_pos for c in output.chunks],
            block_tables=[c.block_table for c in output.chunks],
            block_size=self.block_size,
            device=self.device,
        )
        hidden = self.model.forward(
            torch.tensor(input_ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            meta,
            self.kv_caches,
        )
        rows, sampled_seqs = [], []
        end = 0
        for chunk in output.chunks:
            end += chunk.num_tokens
            if chunk.sample:
                rows.append(end - 1)
                sampled_seqs.append(seqs[chunk.seq_id])
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        batch = SamplingBatch.build(
            params=[s.params for s in sampled_seqs],
            prompt_token_ids=[s.prompt_token_ids for s in sampled_seqs],
            output_token_ids=[s.output_token_ids for s in sampled_seqs],
            generators=[self._generator(s) for s in sampled_seqs],
            device=self.device,
            eos_token_ids=set(eos_token_ids),
        )
        out = self.sampler(logits, batch)
        tokens = out.sampled.tolist()
        logprobs = out.sampled_logprob.tolist()
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        results = {}
        for i, seq in enumerate(sampled_seqs):
            top = None
            k = seq.params.logprobs
            if k is not None:
                top = {tokens[i]: logprobs[i]}
                if k > 0 and top_ids is not None:
                    top.update(zip(top_ids[i][:k], top_lps[i][:k]))
            results[seq.seq_id] = SampleResult(token_id=tokens[i], logprob=logprobs[i], top=top)
        return results
