"""The engine's public API on a tiny llama: bad input, n > 1, seeds, logprobs, streaming, text, the CLI.

References are independent paths: HF transformers' greedy generate and logits, and a hand-written
sampling loop over HF logits for seeded sampling.
"""
from __future__ import annotations

import pytest
import torch

from fractal import LLM, SamplingParams
from fractal.engine.cli import main as cli_main
from fractal.engine.engine import LLMEngine
from fractal.engine.tokenizer_testing import make_tiny_tokenizer
from fractal.errors import FractalError
from fractal.models.testing import load_hf_reference, make_tiny_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112], [42, 17]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_tok")
    make_tiny_model("llama", path, vocab_size=512)
    make_tiny_tokenizer(str(path))
    return str(path), load_hf_reference(path)


@pytest.fixture(scope="module")
def tiny_no_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_ids")
    make_tiny_model("llama", path)
    return str(path), load_hf_reference(path)


def hf_greedy(hf, prompt, max_tokens):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          do_sample=False, max_new_tokens=max_tokens)
    return out[0, len(prompt):].tolist()


def hf_logits(hf, tokens) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def drain(engine) -> dict:
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    return finals


# --- bad input -----------------------------------------------------------------------------------------


def test_bad_input_rejected_others_untouched(tiny_no_tokenizer):
    path, hf = tiny_no_tokenizer
    engine = LLMEngine.from_args(path, block_size=4, max_model_len=64)
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    engine.add_request("a", {"prompt_token_ids": PROMPTS[0]}, greedy)
    engine.step()
    engine.add_request("b", PROMPTS[1], greedy)

    def rejected(match, *args):
        with pytest.raises(FractalError, match=match):
            engine.add_request(*args)

    rejected("prompt is empty", "e1", [], greedy)
    rejected("prompt is empty", "e2", {"prompt_token_ids": []}, greedy)
    rejected("max_model_len=64", "e3", list(range(2, 66)), greedy)
    rejected("already in use", "a", [5], greedy)
    rejected(r"token id 256 is invalid.*\[0, 256\)", "e4", [5, 256], greedy)
    rejected("token id -1", "e5", [-1], greedy)
    rejected("needs a tokenizer", "e6", "hello", greedy)
    rejected("exactly one of", "e7", {"prompt_ids": [1]}, greedy)
    rejected("type float", "e8", 3.5, greedy)
    rejected("needs a tokenizer", "e9", [5], SamplingParams(stop=["x"]))
    mutated = SamplingParams(max_tokens=4)
    mutated.max_tokens = 0  # invalid after construction: add_request validates again
    rejected("max_tokens=0", "e10", [5], mutated)
    with pytest.raises(FractalError, match="max_tokens=0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(FractalError, match="temperature=-1"):
        SamplingParams(temperature=-1)
    with pytest.raises(FractalError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(FractalError, match="unknown engine option"):
        LLMEngine.from_args(path, block_sise=4)
    with pytest.raises(FractalError, match="max_position_embeddings"):
        LLMEngine.from_args(path, max_model_len=10_000)

    finals = drain(engine)
    assert set(finals) == {"a", "b"}
    assert finals["a"].outputs[0].token_ids == hf_greedy(hf, PROMPTS[0], 6)
    assert finals["b"].outputs[0].token_ids == hf_greedy(hf, PROMPTS[1], 6)
    assert engine.get_stats().kv_blocks_used == 0


def test_llm_generate_bad_prompt_in_batch_runs_nothing(tiny_no_tokenizer):
    path, _ = tiny_no_tokenizer
    llm = LLM(model=path, block_size=4)
    with pytest.raises(FractalError, match="prompt 1: .*empty"):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": []}], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    with pytest.raises(FractalError, match="2 sampling params for 3 prompts"):
        llm.generate([[1], [2], [3]], [SamplingParams(), SamplingParams()])


def test_missing_model_dir_is_clear(tmp_path):
    with pytest.raises(FractalError, match="config.json"):
        LLM(model=str(tmp_path))


# --- n > 1, seeds, logprobs ------------------------------------------------------------------------------


def test_n_greedy_shares_prompt_blocks(tiny_no_tokenizer):
    path, hf = tiny_no_tokenizer
    engine = LLMEngine.from_args(path, block_size=4, enable_prefix_caching=False)
    prompt = PROMPTS[1]  # 13 tokens: 3 full blocks + 1
    engine.add_request("n3", prompt, SamplingParams(n=3, temperature=0.0, max_tokens=5))
    engine.step()
    engine.step()
    parent, s1, s2 = engine.requests["n3"].seqs
    assert s1.block_ids[:3] == parent.block_ids[:3] == s2.block_ids[:3]
    # 3 shared blocks + one own tail block each, instead of 4 blocks each
    assert engine.get_stats().kv_blocks_used == 3 + 3
    out = drain(engine)["n3"]
    expected = hf_greedy(hf, prompt, 5)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == expected for c in out.outputs)
    assert engine.get_stats().kv_blocks_used == 0


def reference_seeded(hf, prompt, seed, temperature, max_tokens):
    """Exponential-race sampling over HF logits, drawing V exponentials per step from the request's generator."""
    gen = torch.Generator().manual_seed(seed)
    tokens = list(prompt)
    for _ in range(max_tokens):
        probs = torch.softmax(hf_logits(hf, tokens)[-1] / temperature, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=gen).clamp_(min=torch.finfo(torch.float32).tiny)
        tokens.append(int((probs / noise).argmax()))
    return tokens[len(prompt):]


def test_seeded_sampling_reproducible_and_matches_reference(tiny_no_tokenizer):
    path, hf = tiny_no_tokenizer
    params = SamplingParams(n=2, temperature=0.9, seed=1234, max_tokens=6, ignore_eos=True)
    llm = LLM(model=path, block_size=4)
    alone = llm.generate({"prompt_token_ids": PROMPTS[0]}, params)[0]
    # same request inside a batch of unseeded ones, on a fresh engine with another engine seed
    llm2 = LLM(model=path, block_size=4, seed=7, prefill_chunk_size=3)
    batch = llm2.generate(
        [{"prompt_token_ids": p} for p in PROMPTS],
        [params, SamplingParams(temperature=1.0, max_tokens=6), SamplingParams(temperature=1.0, max_tokens=6)],
    )
    llm3 = LLM(model=path, block_size=4)
    again = llm3.generate({"prompt_token_ids": PROMPTS[0]}, params)[0]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in again.outputs]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in batch[0].outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # siblings draw from seed + index
    for i, comp in enumerate(alone.outputs):
        assert comp.token_ids == reference_seeded(hf, PROMPTS[0], 1234 + i, 0.9, 6)
    other = llm2.generate(
        {"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0.9, seed=1234, max_tokens=6, ignore_eos=True)
    )
    assert other[0].outputs[0].token_ids == alone.outputs[0].token_ids


def test_logprobs_match_hf(tiny_no_tokenizer):
    path, hf = tiny_no_tokenizer
    llm = LLM(model=path, block_size=4)
    out = llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))[0]
    comp = out.outputs[0]
    tokens = PROMPTS[0] + comp.token_ids
    ref = torch.log_softmax(hf_logits(hf, tokens), dim=-1)
    total = 0.0
    for step, entry in enumerate(comp.logprobs):
        row = ref[len(PROMPTS[0]) - 1 + step]
        top = row.topk(3)
        want = {comp.token_ids[step]: float(row[comp.token_ids[step]])}
        want.update(zip(top.indices.tolist(), top.values.tolist()))
        assert set(entry) == set(want)
        for tok, lp in want.items():
            assert entry[tok] == pytest.approx(lp, abs=1e-4)
        total += want[comp.token_ids[step]]
    assert comp.cumulative_logprob == pytest.approx(total, abs=1e-3)


