"""The FastAPI app: routes, API-key check, OpenAI-style errors, engine-thread lifecycle.

Routes: GET /health, GET /metrics (Prometheus text), GET /v1/models, POST /v1/completions,
POST /v1/chat/completions. Request bodies are parsed by hand (not by FastAPI's signature injection) so
every bad body gets a 400 in OpenAI's error shape instead of FastAPI's 422.
"""
from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

from fractal.serve.async_engine import AsyncEngine
from fractal.serve.chat import create_chat_completion
from fractal.serve.completions import create_completion
from fractal.serve.config import ServerConfig
from fractal.serve.errors import APIError, error_body, from_validation_error
from fractal.serve.protocol import ChatCompletionRequest, CompletionRequest
from fractal.serve.serving import OpenAIServing, now_s

logger = logging.getLogger("fractal.serve")

MAX_BODY_BYTES = 32 << 20  # a larger request body gets 413


class APIKeyMiddleware:
    """Pure ASGI middleware: every path under /v1 needs `Authorization: Bearer <key>` (else 401)."""

    def __init__(self, app, api_key: str, metrics):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.metrics.http_errors.inc(1, "401")
                body = error_body(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`",
                                  code="invalid_api_key")
                response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _parse(request: Request, model: type[BaseModel]):
    """Read and validate a JSON body; every failure becomes a 400 (413 when too large)."""
    size = int(request.headers.get("content-length") or 0)
    if size > MAX_BODY_BYTES:
        raise APIError(413, f"request body of {size} bytes exceeds the limit of {MAX_BODY_BYTES}",
                       code="body_too_large")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > MAX_BODY_BYTES:
            raise APIError(413, f"request body exceeds the limit of {MAX_BODY_BYTES} bytes", code="body_too_large")
        chunks.append(chunk)
    try:
        data = json.loads(b"".join(chunks).decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise APIError(400, f"malformed JSON body: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise APIError(400, f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:  # a "\ud800" escape parses to a lone surrogate that no tokenizer or UTF-8 response can hold
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise APIError(400, "the body holds a lone UTF-16 surrogate (an unpaired \\uD800-\\uDFFF escape), "
                            "which is not valid text", code="invalid_json") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise from_validation_error(exc) from exc


def build_app(engine: AsyncEngine, config: ServerConfig) -> FastAPI:
    """The ASGI app. The engine thread starts with the app's lifespan and stops after uvicorn drained."""
    serving = OpenAIServing(engine, config)
    metrics = engine.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="fractal", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        metrics.http_errors.inc(1, str(exc.status))
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        metrics.http_errors.inc(1, str(exc.status_code))
        message = "no such route" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception):
        logger.exception("unexpected error while serving a request")
        metrics.http_errors.inc(1, "500")
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}: {exc}"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if engine.draining or not engine.alive:
            return JSONResponse({"status": "draining" if engine.draining else "engine stopped"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> Response:
        data = [{"id": name, "object": "model", "created": now_s(), "owned_by": "fractal",
                 "root": name, "max_model_len": engine.max_model_len} for name in config.model_names]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await create_completion(serving, await _parse(request, CompletionRequest), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await create_chat_completion(serving, await _parse(request, ChatCompletionRequest), request)

    return app
