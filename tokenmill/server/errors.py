"""OpenAI's error envelope, and the exception handlers that send every error in it."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from tokenmill.errors import (
    AuthenticationError,
    InvalidRequestError,
    OverloadedError,
    TokenmillError,
)
from tokenmill.server.auth import check_api_key, needs_key
from tokenmill.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


def error_body(exc: Exception) -> ErrorResponse:
    """The OpenAI envelope for an exception; anything not ours is a generic internal error.

    `code` is always the HTTP status as an int, as in vLLM's ErrorInfo, on every path (JSON
    bodies, stream error events, middleware): one type for clients to parse."""
    if isinstance(exc, TokenmillError):
        info = ErrorInfo(
            message=exc.message, type=exc.error_type, param=exc.param, code=exc.status_code
        )
    else:
        info = ErrorInfo(message="internal server error", type="InternalServerError", code=500)
    return ErrorResponse(error=info)


def error_response(
    status: int, error_type: str, message: str, param: str | None = None
) -> JSONResponse:
    info = ErrorInfo(message=message, type=error_type, param=param, code=status)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status)


def add_exception_handlers(app: FastAPI) -> None:
    """Every error leaves as the envelope: ours with their status, FastAPI's 422 as a 400,
    routing's 404/405, and anything unexpected as a logged, generic 500."""
    app.add_exception_handler(TokenmillError, _tokenmill_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)


async def _tokenmill_error(request: Request, exc: TokenmillError) -> JSONResponse:
    headers = None
    if isinstance(exc, AuthenticationError):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, OverloadedError):
        headers = {"Retry-After": str(exc.retry_after_s)}
    if exc.status_code >= 500:
        logger.error("%s %s failed: %s", request.method, request.url.path, exc.message)
    return JSONResponse(error_body(exc).model_dump(), exc.status_code, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400: a body that is not a JSON object says so plainly
    (malformed JSON with its line and column), otherwise the first offending field is named."""
    if needs_key(request.scope):
        try:
            check_api_key(request)  # an unauthenticated client learns nothing about the API
        except AuthenticationError as auth:
            return await _tokenmill_error(request, auth)
    errors = exc.errors()
    error = _body_error(request, exc.body, errors)
    if error is None:
        params = [_param(e.get("loc", ())) for e in errors]
        messages = list(
            dict.fromkeys(
                f"{p}: {e.get('msg')}" if p else str(e.get("msg"))
                for p, e in zip(params, errors, strict=True)
            )
        )
        error = InvalidRequestError(
            "; ".join(messages) or "invalid request", param=params[0] if params else None
        )
    return await _tokenmill_error(request, error)


def _body_error(request: Request, body: Any, errors: Any) -> InvalidRequestError | None:
    """The error for a body that is not a JSON object at all, or None when it is one (or when
    the errors are about something else, such as a query parameter)."""
    if not any(tuple(e.get("loc", ()))[:1] == ("body",) for e in errors):
        return None
    if errors and errors[0].get("type") == "json_invalid":
        loc = errors[0].get("loc", ())
        pos = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
        why = (errors[0].get("ctx") or {}).get("error") or "not valid JSON"
        line, column = _line_column(body if isinstance(body, str) else "", pos)
        return InvalidRequestError(f"invalid JSON at line {line} column {column}: {why}")
    if body is None and request.headers.get("content-length", "0") == "0":
        return InvalidRequestError(
            "the request body is empty: send a JSON object with Content-Type: application/json"
        )
    if isinstance(body, bytes | bytearray):  # FastAPI only parses JSON content types
        content_type = request.headers.get("content-type")
        got = f"Content-Type: {content_type}" if content_type else "no Content-Type"
        return InvalidRequestError(
            f"the request body must be JSON sent with Content-Type: application/json ({got})"
        )
    if not isinstance(body, dict):
        return InvalidRequestError(
            f"the request body must be a JSON object, not {_json_kind(body)}"
        )
    return None


def _line_column(doc: str, pos: int) -> tuple[int, int]:
    """1-based line and column of character `pos`, as json.JSONDecodeError counts them."""
    pos = max(0, min(pos, len(doc)))
    line = doc.count("\n", 0, pos) + 1
    return line, pos - doc.rfind("\n", 0, pos)


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null" if value is None else type(value).__name__


# pydantic's names for union members and validator wrappers in an error's location, which
# are not fields the client wrote ("function-wrap[...]", "str", "list[...]")
_UNION_TAG = re.compile(r".*\[.*\]|function-\w+|str|int|float|bool|list|dict|none|json-or-python")


def _param(loc: Any) -> str | None:
    """The dotted field path of an error's location, without the leading "body"."""
    parts = [str(p) for p in tuple(loc)[1:] if not (isinstance(p, str) and _UNION_TAG.fullmatch(p))]
    return ".".join(parts) or None


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    names = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowedError"}
    message = str(exc.detail)
    cause = exc.__cause__
    if exc.status_code == 400 and cause is not None:  # FastAPI could not parse the body
        if isinstance(cause, RecursionError):
            message = "invalid JSON: nested too deeply"
        elif isinstance(cause, ValueError | UnicodeDecodeError):
            message = f"invalid JSON: {str(cause).split('; use sys.', 1)[0]}"
    return error_response(exc.status_code, names.get(exc.status_code, "Error"), message)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error serving %s %s", request.method, request.url.path)
    return JSONResponse(error_body(exc).model_dump(), status_code=500)
