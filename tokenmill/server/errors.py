"""OpenAI's error envelope, and the exception handlers that send every error in it."""

from __future__ import annotations

import logging

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
from tokenmill.server.auth import check_api_key, is_v1
from tokenmill.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


def error_body(exc: Exception) -> ErrorResponse:
    """The OpenAI envelope for an exception; anything not ours is a generic internal error."""
    if isinstance(exc, TokenmillError):
        info = ErrorInfo(
            message=exc.message,
            type=exc.error_type,
            param=exc.param,
            code=exc.code if exc.code is not None else exc.status_code,
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
    """FastAPI's 422 becomes OpenAI's 400, naming the first offending field."""
    if is_v1(request.scope):
        try:
            check_api_key(request)  # an unauthenticated client learns nothing about the API
        except AuthenticationError as auth:
            return await _tokenmill_error(request, auth)
    errors = exc.errors()
    params = [".".join(str(p) for p in e.get("loc", ())[1:]) or None for e in errors]
    messages = [
        f"{p}: {e.get('msg')}" if p else str(e.get("msg"))
        for p, e in zip(params, errors, strict=True)
    ]
    error = InvalidRequestError(
        "; ".join(messages) or "invalid request", param=params[0] if params else None
    )
    return await _tokenmill_error(request, error)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    names = {404: "NotFoundError", 405: "MethodNotAllowedError"}
    return error_response(exc.status_code, names.get(exc.status_code, "Error"), str(exc.detail))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error serving %s %s", request.method, request.url.path)
    return JSONResponse(error_body(exc).model_dump(), status_code=500)
