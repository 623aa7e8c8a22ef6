"""GPU: the fast path (Triton backends + kernel-backed modules + CUDA graphs + overlap) against the plain path.

Tiny random models of every family on CUDA. References:
- the plain path: torch attention/MoE backends, eager, synchronous (the same code the CPU tests check against
  HF transformers);
- the fast path without graphs and overlap (eager, synchronous), same dtype.
Greedy tokens must agree; where they part, the reference's two best tokens at that position must be a
near-tie (|logprob gap| under the dtype's rounding), since a different but valid kernel may round the other way.
Also: no host synchronisation while a step is launched, graphs really replayed, the fast modules swapped in.
"""
from __future__ import annotations

import gc
import random

import pytest
import torch

from fractal import LLM, SamplingParams
from fractal.models.testing import FAMILIES, make_tiny_model

pytestmark = pytest.mark.gpu

PROMPTS = [
    [5, 6, 7, 8, 9, 10, 11],
    [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112],
    [42, 17, 200, 9],
    [250, 2, 77, 31, 64, 128, 15, 16, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 3, 4, 5],
    [3],
]
MAX_TOKENS = 12
TIE = {"bfloat16": 0.06, "float32": 2e-3}  # largest top-2 logprob gap a rounding difference may flip


@pytest.fixture(scope="module", params=FAMILIES)
def model_path(request, tmp_path_factory):
    # MLA: a RoPE width of 16 (the tiny default 8 is below tl.dot's minimum, which falls back to torch)
    extra = dict(qk_rope_head_dim=16) if request.param.startswith("deepseek") else {}
    return str(make_tiny_model(request.param, tmp_path_factory.mktemp(request.param), **extra))


def _generate(path, dtype, prompts, *, plain=False, eager=True, overlap=False, logprobs=None, llm_out=None,
              **extra):
    kwargs = dict(device="cuda", dtype=dtype, block_size=4, max_num_seqs=8, enable_prefix_caching=False,
                  enforce_eager=eager, async_scheduling=overlap, num_gpu_blocks=256, **extra)
    if plain:
        kwargs.update(attention_backend="torch", moe_backend="torch")
    llm = LLM(model=path, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=logprobs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    if llm_out is not None:
        llm_out.append(llm)
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0] for o in outs]


def _assert_same_up_to_ties(got, ref, tie):
    """Token lists equal, except that they may part at a position where the reference had a near-tie."""
    exact = 0
    for g, r in zip(got, ref):
        for i, (a, b) in enumerate(zip(g.token_ids, r.token_ids)):
            if a != b:
                top = sorted(r.logprobs[i].values(), reverse=True)
                gap = top[0] - top[1]
                assert gap < tie, f"token {i}: fast {a} != reference {b} with a top-2 logprob gap of {gap:.4f}"
                break
        else:
            exact += 1
    return exact


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_fast_path_matches_plain_path(model_path, dtype):
    ref = _generate(model_path, dtype, PROMPTS, plain=True, logprobs=2)
    fast_eager = _generate(model_path, dtype, PROMPTS, logprobs=2)
    held = []
    fast = _generate(model_path, dtype, PROMPTS, eager=False, overlap=True, llm_out=held)
    runner = held[0].engine.runner
    assert runner.model.attention_backend.name == "triton"
    assert runner.fast_modules["rmsnorm"] > 0 and runner.fast_modules["rotary"] > 0
    # q/k norm (Qwen3) + RoPE + KV write in one kernel per layer (MLA: RoPE + latent norm + cache write)
    prep = "mla_prep" if runner.model.config.uses_mla else "gqa_prep"
    assert runner.fast_modules[prep] == runner.model.config.num_layers
    if runner.model.config.moe is not None:
        assert runner.model.moe_backend.name == "triton"
    assert runner.graphs is not None and runner.graphs.num_replays > 0 and not runner.graphs.failed
    assert _assert_same_up_to_ties(fast_eager, ref, TIE[dtype]) >= 2
    assert _assert_same_up_to_ties(fast, fast_eager, TIE[dtype]) >= 2
    # one sequence: its decode steps run the one-token GEMV kernels (16-bit weights) in the captured graphs
    assert (runner.fast_modules["linear"] > 0) == (dtype != "float32")
    single = _generate(model_path, dtype, PROMPTS[:1], eager=False, overlap=True)
    _assert_same_up_to_ties(single, ref[:1], TIE[dtype])
    # chunked prefill: decodes and prefill chunks (with cached context) share steps
    chunked = _generate(model_path, dtype, PROMPTS, eager=False, overlap=True, max_num_batched_tokens=12,
                        prefill_chunk_size=5)
    assert _assert_same_up_to_ties(chunked, ref, TIE[dtype]) >= 2


