"""OpenAI-style errors: an exception the handlers raise and the JSON body the server answers with.

Body: {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}.
Statuses: 400 bad input, 401 bad API key, 404 unknown model or route, 503 queue full or draining,
500 an engine failure (the message says so; the server keeps serving).
"""
from __future__ import annotations

import re
from http import HTTPStatus

from pydantic import ValidationError

from fractal.errors import FractalError

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client; never crashes the server."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    kind = _TYPES.get(status) or ("invalid_request_error" if status < 500 else "server_error")
    if code is None:
        code = HTTPStatus(status).phrase.lower().replace(" ", "_") if status in HTTPStatus._value2member_map_ else None
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


_PARAM_AT_START = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=")


def from_fractal_error(exc: FractalError) -> APIError:
    """400 with `param` taken from the message's leading `name=` when it has one."""
    message = str(exc)
    match = _PARAM_AT_START.match(message)
    return APIError(400, message, param=match.group(1) if match else None, code="invalid_value")


def from_validation_error(exc: ValidationError) -> APIError:
    """400 naming the first field at fault (pydantic's loc) and what was wrong with it."""
    errors = exc.errors(include_url=False)
    if not errors:
        return APIError(400, "invalid request body", code="invalid_value")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith("function-")]
    param = ".".join(loc) if loc else None
    message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return APIError(400, message, param=loc[0] if loc else None, code="invalid_value")
