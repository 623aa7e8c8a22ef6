"""Running the app under uvicorn: in the foreground (`fractal serve`) or in a background thread.

`serve()` blocks until SIGTERM/SIGINT: uvicorn stops accepting connections, waits for in-flight
responses (up to `ServerConfig.drain_timeout_s`), then the app's lifespan stops the engine thread.
`ServerThread` runs the same app on 127.0.0.1 and a free port in a daemon thread (tests, notebooks,
benchmarks against an in-process server); signals stay with the main thread there.
"""
from __future__ import annotations

import signal
import socket
import threading
import time

import uvicorn

from fractal.serve.api_server import build_app
from fractal.serve.async_engine import AsyncEngine
from fractal.serve.config import ServerConfig


class DrainingServer(uvicorn.Server):
    """uvicorn's Server that also marks the app as draining (new requests 503, /health 503) on a signal."""

    def __init__(self, config: uvicorn.Config, async_engine: AsyncEngine):
        super().__init__(config)
        self.async_engine = async_engine

    def handle_exit(self, sig, frame) -> None:
        self.async_engine.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after its graceful shutdown, so the process would die of
        # SIGTERM (status -15) after draining; a completed drain is a clean exit, so keep SIGTERM out.
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and isinstance(captured, list) and sig in captured:
            captured.remove(sig)


def _make_server(engine, config: ServerConfig, *, host: str, port: int, log_level: str,
                 access_log: bool) -> DrainingServer:
    async_engine = AsyncEngine(engine)
    if config.chat_template is not None and engine.tokenizer is not None:
        engine.tokenizer.chat_templates = {"default": config.chat_template}
    app = build_app(async_engine, config)
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                               timeout_graceful_shutdown=config.drain_timeout_s, lifespan="on")
    return DrainingServer(uv_config, async_engine)


def serve(engine, config: ServerConfig, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          access_log: bool = False) -> None:
    """Serve `engine` (an LLMEngine) in this thread until a signal; returns after draining."""
    _make_server(engine, config, host=host, port=port, log_level=log_level, access_log=access_log).run()


class ServerThread:
    """`with ServerThread(engine, config) as srv: httpx.get(srv.url + "/health")`."""

    def __init__(self, engine, config: ServerConfig, log_level: str = "warning"):
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = _make_server(engine, config, host="127.0.0.1", port=self.port, log_level=log_level,
                                   access_log=False)
        self.async_engine = self.server.async_engine
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="fractal-uvicorn", daemon=True)

    def start(self, timeout_s: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server thread did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout_s)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
