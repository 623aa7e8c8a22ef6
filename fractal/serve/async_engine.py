"""The engine loop beside the HTTP layer: one dedicated thread owns the `LLMEngine`.

Why a thread (not the event loop, not a process):
- On the event loop, every `engine.step()` (a model forward, milliseconds to a second) would block all
  HTTP I/O: no new connections, no streamed tokens, no disconnect detection during the step.
- A thread keeps the engine's tensors and the HTTP layer in one address space: outputs cross as
  Python objects, no pickling, and PyTorch releases the GIL inside its kernels, so the event loop runs
  while the model computes. A separate process would add IPC per token for little gain at the sizes
  this server targets; the split is kept narrow (a command queue in, `call_soon_threadsafe` out) so a
  process could replace the thread later.

Flow: a handler tokenises (in a worker thread), then `AsyncEngine.add()` puts an "add" command on a
thread-safe queue and awaits the engine thread's acknowledgement (so a bad request gets its 400 before
any streamed byte). The engine thread drains commands between steps, runs `engine.step()`, and hands
each step's outputs back to the event loop in one `loop.call_soon_threadsafe` call, which feeds each
request's `asyncio.Queue`. An "abort" command (client gone) calls `engine.abort_request`, which frees the
request's KV blocks. Only the engine thread touches the engine; only the event loop touches the queues.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from fractal.errors import FractalError
from fractal.outputs import RequestOutput
from fractal.sampling_params import SamplingParams
from fractal.serve.errors import APIError, from_fractal_error
from fractal.serve.metrics import ServerMetrics

logger = logging.getLogger("fractal.serve")

_ACCEPTED = object()
STATS_INTERVAL_S = 0.02  # engine-stat gauges refresh at most this often while busy (and always when idle)


class RequestStream:
    """One request's view of the engine: cumulative `RequestOutput`s, or an `APIError`, in order."""

    def __init__(self, request_id: str):
        self.request_id = request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    async def wait_accepted(self) -> None:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        assert item is _ACCEPTED, item

    async def next(self) -> RequestOutput:
        """The newest output (outputs are cumulative, so older queued ones are skipped); raises errors."""
        item = await self.queue.get()
        while not self.queue.empty() and not isinstance(item, BaseException):
            item = self.queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item


@dataclass
class _Tracked:
    """Engine-thread bookkeeping of one live request (for metrics)."""

    stream: RequestStream
    endpoint: str
    arrival: float
    first_token: float | None = None
    seq_first_token: dict[int, float] = field(default_factory=dict)
    seq_tokens: dict[int, int] = field(default_factory=dict)
    seq_done: set[int] = field(default_factory=set)