def test_mla_decode_over_long_contexts(model_path):
    """MLA (DeepSeek) decode at B = 1 and B = 3 over 90-240-token contexts, which fill several split-K chunks of the
    absorbed decode (and, at B = 1, run the one-token GEMV kernels), captured in graphs, against the plain path."""
    if "deepseek" not in model_path:
        pytest.skip("MLA only")
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 256) for _ in range(n)] for n in (230, 150, 90)]
    for batch in (prompts[:1], prompts):
        ref = _generate(model_path, "bfloat16", batch, plain=True, logprobs=2)
        held = []
        fast = _generate(model_path, "bfloat16", batch, eager=False, overlap=True, llm_out=held)
        graphs = held.pop().engine.runner.graphs
        assert graphs is not None and graphs.num_replays > 0 and not graphs.failed
        assert _assert_same_up_to_ties(fast, ref, TIE["bfloat16"]) >= len(batch) - 1


def test_graph_batch_on_ladder_is_identical_to_eager(model_path):
    """4 sequences = a captured size (no padding) and the same context bound: the replay launches the very
    kernels the eager step does, so bf16 tokens are identical."""
    prompts = PROMPTS[:4]
    eager = _generate(model_path, "bfloat16", prompts)
    graphs = _generate(model_path, "bfloat16", prompts, eager=False, overlap=True)
    assert [o.token_ids for o in graphs] == [o.token_ids for o in eager]


def test_launch_has_no_host_sync(model_path):
    """No device->host synchronisation while a step (prefill, then decode) is launched, eagerly."""
    llm = LLM(model=model_path, device="cuda", dtype="bfloat16", block_size=4, enforce_eager=True,
              async_scheduling=True, max_num_seqs=8, num_gpu_blocks=256)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    engine.step()  # warm-up: Triton compilation loads modules (not a per-step cost)
    engine.step()
    launch = engine.runner.launch
    calls = [0]

    def strict(*args, **kwargs):
        calls[0] += 1
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine.runner.launch = strict
    while engine.has_unfinished_requests():
        engine.step()
    assert calls[0] >= 2


def test_swap_ins_through_a_one_block_staging_buffer(model_path, monkeypatch):
    """Preemption by swap (fast path, graphs, overlap) with the runner's staging buffer forced to one block: every
    swap-in of several blocks takes several chunks (copy stream -> event -> scatter -> event -> next copy into the
    same buffer); the tokens equal a run without preemption, up to near-ties."""
    import fractal.engine.runner as runner_module

    ref = _generate(model_path, "float32", PROMPTS, logprobs=2)
    monkeypatch.setattr(runner_module, "swap_staging_blocks", lambda *args, **kwargs: 1)
    sizes = []
    chunks = runner_module.ModelRunner._chunks

    def recorded(swap_in, capacity):
        plan = list(chunks(swap_in, capacity))
        sizes.extend(sum(part.stop - part.start for _, part in chunk) for chunk in plan)
        return iter(plan)

    monkeypatch.setattr(runner_module.ModelRunner, "_chunks", staticmethod(recorded))
    # 12 blocks of 4 for five sequences of up to 21 + 12 tokens (9 blocks): preemption, swapped out and back in
    llm = LLM(model=model_path, device="cuda", dtype="float32", block_size=4, max_num_seqs=8,
              enable_prefix_caching=False, num_gpu_blocks=12, max_model_len=40, preemption_balance=1, swap_space=0.01)
    runner = llm.engine.runner
    assert runner._staging is not None and runner._staging.shape[0] == runner._staging_blocks == 1
    assert runner._staging.shape[1:] == runner._host_pool.shape[1:] and runner._staging.is_cuda
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]
    stats = llm.get_stats()
    assert stats.num_swapped_out_total > 0 and stats.num_swapped_out_total == stats.num_preempted_total
    assert len(sizes) > stats.num_swapped_out_total and set(sizes) == {1}  # several chunks per swap-in
    assert runner._staging_free is not None and not runner._swapped
    assert len(runner._host_free) == llm.engine.scheduler.config.num_host_blocks
    assert _assert_same_up_to_ties(outs, ref, TIE["float32"]) >= len(PROMPTS) - 1
