"""Helpers for tests (reused by other areas' tests): tiny random HF checkpoints and a paged-KV greedy driver.

make_tiny_model(family, path, seed=0, **overrides) builds a tiny random model with HF transformers (needed only
here, it is a test dependency), saves it with `save_pretrained` and returns the path. Families: "llama" (Llama-3
RoPE scaling), "qwen3" (tied embeddings), "qwen3_moe" (one dense layer + MoE), "deepseek_v2" (no q-LoRA,
group_limited_greedy softmax routing, YaRN), "deepseek_v3" (q-LoRA, sigmoid + correction bias + groups, YaRN
with mscale != mscale_all_dim). All: hidden 64, 4 heads, vocab 256, bos 0, eos 1, initializer_range 0.1;
RMSNorm weights and the V3 correction bias are randomised too, so a mix-up in loading shows in the logits.
`overrides` go to the HF config (e.g. num_hidden_layers=3); `max_shard_size` (e.g. "40KB") writes a sharded
checkpoint with model.safetensors.index.json.

run_paged_greedy(model, prompts, ...) runs prompts through the model the way an engine would, with a small-block
paged cache, shuffled block ids, chunked prefill mixed with decodes, and greedy decoding; it returns the
generated tokens and the logits of every position it computed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fractal.errors import FractalError
from fractal.layers.attention_metadata import AttentionMetadata

FAMILIES = ("llama", "qwen3", "qwen3_moe", "deepseek_v2", "deepseek_v3")

_COMMON: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.1,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
    tie_word_embeddings=False,
)

_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64),
    ),
    "qwen3": dict(
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    "qwen3_moe": dict(
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    "deepseek_v2": dict(
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        topk_method="group_limited_greedy",
        n_group=2,
        topk_group=1,
        routed_scaling_factor=1.5,
        first_k_dense_replace=1,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                             beta_fast=32.0, beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707),
    ),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=1,
        num_nextn_predict_layers=0,
        rope_interleave=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                             beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=0.8),
    ),
}


def tiny_hf_config(family: str, **overrides: Any):
    """The HF config object make_tiny_model would save."""
    import transformers

    if family not in FAMILIES:
        raise FractalError(f"family {family!r} is not valid; valid: {list(FAMILIES)}")
    classes = {
        "llama": transformers.LlamaConfig,
        "qwen3": transformers.Qwen3Config,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "deepseek_v2": transformers.DeepseekV2Config,
        "deepseek_v3": transformers.DeepseekV3Config,
    }
    kwargs = {**_COMMON, **_FAMILY_DEFAULTS[family], **overrides}
    return classes[family](**kwargs)


def make_tiny_model(
    family: str, path: str | Path, *, seed: int = 0, max_shard_size: str | None = None, **overrides: Any
) -> Path:
    """Saves a tiny random HF model of `family` (float32 safetensors + config.json) into `path`; returns it."""
    import transformers

    config = tiny_hf_config(family, **overrides)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(0.1 * torch.randn(buf.shape, generator=gen))
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return path


def load_hf_reference(path: str | Path, dtype: torch.dtype = torch.float32):
    """The saved model loaded back by HF transformers (eager attention, eval mode) — the reference in tests."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    return model.eval()


@dataclass
class PagedRun:
    tokens: list[list[int]]         # generated tokens per prompt
    logits: list[torch.Tensor]      # per prompt: float32 [len(prompt) + max_new_tokens - 1, vocab], row p = after token p
    steps: int                      # model forward calls
    block_tables: list[list[int]]


def run_paged_greedy(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    block_size: int = 4,
    chunk_size: int | None = None,
    shuffle_blocks: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> PagedRun:
    """Greedy generation through the paged cache, one flattened batch per step.

    Every step schedules, for each unfinished sequence, either its next prefill chunk (at most `chunk_size`
    tokens; None = the whole prompt) or one decode token, so prefill chunks and decodes mix in one batch.
    Blocks come from one pool, handed out in a shuffled order so that each sequence's blocks are scattered.
    """
    if device is None:
        device = next(model.parameters()).device
    spec = model.kv_cache_spec()
    need = [-(-(len(p) + max_new_tokens) // block_size) for p in prompts]
    block_ids = list(range(1, sum(need) + 1))  # block 0 unused: padding in block tables points there
    if shuffle_blocks:
        random.Random(seed).shuffle(block_ids)
    tables, start = [], 0
    for n in need:
        tables.append(block_ids[start:start + n])
        start += n
    caches = spec.allocate(sum(need) + 1, block_size, device)

    seqs = [list(p) for p in prompts]
    done = [0] * len(prompts)          # tokens already in the cache
    gen: list[list[int]] = [[] for _ in prompts]
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    steps = 0
    with torch.inference_mode():
        while any(len(g) < max_new_tokens for g in gen):
            ids, q_lens, ctx_lens, sel = [], [], [], []
            for i, seq in enumerate(seqs):
                if len(gen[i]) >= max_new_tokens:
                    continue
                remaining = len(seq) - done[i]
                n = remaining if chunk_size is None else min(chunk_size, remaining)
                ids += seq[done[i]:done[i] + n]
                q_lens.append(n)
                ctx_lens.append(done[i])
                sel.append(i)
            meta = AttentionMetadata.build(q_lens, ctx_lens, [tables[i] for i in sel], block_size, device)
            positions = torch.tensor([c + j for c, q in zip(ctx_lens, q_lens) for j in range(q)], device=device)
            hidden = model(torch.tensor(ids, device=device), positions, meta, caches)
            out = model.compute_logits(hidden).cpu()
            steps += 1
            row = 0
            for i, q in zip(sel, q_lens):
                logits[i].append(out[row:row + q])
                row += q
                done[i] += q
                if done[i] == len(seqs[i]):  # the prompt (or last token) is fully in the cache: sample
                    token = int(out[row - 1].argmax())
                    gen[i].append(token)
                    if len(gen[i]) < max_new_tokens:
                        seqs[i].append(token)
    return PagedRun(gen, [torch.cat(rows) for rows in logits], steps, tables)


def hf_greedy_logits(hf_model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """HF logits (float32) for prompt + generated[:-1] in one teacher-forced pass, row p = after token p."""
    ids = torch.tensor([list(prompt) + list(generated[:-1])])
    with torch.inference_mode():
        return hf_model(input_ids=ids).logits[0].float()