class AsyncEngine:
    """Runs `engine` in its own thread and serves asyncio callers. Create, then `start()` on the loop."""

    def __init__(self, engine: Any, metrics: ServerMetrics | None = None):
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.tokenizer = getattr(engine, "tokenizer", None)
        self.max_model_len: int = int(engine.max_model_len)
        self.draining = False
        self.in_flight = 0  # touched only on the event loop
        self.last_error: str | None = None
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._live: dict[str, _Tracked] = {}  # engine thread only
        self._last_stats = 0.0

    # ---- event-loop side -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="fractal-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                  endpoint: str, arrival: float) -> RequestStream:
        """Submit one request; returns once the engine accepted it (or raises its APIError)."""
        if not self.alive:
            raise APIError(503, "the engine loop is not running", code="engine_not_running")
        stream = RequestStream(request_id)
        self._commands.put(("add", request_id, list(prompt_token_ids), params, stream, endpoint, arrival))
        try:
            await stream.wait_accepted()
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Thread-safe: stop a request and free its KV blocks (no-op if it already finished)."""
        self._commands.put(("abort", request_id))

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread (aborting whatever is still running) and wait for it."""
        self.draining = True
        if self._thread is None:
            return
        self._commands.put(("stop",))
        await asyncio.to_thread(self._thread.join, timeout_s)

    def _deliver(self, batch: list[tuple[RequestStream, Any]]) -> None:
        for stream, item in batch:
            stream.queue.put_nowait(item)

    # ---- engine-thread side ----------------------------------------------------------------------
    def _post(self, batch: list[tuple[RequestStream, Any]]) -> None:
        if not batch or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        try:
            self._loop_forever()
        except BaseException as exc:  # a bug in this loop: fail every waiting client rather than hang them
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.critical("the engine loop stopped:\n%s", traceback.format_exc())
            self._post([(t.stream, APIError(500, f"the engine loop stopped: {self.last_error}",
                                            code="engine_error")) for t in self._live.values()])
            self._live.clear()
            self._fail_pending_commands()

    def _fail_pending_commands(self) -> None:
        """After the loop died: answer the adds still queued so their handlers do not wait forever."""
        batch = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                batch.append((command[4], APIError(503, "the engine loop is not running", code="engine_not_running")))
        self._post(batch)

    def _loop_forever(self) -> None:
        engine = self.engine
        stopping = False
        while True:
            busy = engine.has_unfinished_requests()
            commands = []
            if not busy and not stopping:
                commands.append(self._commands.get())  # idle: sleep until a command arrives
            while True:
                try:
                    commands.append(self._commands.get_nowait())
                except queue.Empty:
                    break
            batch: list[tuple[RequestStream, Any]] = []
            for command in commands:
                if command[0] == "stop":
                    stopping = True
                elif command[0] == "add":
                    self._handle_add(command, batch)
                elif command[0] == "abort":
                    self._handle_abort(command[1])
            self._post(batch)
            if stopping:
                for request_id in list(self._live):
                    self._handle_abort(request_id)
                self._refresh_stats(force=True)
                return
            if engine.has_unfinished_requests():
                self._step()
                self._refresh_stats(force=not engine.has_unfinished_requests())
            else:
                self._refresh_stats(force=True)

    def _handle_add(self, command: tuple, batch: list) -> None:
        _, request_id, prompt, params, stream, endpoint, arrival = command
        try:
            self.engine.add_request(request_id, prompt, params)
        except FractalError as exc:
            batch.append((stream, from_fractal_error(exc)))
            return
        except Exception as exc:  # the engine refused for a reason of its own: this request only fails
            logger.error("add_request(%s) failed:\n%s", request_id, traceback.format_exc())
            batch.append((stream, APIError(500, f"the engine could not add the request: {exc}")))
            return
        self._live[request_id] = _Tracked(stream=stream, endpoint=endpoint, arrival=arrival)
        self.metrics.prompt_tokens.inc(len(prompt))
        batch.append((stream, _ACCEPTED))

    def _handle_abort(self, request_id: str) -> None:
        tracked = self._live.pop(request_id, None)
        if tracked is None:
            return
        try:
            self.engine.abort_request(request_id)
        except Exception:  # already gone inside the engine: nothing left to free
            logger.debug("abort_request(%s) raised:\n%s", request_id, traceback.format_exc())
        self.metrics.requests.inc(1, tracked.endpoint, "abort")
        self.metrics.e2e.observe(time.monotonic() - tracked.arrival)
        self._post([(tracked.stream, RequestOutputAborted(request_id))])

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            # A bug in the engine must not take the server down: fail the requests in flight, free their
            # blocks, keep serving. Clients see a 500 (or an error event in their stream).
            self.last_error = f"{type(exc).__name__}: {exc}"
            logger.error("engine step failed; failing %d request(s):\n%s", len(self._live),
                         traceback.format_exc())
            batch = []
            for request_id, tracked in list(self._live.items()):
                self._live.pop(request_id)
                try:
                    self.engine.abort_request(request_id)
                except Exception:
                    pass
                self.metrics.requests.inc(1, tracked.endpoint, "error")
                batch.append((tracked.stream, APIError(500, f"the engine failed while running this request: "
                                                            f"{self.last_error}", code="engine_error")))
            self._post(batch)
            return
        self.metrics.engine_steps.inc()
        now = time.monotonic()
        batch = []
        for out in outputs:
            tracked = self._live.get(out.request_id)
            if tracked is None:  # aborted meanwhile
                continue
            self._account(tracked, out, now)
            if out.finished:
                self._live.pop(out.request_id, None)
            batch.append((tracked.stream, out))
        self._post(batch)

    def _account(self, tracked: _Tracked, out: RequestOutput, now: float) -> None:
        m = self.metrics
        for comp in out.outputs:
            n_tokens = len(comp.token_ids)
            new = n_tokens - tracked.seq_tokens.get(comp.index, 0)
            if new > 0:
                m.generation_tokens.inc(new)
                tracked.seq_tokens[comp.index] = n_tokens
                tracked.seq_first_token.setdefault(comp.index, now)
                if tracked.first_token is None:
                    tracked.first_token = now
                    m.ttft.observe(now - tracked.arrival)
            if comp.finish_reason is not None and comp.index not in tracked.seq_done:
                tracked.seq_done.add(comp.index)
                m.output_len.observe(n_tokens)
                first = tracked.seq_first_token.get(comp.index)
                if first is not None and n_tokens > 1:
                    m.tpot.observe((now - first) / (n_tokens - 1))
        if out.finished:
            reason = out.outputs[0].finish_reason if out.outputs else "stop"
            m.requests.inc(1, tracked.endpoint, reason or "stop")
            m.e2e.observe(now - tracked.arrival)

    def _refresh_stats(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < STATS_INTERVAL_S:
            return
        self._last_stats = now
        try:
            self.metrics.update_engine_stats(self.engine.get_stats())
        except Exception:
            logger.debug("get_stats failed:\n%s", traceback.format_exc())


class RequestOutputAborted(APIError):
    """Put on a stream whose request was aborted (its handler normally is gone already)."""

    def __init__(self, request_id: str):
        super().__init__(499, f"request {request_id} was aborted", code="aborted")