# --- streaming, text, CLI -----------------------------------------------------------------------------------


def test_generate_stream_grows_to_final(tiny_no_tokenizer):
    path, hf = tiny_no_tokenizer
    llm = LLM(model=path, block_size=4, prefill_chunk_size=4)
    parts = list(llm.generate_stream({"prompt_token_ids": PROMPTS[1]}, SamplingParams(temperature=0.0, max_tokens=5)))
    assert [len(p.outputs[0].token_ids) for p in parts] == [1, 2, 3, 4, 5]
    assert parts[-1].finished and not any(p.finished for p in parts[:-1])
    assert parts[-1].outputs[0].token_ids == hf_greedy(hf, PROMPTS[1], 5)
    # closing a stream early aborts the request and frees its blocks
    stream = llm.generate_stream({"prompt_token_ids": PROMPTS[0]}, SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    stream.close()
    assert not llm.engine.has_unfinished_requests()
    assert llm.get_stats().kv_blocks_used == 0


def test_text_prompts_and_stop_strings(tiny):
    path, hf = tiny
    llm = LLM(model=path, block_size=4)
    tok = llm.tokenizer
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    out = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    comp = out.outputs[0]
    assert out.prompt == prompt and out.prompt_token_ids == ids
    expected = hf_greedy(hf, ids, 12)  # HF stops at EOS; the engine ignores it here
    assert comp.token_ids[: len(expected)] == expected
    assert len(expected) == 12 or expected[-1] in llm.engine.eos_token_ids
    assert comp.text == tok.decode(comp.token_ids)
    # stop at a piece of the text that greedy decoding produces: cut before it, reason is the string
    stop = comp.text[len(comp.text) // 2 :][:2]
    assert stop.strip(), f"greedy text {comp.text!r} gives no usable stop string"
    cut = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop]))[0]
    assert cut.outputs[0].text == comp.text[: comp.text.find(stop)]
    assert cut.outputs[0].finish_reason == "stop" and cut.outputs[0].stop_reason == stop
    assert len(cut.outputs[0].token_ids) < len(comp.token_ids)


