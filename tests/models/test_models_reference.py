"""Our models vs HF transformers (eager, float32) on tiny random checkpoints of every family.

(1) one flattened prefill of prompts of different lengths; (2) chunked prefill mixed with step-by-step decode
through a paged cache with block_size 4 and shuffled block ids. Relative error < 1e-4, and the greedy tokens
equal HF's generate.
"""
import pytest
import torch

from fractal.layers.attention_metadata import AttentionMetadata
from fractal.models.loader import load_model
from fractal.models.testing import FAMILIES, hf_greedy_logits, load_hf_reference, make_tiny_model, run_paged_greedy

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [200]]
TOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is ~10x faster than contended multi-threading."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=FAMILIES)
def family_models(request, tmp_path_factory):
    family = request.param
    # DeepSeek-V3 also goes through a sharded checkpoint (model.safetensors.index.json)
    shard = "60KB" if family == "deepseek_v3" else None
    path = make_tiny_model(family, tmp_path_factory.mktemp(family), seed=1, max_shard_size=shard)
    if shard:
        assert (path / "model.safetensors.index.json").is_file()
    return family, load_model(path, dtype=torch.float32), load_hf_reference(path)


def test_flat_prefill_matches_hf(family_models):
    family, model, hf = family_models
    run = run_paged_greedy(model, PROMPTS, max_new_tokens=1, block_size=4)
    assert run.steps == 1
    for prompt, logits in zip(PROMPTS, run.logits):
        ref = hf_greedy_logits(hf, prompt, [0])
        assert logits.shape == ref.shape
        assert rel_err(logits, ref) < TOL, family


def test_chunked_prefill_and_decode_match_hf(family_models):
    family, model, hf = family_models
    new = 6
    run = run_paged_greedy(model, PROMPTS, max_new_tokens=new, block_size=4, chunk_size=3, seed=7)
    for prompt, tokens, logits in zip(PROMPTS, run.tokens, run.logits):
        ref = hf_greedy_logits(hf, prompt, tokens)
        assert rel_err(logits, ref) < TOL, family
        with torch.inference_mode():
            hf_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None)
        assert tokens == hf_tokens[0, len(prompt):].tolist(), family


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_mla_absorb_and_mha_give_same_logits(family, tmp_path):
    path = make_tiny_model(family, tmp_path, seed=2)
    hf = load_hf_reference(path)
    runs = {}
    for mode in ("absorb", "mha", "auto"):
        model = load_model(path, dtype=torch.float32, mla_mode=mode)
        runs[mode] = run_paged_greedy(model, PROMPTS, max_new_tokens=4, block_size=4, chunk_size=5)
    for i, prompt in enumerate(PROMPTS):
        ref = hf_greedy_logits(hf, prompt, runs["mha"].tokens[i])
        for mode in ("absorb", "auto"):
            assert runs[mode].tokens[i] == runs["mha"].tokens[i]
            assert rel_err(runs[mode].logits[i], runs["mha"].logits[i]) < TOL
            assert rel_err(runs[mode].logits[i], ref) < TOL


def test_prefix_blocks_shared_between_sequences(family_models):
    """Sequence B reuses the first two full blocks that sequence A wrote (prefix reuse), then prefills the rest."""
    family, model, hf = family_models
    bs = 4
    a = PROMPTS[2]                      # 13 tokens
    b = a[:8] + [40, 41, 42]            # shares two full blocks with a
    caches = model.kv_cache_spec().allocate(12, bs)
    table_a, table_b = [7, 2, 9, 4], [7, 2, 5, 11]
    with torch.inference_mode():
        meta = AttentionMetadata.build([len(a)], [0], [table_a], bs)
        model(torch.tensor(a), torch.arange(len(a)), meta, caches)
        meta = AttentionMetadata.build([len(b) - 8], [8], [table_b], bs)
        hidden = model(torch.tensor(b[8:]), torch.arange(8, len(b)), meta, caches)
        logits = model.compute_logits(hidden)
    ref = hf_greedy_logits(hf, b, [0])[8:]
    assert rel_err(logits, ref) < TOL, family


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_fused_input_projections_match_hf(family, tmp_path):
    """One GEMM for q(_a)_proj + kv_a_proj_with_mqa (the GPU path's fusion) gives HF's logits, and the module
    weights stay views of the fused tensor (a later load_weights would update both)."""
    path = make_tiny_model(family, tmp_path, seed=3)
    hf = load_hf_reference(path)
    model = load_model(path, dtype=torch.float32)
    layers = [m for m in model.modules() if hasattr(m, "fuse_input_projections")]
    assert layers
    for m in layers:
        m.fuse_input_projections()
        weight, _, sizes = m.fused_input
        assert m.kv_a_proj_with_mqa.weight.data_ptr() == weight[sizes[0]:].data_ptr()
    run = run_paged_greedy(model, PROMPTS, max_new_tokens=4, block_size=4, chunk_size=5)
    for i, prompt in enumerate(PROMPTS):
        assert rel_err(run.logits[i], hf_greedy_logits(hf, prompt, run.tokens[i])) < TOL
