"""Server settings (frozen; built once by `fractal serve` or by tests and passed to `build_app`)."""
from __future__ import annotations

from dataclasses import dataclass

from fractal.errors import FractalError


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP layer behaves (the engine has its own EngineConfig).

    model_names: names `/v1/models` lists and requests may use (the first is the default when a
      request leaves `model` out).
    api_key: when set, every /v1 route needs `Authorization: Bearer <api_key>`; /health and /metrics
      stay open.
    max_running: requests the engine runs at once (its max_num_seqs).
    max_queue: requests that may wait beyond max_running; past max_running + max_queue requests in
      flight, new ones get 503 with Retry-After instead of an ever-growing queue.
    max_n: the largest `n` a request may ask for.
    chat_template: a Jinja2 chat template that overrides the tokenizer's (None: the tokenizer's own,
      or fractal's documented fallback).
    drain_timeout_s: on SIGTERM, how long in-flight requests may take to finish (None: no limit).
    """

    model_names: tuple[str, ...]
    api_key: str | None = None
    max_running: int = 64
    max_queue: int = 256
    max_n: int = 16
    chat_template: str | None = None
    drain_timeout_s: float | None = 600.0

    def __post_init__(self) -> None:
        if not self.model_names or any(not isinstance(n, str) or not n for n in self.model_names):
            raise FractalError(f"model_names={self.model_names!r} is invalid: need at least one non-empty name")
        for name in ("max_running", "max_n"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise FractalError(f"{name}={value!r} is invalid: must be an integer >= 1")
        if not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise FractalError(f"max_queue={self.max_queue!r} is invalid: must be an integer >= 0")
        if self.api_key is not None and not self.api_key:
            raise FractalError("api_key='' is invalid: give a non-empty key or leave it out")

    @property
    def capacity(self) -> int:
        """Requests the server holds at once (running + waiting)."""
        return self.max_running + self.max_queue