def test_cli_generate_prints_tokens(tiny_no_tokenizer, capsys):
    path, hf = tiny_no_tokenizer
    rc = cli_main(["--model", path, "--prompt-token-ids", ",".join(map(str, PROMPTS[0])), "--max-tokens", "5",
                   "--temperature", "0", "--block-size", "4"])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()[0]
    expected = hf_greedy(hf, PROMPTS[0], 5)
    assert printed.startswith("[0] " + " ".join(map(str, expected)))
    with pytest.raises(FractalError, match="no prompt"):
        cli_main(["--model", path])


def test_shortest_first_and_no_chunking_match_hf(tiny_no_tokenizer):
    path, hf = tiny_no_tokenizer
    for kwargs in (dict(prefill_order="shortest", max_num_seqs=2), dict(enable_chunked_prefill=False, max_num_batched_tokens=512)):
        llm = LLM(model=path, block_size=4, **kwargs)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(temperature=0.0, max_tokens=4))
        for p, o in zip(PROMPTS, outs):
            assert o.outputs[0].token_ids == hf_greedy(hf, p, 4)


def test_last_step_shape_and_floor(tiny_no_tokenizer):
    path, _ = tiny_no_tokenizer
    from fractal.perf.floor import step_floor

    llm = LLM(model=path, block_size=4, floor_gpu="h100")
    llm.generate({"prompt_token_ids": PROMPTS[0]}, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    stats = llm.get_stats()
    # the last step fed output token 1 (position 7, after the 7 prompt tokens) and sampled token 2
    shape = stats.last_step
    assert (shape.num_seqs, shape.num_batched_tokens, shape.num_decode_seqs, shape.num_prefill_tokens) == (1, 1, 1, 0)
    assert shape.new_tokens == [1] and shape.context_lens == [7] and shape.sum_context_len == 8
    want = step_floor(path, "h100", num_seqs=1, new_tokens_per_seq=1, context_len=7, weight_dtype="fp32", kv_dtype="fp32")
    assert stats.last_step_floor_s == pytest.approx(want.floor_s) and stats.last_step_bound == want.bound
    assert stats.last_step_time_s > 0 and stats.last_step_floor_ratio > 1
    with pytest.raises(FractalError):
        LLM(model=path, floor_gpu="no-such-gpu")
