"""Greedy tokens through the engine equal HF transformers' greedy `generate` for each prompt alone.

For every family (tiny random fp32 checkpoints built with transformers): a mixed batch with default
settings, chunked prefill at a 3-token chunk, prefix reuse on shared-prefix prompts (hit rate > 0),
a KV pool so small that preemption happens, and requests aborted midway (the pool returns to full).
"""
from __future__ import annotations

import pytest
import torch

from fractal import LLM, SamplingParams
from fractal.engine.engine import LLMEngine
from fractal.engine.runner import SWAP_STAGING_MAX_BYTES, ModelRunner, swap_staging_blocks
from fractal.models.testing import FAMILIES, load_hf_reference, make_tiny_model

MAX_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)

MIXED = [
    [5, 6, 7, 8, 9, 10, 11],
    [3],
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112],
    [42, 17, 200, 9],
    [250, 2, 77, 31, 64, 128, 15, 16, 90, 91, 92],
]
PREFIX = [7, 70, 170, 27, 72, 172, 37, 73, 173]  # 9 tokens: 2 full blocks of 4 + 1
SHARED = [PREFIX + [11, 12, 13], PREFIX + [21], PREFIX + [31, 32, 33, 34, 35, 36], PREFIX + [11, 12, 13]]


class Reference:
    """HF greedy continuations, computed once per prompt."""

    def __init__(self, path):
        self.model = load_hf_reference(path)
        self.cache: dict[tuple, list[int]] = {}

    def __call__(self, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in self.cache:
            with torch.no_grad():
                out = self.model.generate(
                    torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                    do_sample=False, max_new_tokens=max_tokens,
                )
            self.cache[key] = out[0, len(prompt):].tolist()
        return self.cache[key]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tmp_path_factory):
    path = make_tiny_model(request.param, tmp_path_factory.mktemp(request.param))
    return str(path), Reference(path)


def check(outputs, prompts, ref):
    assert [o.prompt_token_ids for o in outputs] == prompts
    for out, prompt in zip(outputs, prompts):
        expected = ref(prompt)
        got = out.outputs[0].token_ids
        assert got == expected, f"prompt {prompt}: engine {got} != HF {expected}"
        assert out.finished
        assert out.outputs[0].finish_reason == ("length" if len(expected) == MAX_TOKENS and expected[-1] != 1 else "stop")


def as_prompts(prompts):
    return [{"prompt_token_ids": p} for p in prompts]


def test_mixed_batch_matches_hf(family_model):
    path, ref = family_model
    llm = LLM(model=path, block_size=4, enable_prefix_caching=False)
    check(llm.generate(as_prompts(MIXED), GREEDY), MIXED, ref)


def test_chunked_prefill_small_chunk_matches_hf(family_model):
    path, ref = family_model
    llm = LLM(model=path, block_size=4, prefill_chunk_size=3, max_num_batched_tokens=8)
    check(llm.generate(as_prompts(MIXED), GREEDY), MIXED, ref)
    assert llm.get_stats().last_step.num_batched_tokens <= 8


def test_prefix_reuse_matches_hf_and_hits(family_model):
    path, ref = family_model
    # a small token budget admits the prompts in different steps, so later ones find earlier blocks
    llm = LLM(model=path, block_size=4, max_num_batched_tokens=13, enable_prefix_caching=True)
    check(llm.generate(as_prompts(SHARED), GREEDY), SHARED, ref)
    stats = llm.get_stats()
    assert stats.prefix_cache_hits > 0 and stats.prefix_hit_rate > 0
    # a later call reuses blocks of finished requests (kept in the LRU until evicted)
    before = stats.prefix_cache_hits
    outs = llm.generate(as_prompts(SHARED[:1]), GREEDY)
    check(outs, SHARED[:1], ref)
    assert llm.get_stats().prefix_cache_hits - before >= 8
    assert outs[0].metrics.num_cached_tokens >= 8


@pytest.mark.parametrize("prefix_caching,balance,swap_space", [(False, 0, 0), (True, 0, 0), (False, 1, 0),
                                                                (True, 0, 0.01), (False, 1, 0.01)])
def test_tiny_pool_preempts_and_matches_hf(family_model, prefix_caching, balance, swap_space):
    path, ref = family_model
    # 8 blocks of 4 = 32 slots for five sequences that need up to 13 + 8 tokens each; balance=1 swaps running
    # decodes for preempted ones at one token of lag; swap_space keeps preempted KV in host memory
    llm = LLM(model=path, block_size=4, num_gpu_blocks=8, max_model_len=32, enable_prefix_caching=prefix_caching,
              preemption_balance=balance, swap_space=swap_space)
    check(llm.generate(as_prompts(MIXED), GREEDY), MIXED, ref)
    stats = llm.get_stats()
    assert stats.num_preempted_total > 0
    assert (stats.num_balance_swaps_total > 0) == (balance > 0 and swap_space > 0)  # balancing only swaps
    assert (stats.num_swapped_out_total == stats.num_preempted_total) == (swap_space > 0)
    assert not llm.engine.runner._swapped
    assert len(llm.engine.runner._host_free) == llm.engine.scheduler.config.num_host_blocks
    assert stats.kv_blocks_used == 0


