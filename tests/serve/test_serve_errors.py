"""Bad input over raw HTTP: each gets the right status and an OpenAI-style error body, and none of it
disturbs a request that is streaming at the same time."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from fractal.engine.engine import LLMEngine
from fractal.serve.config import ServerConfig
from fractal.serve.server import ServerThread
from fractal.serve.testing import make_tiny_serve_model

MODEL = "tiny"
MAX_LEN = 256


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_tiny_serve_model(tmp_path_factory.mktemp("tiny_err"), max_position_embeddings=MAX_LEN)
    engine = LLMEngine.from_args(path, max_num_seqs=4)
    assert engine.max_model_len == MAX_LEN
    with ServerThread(engine, ServerConfig(model_names=(MODEL,), max_running=4, max_queue=64, max_n=4)) as srv:
        srv.tokenizer = engine.tokenizer
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def test_malformed_json(http):
    assert_error(http.post("/v1/completions", content=b'{"prompt": "a",'), 400, code="invalid_json")
    assert_error(http.post("/v1/chat/completions", content=b"\xff\xfe garbage"), 400, code="invalid_json")
    assert_error(http.post("/v1/completions", content=b"[1, 2]"), 400, code="invalid_json")
    assert_error(http.post("/v1/completions", content=b""), 400, code="invalid_json")


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": "a", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({"prompt": "a", "n": 1.5}, "n"),
    ({"prompt": "a", "stream_options": {"include_usage": "yes please"}}, "stream_options"),
])
def test_wrong_types(http, body, param):
    assert_error(http.post("/v1/completions", json=body), 400, param=param)


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": "hello"}, "messages"),
])
def test_bad_chat_messages(http, body, param):
    assert_error(http.post("/v1/chat/completions", json=body), 400, param=param)


def test_unknown_model_is_404(http):
    assert_error(http.post("/v1/completions", json={"model": "gpt-9", "prompt": "a"}), 404, param="model",
                 code="model_not_found")
    assert_error(http.post("/v1/chat/completions", json={"model": "gpt-9", "messages": [
        {"role": "user", "content": "a"}]}), 404, code="model_not_found")


def test_unknown_route_is_404_json(http):
    assert_error(http.get("/v1/engines"), 404)


def test_prompt_over_the_context(http, server):
    ids = [5] * MAX_LEN
    assert_error(http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1}), 400, param="prompt",
                 code="context_length_exceeded")
    long_text = "word " * (2 * MAX_LEN)
    assert len(server.tokenizer.encode(long_text)) > MAX_LEN
    assert_error(http.post("/v1/completions", json={"prompt": long_text}), 400, code="context_length_exceeded")
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long_text}]}),
                 400, param="messages", code="context_length_exceeded")


def test_max_tokens_out_of_range(http):
    assert_error(http.post("/v1/completions", json={"prompt": "a", "max_tokens": 0}), 400, param="max_tokens")
    assert_error(http.post("/v1/completions", json={"prompt": "a", "max_tokens": -3}), 400, param="max_tokens")
    error = assert_error(http.post("/v1/completions", json={"prompt": [7, 8, 9], "max_tokens": MAX_LEN}), 400,
                         param="max_tokens", code="context_length_exceeded")
    assert str(MAX_LEN - 3) in error["message"]  # says the largest max_tokens that would fit
    ok = http.post("/v1/completions", json={"prompt": [7, 8, 9], "max_tokens": MAX_LEN - 3, "ignore_eos": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == MAX_LEN - 3
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}],
                                                         "max_completion_tokens": 10**6}), 400, param="max_tokens")


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("presence_penalty", 3.0),
    ("frequency_penalty", -9), ("top_k", -5), ("logprobs", 50), ("min_p", 2.0), ("repetition_penalty", 0),
    ("seed", "abc"), ("stop", [""]), ("stop_token_ids", [-1]),
])
def test_bad_sampling_values(http, field, value):
    assert_error(http.post("/v1/completions", json={"prompt": "a", field: value}), 400, param=field)


def test_too_many_n(http):
    assert_error(http.post("/v1/completions", json={"prompt": "a", "n": 5}), 400, param="n")  # server max_n=4
    assert_error(http.post("/v1/completions", json={"prompt": "a", "n": 0}), 400, param="n")
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}], "n": 99}),
                 400, param="n")


def test_bad_token_ids_and_empty_prompts(http):
    assert_error(http.post("/v1/completions", json={"prompt": [1, 2, 10**6]}), 400, param="prompt")
    assert_error(http.post("/v1/completions", json={"prompt": [-1]}), 400, param="prompt")
    assert_error(http.post("/v1/completions", json={"prompt": ""}), 400, param="prompt")
    assert_error(http.post("/v1/completions", json={"prompt": []}), 400, param="prompt")


def test_unsupported_features_are_refused_not_ignored(http):
    assert_error(http.post("/v1/completions", json={"prompt": "a", "suffix": "z"}), 400, param="suffix")
    assert_error(http.post("/v1/completions", json={"prompt": "a", "best_of": 3}), 400, param="best_of")
    assert_error(http.post("/v1/completions", json={"prompt": "a", "logit_bias": {"5": 10}}), 400,
                 param="logit_bias")
    assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}],
                                                         "tools": [{"type": "function"}]}), 400, param="tools")


def test_errors_do_not_disturb_a_concurrent_stream(http, server):
    """A streaming request runs while a burst of bad requests arrives: it completes intact."""
    body = {"prompt": "import json\n", "max_tokens": 150, "temperature": 0, "ignore_eos": True}
    expected = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    result: dict = {}

    def stream():
        chunks = []
        with httpx.Client(base_url=server.url, timeout=60) as c:
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
        result["chunks"] = chunks

    t = threading.Thread(target=stream)
    t.start()
    garbage = [b"{", b"null", b'{"prompt": 1}', b'{"prompt": "a", "n": -1}', b'{"prompt": [999999]}',
               json.dumps({"prompt": "a", "max_tokens": 10**9}).encode(), b'{"prompt": "a", "temperature": "hot"}',
               "{\"prompt\": \"\ud800\"}".encode("utf-8", "surrogatepass"), b'{"prompt": "\\ud800"}',
               b'{"model": "\\udfff", "prompt": "a"}', b"[" * 100000]
    for _ in range(6):
        for payload in garbage:
            assert http.post("/v1/completions", content=payload).status_code == 400
    t.join(60)
    chunks = result["chunks"]
    assert chunks[-1] == "[DONE]"
    text = "".join(json.loads(c)["choices"][0]["text"] for c in chunks[:-1])
    assert text == expected
    assert http.get("/health").status_code == 200
