"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# HTTP status -> OpenAI error `type`
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # extra response headers (429: Retry-After)

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def _text(s: str | None) -> str | None:
    """Error text is written as UTF-8: a lone surrogate echoed from a request becomes its escape."""
    if s is None or s.isascii():
        return s
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": _text(message), "type": _TYPES.get(status, "invalid_request_error"),
                      "param": _text(param), "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_bytes(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, param, code)).encode()


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    # loc looks like ("body", "messages", 0, "role"); OpenAI writes params as "messages[0].role"
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in ("str", "list[str]", "list[int]", "list[list[int]]", "list[TextPart]") or "[" in str(p):
            continue  # union-member tags pydantic adds to loc
        else:
            out += ("." if out else "") + str(p)
    return out or None


async def validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    extra = [e for e in errors if e.get("type") == "extra_forbidden"]
    if extra:  # OpenAI's answer to an unknown field, rather than running without it
        param = _param_from_loc(tuple(extra[0].get("loc", ())))
        return error_response(400, f"Unrecognized request argument supplied: {param}", param,
                              "unsupported_parameter")
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    if first.get("type") == "json_invalid":
        return error_response(400, f"request body is not valid JSON: {first.get('msg', '')}", None, "invalid_json")
    param = _param_from_loc(loc)
    if first.get("type") == "missing":
        msg = f"missing required field: {param}"
    else:
        msg = f"invalid value for {param}: {first.get('msg', 'invalid')}"
        if "input" in first and not isinstance(first["input"], dict | list):
            msg += f" (got {first['input']!r})"
    return error_response(400, msg, param, "invalid_value")


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed", 408: "body_timeout",
            413: "request_too_large"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), None, code, getattr(exc, "headers", None))


async def unhandled_handler(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", None, "internal_error")
