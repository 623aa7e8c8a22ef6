"""Reliability cases, each written to fail if its behaviour regresses:
- a client that disconnects (streaming or not) aborts its request and frees its KV blocks (seen in /metrics:
  the request ends as "abort", not "length", and the blocks in use drop to zero while it would still run);
- a full queue answers 503 + Retry-After, and the server takes requests again once the queue drains;
- --api-key guards every /v1 route (401) and leaves /health and /metrics open;
- SIGTERM lets an in-flight stream finish, then the process exits 0.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from fractal.engine.engine import LLMEngine
from fractal.serve.config import ServerConfig
from fractal.serve.server import ServerThread
from fractal.serve.testing import make_tiny_serve_model

KEY = "sekret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = {"prompt": "def main():\n", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_serve_model(tmp_path_factory.mktemp("tiny_rel"), max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(model_dir):
    engine = LLMEngine.from_args(model_dir, max_num_seqs=2)
    config = ServerConfig(model_names=("tiny",), api_key=KEY, max_running=2, max_queue=1)
    with ServerThread(engine, config) as srv:
        yield srv


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def metric(http: httpx.Client, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


ABORTS = 'fractal_requests_total{endpoint="completions",finish_reason="abort"}'
LENGTHS = 'fractal_requests_total{endpoint="completions",finish_reason="length"}'


def wait_until(condition, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def wait_idle(http: httpx.Client, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (metric(http, "fractal_requests_in_flight") == 0 and metric(http, "fractal_num_requests_running") == 0
                and metric(http, "fractal_kv_cache_blocks_used") == 0):
            return
        time.sleep(0.05)
    raise AssertionError("the server still holds the request (or its KV blocks) after the client left")


def open_stream(server, body: dict, wait_for_text: bool = True):
    """A streaming request read up to its first generated text; returns (client, response, line iterator).

    The caller keeps the iterator: once it is garbage-collected, httpx closes the connection."""
    client = httpx.Client(base_url=server.url, headers=AUTH, timeout=60)
    resp = client.send(client.build_request("POST", "/v1/completions", json={**body, "stream": True}), stream=True)
    assert resp.status_code == 200, resp.read()
    lines = resp.iter_lines()
    for line in lines if wait_for_text else ():
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
            break
    return client, resp, lines


def test_stream_disconnect_aborts_and_frees_blocks(server, http):
    aborts, lengths = metric(http, ABORTS), metric(http, LENGTHS)
    client, resp, lines = open_stream(server, LONG)
    try:
        wait_until(lambda: metric(http, "fractal_kv_cache_blocks_used") > 0)  # gauges refresh every 20 ms
        assert metric(http, "fractal_requests_in_flight") == 1
    finally:
        resp.close()
        client.close()
        del lines
    wait_idle(http)
    assert metric(http, ABORTS) == aborts + 1
    assert metric(http, LENGTHS) == lengths


def test_non_stream_disconnect_aborts(server, http):
    aborts, lengths = metric(http, ABORTS), metric(http, LENGTHS)
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/completions", json=LONG, timeout=httpx.Timeout(60, read=0.5))
    wait_idle(http)
    assert metric(http, ABORTS) == aborts + 1
    assert metric(http, LENGTHS) == lengths


def test_full_queue_answers_503_then_recovers(server, http):
    rejected = metric(http, "fractal_requests_rejected_total")
    # 2 running + 1 queued = capacity; the headers come once the engine has accepted a request
    streams = [open_stream(server, LONG, wait_for_text=False) for _ in range(3)]
    try:
        resp = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["code"] == "server_overloaded"
        chat = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]})
        assert chat.status_code == 503
        assert metric(http, "fractal_requests_rejected_total") == rejected + 2
    finally:
        for client, stream, _ in streams:
            stream.close()
            client.close()
    wait_idle(http)
    resp = http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert resp.status_code == 200, resp.text


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/completions"),
                                          ("POST", "/v1/chat/completions"), ("GET", "/v1/anything")])
def test_api_key_guards_every_v1_route(server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        resp = httpx.request(method, server.url + path, headers=headers, json={"prompt": "a"})
        assert resp.status_code == 401, (headers, resp.text)
        assert resp.json()["error"]["code"] == "invalid_api_key"


def test_api_key_lets_the_right_client_in(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 200
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
    assert good.completions.create(model="tiny", prompt="x", max_tokens=2).usage.completion_tokens >= 1
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_engine_failure_fails_the_running_request_and_the_server_goes_on(model_dir):
    engine = LLMEngine.from_args(model_dir, max_num_seqs=2)
    real_step, calls = engine.step, []

    def step_failing_once():  # a fault injected before the real step: the engine state stays consistent
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected fault")
        return real_step()

    engine.step = step_failing_once
    with ServerThread(engine, ServerConfig(model_names=("tiny",))) as srv:
        resp = httpx.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 20, "ignore_eos": True})
        assert resp.status_code == 500
        assert resp.json()["error"]["code"] == "engine_error" and "injected fault" in resp.json()["error"]["message"]
        resp = httpx.post(srv.url + "/v1/completions", json={"prompt": "a", "max_tokens": 5, "ignore_eos": True})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 5
        assert httpx.get(srv.url + "/health").status_code == 200
        with httpx.Client(base_url=srv.url) as client:
            wait_idle(client)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_in_flight_stream_and_exits_zero(model_dir):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "fractal", "serve", model_dir, "--port", str(port),
                             "--served-model-name", "tiny", "--max-num-seqs", "4", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        body = {"model": "tiny", "prompt": "import sys\n", "max_tokens": 600, "ignore_eos": True,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        events_after_signal, signalled = [], False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                if signalled:
                    events_after_signal.append(line[6:])
                elif json.loads(line[6:])["choices"][0]["text"]:
                    proc.send_signal(signal.SIGTERM)
                    signalled = True
                    time.sleep(0.3)  # let the server start shutting down mid-stream
                    with pytest.raises(httpx.TransportError):  # no new connections while draining
                        httpx.get(url + "/health", timeout=2)
        assert events_after_signal[-1] == "[DONE]"
        usage = json.loads(events_after_signal[-2])["usage"]
        assert usage["completion_tokens"] == 600  # the stream finished in full after SIGTERM
        assert any(json.loads(e)["choices"] and json.loads(e)["choices"][0]["text"] for e in events_after_signal[:-1])
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
