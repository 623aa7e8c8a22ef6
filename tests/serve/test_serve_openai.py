"""The server driven by the official `openai` client, checked against the engine run directly.

One server per module (a tiny random DeepSeek-V2 + tiny BPE tokenizer). The reference is a second
LLMEngine on the same weights, stepped by hand: greedy text, token ids and logprobs must match what
the HTTP layer returns, so any loss or reshuffle in the HTTP layer shows.
"""
from __future__ import annotations

import math

import openai
import pytest

from fractal.engine.engine import LLMEngine
from fractal.sampling_params import SamplingParams
from fractal.serve.config import ServerConfig
from fractal.serve.server import ServerThread
from fractal.serve.testing import make_tiny_serve_model

MODEL = "tiny-dsv2"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_serve_model(tmp_path_factory.mktemp("tiny_serve"))


@pytest.fixture(scope="module")
def server(model_dir):
    engine = LLMEngine.from_args(model_dir, max_num_seqs=8, seed=0)
    with ServerThread(engine, ServerConfig(model_names=(MODEL,), max_running=8, max_queue=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(model_dir):
    engine = LLMEngine.from_args(model_dir, max_num_seqs=8, seed=0)
    counter = iter(range(10**6))

    def run(prompt, **kw):
        rid = f"ref-{next(counter)}"
        engine.add_request(rid, prompt, SamplingParams(**kw))
        final = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid and out.finished:
                    final = out
        return final

    run.engine = engine
    return run


PROMPT = "def fibonacci(n):\n    "


def test_models_lists_the_served_name(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_greedy_matches_engine(client, reference):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    ref = reference(PROMPT, max_tokens=12, temperature=0)
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == ref.outputs[0].finish_reason
    tok = reference.engine.tokenizer
    assert resp.usage.prompt_tokens == len(tok.encode(PROMPT))
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_completion_stream_concatenates_to_the_full_text(client, reference):
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    ref = reference(PROMPT, max_tokens=20, temperature=0)
    assert text == ref.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [ref.outputs[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and not chunks[-1].choices
    assert usage_chunks[0].usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_completion_logprobs_legacy_shape(client, reference):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    ref = reference(PROMPT, max_tokens=6, temperature=0, logprobs=3).outputs[0]
    lp = resp.choices[0].logprobs
    tok = reference.engine.tokenizer
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ref.token_ids]
    for got, token_id, entry in zip(lp.token_logprobs, ref.token_ids, ref.logprobs):
        assert math.isclose(got, entry[token_id], rel_tol=1e-5, abs_tol=1e-6)
    for top, entry in zip(lp.top_logprobs, ref.logprobs):
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:3]
        # the legacy shape is keyed by token text: ids that decode alike (e.g. two byte pieces) share a key
        assert set(top) == {tok.decode([i], skip_special_tokens=False) for i, _ in best}
        assert max(top.values()) == pytest.approx(best[0][1], rel=1e-5)
    # greedy: the sampled token is the most likely one
    assert all(math.isclose(g, max(t.values()), rel_tol=1e-5) for g, t in zip(lp.token_logprobs, lp.top_logprobs))
    assert lp.text_offset[0] == 0
    assert lp.text_offset[1] == len(lp.tokens[0])


def test_n_choices_and_seed(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=1234)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # same seed, same samples
    assert len({c.text for c in a.choices}) > 1  # three different samples of a random model
    assert 3 <= a.usage.completion_tokens <= 24


def test_several_prompts_index_by_prompt_then_choice(client, reference):
    prompts = ["import os\n", "class A:\n"]
    resp = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, n=2)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    for p, prompt in enumerate(prompts):
        ref = reference(prompt, max_tokens=5, temperature=0).outputs[0].text
        assert resp.choices[2 * p].text == ref and resp.choices[2 * p + 1].text == ref


def test_stop_string_cuts_the_text(client, reference):
    full = reference(PROMPT, max_tokens=30, temperature=0, ignore_eos=True).outputs[0].text
    stop = full[10:13]
    assert stop and stop in full
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=30, temperature=0,
                                     stop=[stop], extra_body={"ignore_eos": True})
    assert resp.choices[0].text == full[: full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_token_id_prompt(client, reference):
    ids = reference.engine.tokenizer.encode("x = 1\n")
    resp = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert resp.choices[0].text == reference(ids, max_tokens=5, temperature=0).outputs[0].text
    assert resp.usage.prompt_tokens == len(ids)


MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]


def test_chat_uses_the_tokenizer_template(client, reference):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    ids = reference.engine.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
    ref = reference(ids, max_tokens=10, temperature=0).outputs[0]
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == ref.text
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens == len(ref.token_ids)


def test_chat_stream_with_logprobs_and_usage(client, reference):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0,
                                            stream=True, logprobs=True, top_logprobs=2,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    ids = reference.engine.tokenizer.encode_chat(MESSAGES, add_generation_prompt=True)
    ref = reference(ids, max_tokens=8, temperature=0, logprobs=2).outputs[0]
    assert content == ref.text
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(entries) == len(ref.token_ids)
    for entry, token_id, lp in zip(entries, ref.token_ids, ref.logprobs):
        assert math.isclose(entry.logprob, lp[token_id], rel_tol=1e-5, abs_tol=1e-6)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode("utf-8") == entry.token
    assert chunks[-1].usage.prompt_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_chat_n_and_max_completion_tokens(client):
    resp = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_completion_tokens=4,
                                          temperature=0.8, seed=3)
    assert [c.index for c in resp.choices] == [0, 1]
    assert all(c.finish_reason in ("length", "stop") for c in resp.choices)
    assert resp.usage.completion_tokens <= 8


def test_metrics_count_what_was_served(server, client):
    import httpx

    before = httpx.get(server.url + "/metrics").text
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, temperature=0,
                              extra_body={"ignore_eos": True})
    after = httpx.get(server.url + "/metrics").text

    def value(text, name):
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    assert value(after, "fractal_generation_tokens_total") - value(before, "fractal_generation_tokens_total") == 7
    assert value(after, "fractal_time_to_first_token_seconds_count") - value(
        before, "fractal_time_to_first_token_seconds_count") == 1
    assert value(after, "fractal_e2e_request_latency_seconds_count") - value(
        before, "fractal_e2e_request_latency_seconds_count") == 1
    assert value(after, 'fractal_requests_total{endpoint="completions",finish_reason="length"}') - value(
        before, 'fractal_requests_total{endpoint="completions",finish_reason="length"}') == 1
    assert value(after, "fractal_kv_cache_blocks_total") > 0
    assert "fractal_num_requests_running" in after and "fractal_prefix_cache_hit_rate" in after