def test_swap_staging_blocks_rule():
    mib = 2**20
    assert swap_staging_blocks(mib // 4, 16, 1000, 10_000) == 63  # one 1000-token sequence: 63 blocks of 16
    assert swap_staging_blocks(mib // 4, 16, 1000, 40) == 40  # no more than the host pool holds
    assert swap_staging_blocks(2 * mib, 16, 128 * 1024, 10_000) == SWAP_STAGING_MAX_BYTES // (2 * mib)  # the cap
    assert swap_staging_blocks(SWAP_STAGING_MAX_BYTES + 1, 16, 128 * 1024, 10_000) == 1  # at least 1
    assert swap_staging_blocks(mib, 16, 1000, 10_000, max_bytes=8 * mib) == 8


SWAP_INS = [(1, [10, 11, 12, 13, 14, 15, 16]), (2, [3]), (3, []), (4, [4, 5]), (5, [20, 21, 22])]


@pytest.mark.parametrize("capacity", [1, 2, 3, 4, 7, 13, 100])
def test_swap_in_chunks_cover_every_block_once_in_order(capacity):
    chunks = list(ModelRunner._chunks(SWAP_INS, capacity))
    blocks = dict(SWAP_INS)
    flat = [(seq_id, b) for chunk in chunks for seq_id, part in chunk for b in blocks[seq_id][part]]
    assert flat == [(seq_id, b) for seq_id, ids in SWAP_INS for b in ids]
    sizes = [sum(part.stop - part.start for _, part in chunk) for chunk in chunks]
    assert all(0 < n <= capacity for n in sizes)
    assert all(n == capacity for n in sizes[:-1])  # only the last chunk is short: no more chunks than needed
    assert all(part.stop > part.start for chunk in chunks for _, part in chunk)


def test_swap_in_chunks_split_large_and_share_small():
    assert list(ModelRunner._chunks(SWAP_INS, 3)) == [
        [(1, slice(0, 3))], [(1, slice(3, 6))], [(1, slice(6, 7)), (2, slice(0, 1)), (4, slice(0, 1))],
        [(4, slice(1, 2)), (5, slice(0, 2))], [(5, slice(2, 3))]]
    assert list(ModelRunner._chunks(SWAP_INS, 100)) == [[(1, slice(0, 7)), (2, slice(0, 1)), (4, slice(0, 2)),
                                                         (5, slice(0, 3))]]
    assert list(ModelRunner._chunks([], 4)) == []
    with pytest.raises(ValueError):
        list(ModelRunner._chunks(SWAP_INS, 0))


@pytest.mark.parametrize("capacity", [1, 3])
def test_swap_ins_in_small_chunks_match_hf(family_model, monkeypatch, capacity):
    """The chunked swap-in (on CUDA through a staging buffer of `capacity` blocks) with tiny chunks: swap-ins
    of several blocks span several chunks, those of one step share them, and the tokens still equal HF's."""
    path, ref = family_model
    plans = []
    chunks = ModelRunner._chunks

    def recorded(swap_in, capacity):
        plans.append(list(chunks(swap_in, capacity)))
        return iter(plans[-1])

    monkeypatch.setattr(ModelRunner, "_chunks", staticmethod(recorded))
    llm = LLM(model=path, device="cpu", block_size=4, num_gpu_blocks=8, max_model_len=32,
              enable_prefix_caching=False, preemption_balance=1, swap_space=0.01)
    runner = llm.engine.runner
    assert runner._staging is None and runner._staging_blocks == 0  # CPU: no staging buffer
    runner._staging_blocks = capacity
    prompts = MIXED * 2  # enough sequences for steps that swap several in
    check(llm.generate(as_prompts(prompts), GREEDY), prompts, ref)
    assert llm.get_stats().num_swapped_out_total > 0
    sizes = [sum(part.stop - part.start for _, part in chunk) for plan in plans for chunk in plan]
    assert sizes and max(sizes) == capacity
    pieces = [[seq_id for chunk in plan for seq_id, _ in chunk] for plan in plans]
    assert any(len(ids) > len(set(ids)) for ids in pieces)  # a swap-in split over chunks
    if capacity > 1:
        assert any(len(chunk) > 1 for plan in plans for chunk in plan)  # shared
    assert not runner._swapped
    assert len(runner._host_free) == llm.engine.scheduler.config.num_host_blocks


def test_abort_midway_frees_pool(family_model):
    path, ref = family_model
    engine = LLMEngine.from_args(path, block_size=4, prefill_chunk_size=3, max_num_batched_tokens=10)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    for i, prompt in enumerate(MIXED):
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params)
    for _ in range(3):
        engine.step()
    assert engine.get_stats().kv_blocks_used > 0
    engine.abort_request("r2")  # mid-prefill (13 tokens at 3 per step)
    engine.abort_request("r0")
    engine.abort_request("nope")  # unknown: a no-op
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["r0"].outputs[0].finish_reason == "abort"
    assert finals["r2"].outputs[0].finish_reason == "abort"
    assert len(finals["r2"].outputs[0].token_ids) < MAX_TOKENS
    for i in (1, 3, 4):
        assert finals[f"r{i}"].outputs[0].token_ids == ref(MIXED[i])
    stats = engine.get_stats()
    assert stats.kv_blocks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert engine.scheduler.kv.num_free_blocks == stats.kv_blocks_total
    engine.abort_request("r1")  # finished: a no-op
    assert not engine.has_unfinished_requests()


def test_swap_space_the_host_cannot_give_falls_back_to_recompute(family_model, caplog):
    path, ref = family_model
    llm = LLM(model=path, block_size=4, num_gpu_blocks=8, max_model_len=32, enable_prefix_caching=False,
              swap_space=2.0 ** 40)  # a petabyte of host memory: the allocation fails, the engine still starts
    assert llm.engine.scheduler.config.num_host_blocks == 0 and llm.engine.runner._host_pool is None
    assert "no swap space" in caplog.text
    check(llm.generate(as_prompts(MIXED), GREEDY), MIXED, ref)
    stats = llm.get_stats()
    assert stats.num_preempted_total > 0 and stats.num_swapped_out_total == 0
