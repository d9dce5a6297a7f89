"""The FastAPI app: routes, API-key auth, OpenAI error envelopes, CORS and request metrics."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.errors import (
    AuthenticationError,
    InvalidRequestError,
    OverloadedError,
    TokenmillError,
)
from tokenmill.server.cli import DEFAULT_MAX_REQUEST_BODY_BYTES
from tokenmill.server.limits import check_prompt_limits
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
    VersionResponse,
)
from tokenmill.server.serving_base import ServerSettings
from tokenmill.server.serving_chat import ChatServer
from tokenmill.server.serving_completion import CompletionServer
from tokenmill.server.sse import error_body
from tokenmill.tokenizer.template_sandbox import start_renderer

logger = logging.getLogger(__name__)

__all__ = ["ServerSettings", "build_app"]


def build_app(
    engine: AsyncEngine,
    settings: ServerSettings,
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
) -> FastAPI:
    """The whole HTTP server around one engine; the app starts and stops the engine."""
    app = FastAPI(title="tokenmill", version=server_version(), lifespan=_lifespan)
    metrics = ServerMetrics(engine.stats)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-tokenizer")
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.state.executor = executor
    app.state.completion = CompletionServer(engine, settings, metrics, executor)
    app.state.chat = ChatServer(engine, settings, metrics, executor)
    app.include_router(v1)
    app.include_router(ops)
    app.add_exception_handler(TokenmillError, _tokenmill_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected_error)
    if settings.allowed_origins is not None:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_credentials=settings.allow_credentials,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
        )
    paths = frozenset(getattr(r, "path", "") for router in (v1, ops) for r in router.routes)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_body_bytes)
    if settings.api_key is not None:  # outside the body limit: no key, no body read
        app.add_middleware(APIKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, paths=paths)
    return app


def server_version() -> str:
    import tokenmill

    version = getattr(tokenmill, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        with contextlib.suppress(PackageNotFoundError):
            version = package_version("tokenmill")
    return str(version or "0+unknown")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine: AsyncEngine = app.state.engine
    settings: ServerSettings = app.state.settings
    await engine.start()
    await asyncio.to_thread(start_renderer)  # the chat-template sandbox process
    logger.info(
        "tokenmill ready on %s: model %s, served as %s",
        settings.address, engine.model_name, ", ".join(settings.served_model_names),
    )  # fmt: skip
    try:
        yield
    finally:
        await engine.shutdown()  # the tokenizer executor's idle thread ends with the process


# --------------------------------------------------------------------------------------
# Auth and dependencies
# --------------------------------------------------------------------------------------


def check_api_key(request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <key>` (when a key is set).

    APIKeyMiddleware checks the same before the body is read; this route dependency is the
    second lock, on every route of the /v1 router however its path was spelled."""
    key: str | None = request.app.state.settings.api_key
    if key is not None and not key_matches(request.headers.get("authorization"), key):
        raise _auth_error()


def key_matches(authorization: str | None, key: str) -> bool:
    """Constant-time comparison of `Bearer <token>` with the key."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _auth_error() -> AuthenticationError:
    return AuthenticationError(
        "invalid or missing API key; send it as `Authorization: Bearer <key>`",
        code="invalid_api_key",
    )


class APIKeyMiddleware:
    """401 for a /v1 request without the key, before its body is read (an unauthenticated
    client cannot make the server buffer or parse anything). CORS preflights pass."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and _is_v1(scope):
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            if not key_matches(authorization, self.api_key):
                exc = _auth_error()
                response = JSONResponse(
                    error_body(exc).model_dump(), 401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _is_v1(scope: Scope) -> bool:
    """Whether routing would see a /v1 path (the decoded path, less the root path)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == "/v1" or path.startswith("/v1/")


def _completion_server(request: Request) -> CompletionServer:
    return request.app.state.completion


def _chat_server(request: Request) -> ChatServer:
    return request.app.state.chat


v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
ops = APIRouter()


# --------------------------------------------------------------------------------------
# OpenAI routes
# --------------------------------------------------------------------------------------


@v1.get("/models")
async def list_models(request: Request) -> ModelList:
    engine: AsyncEngine = request.app.state.engine
    names = request.app.state.settings.served_model_names
    cards = [
        ModelCard(id=name, root=engine.model_name, max_model_len=engine.max_model_len)
        for name in names
    ]
    return ModelList(data=cards)


@v1.post("/completions")
async def create_completion(
    body: CompletionRequest,
    request: Request,
    server: Annotated[CompletionServer, Depends(_completion_server)],
) -> Response:
    return await until_disconnect(request, server.create(body))


@v1.post("/chat/completions")
async def create_chat_completion(
    body: ChatCompletionRequest,
    request: Request,
    server: Annotated[ChatServer, Depends(_chat_server)],
) -> Response:
    return await until_disconnect(request, server.create(body))


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it (which aborts its engine requests) if the client leaves.

    A streaming handler returns at once; its stream then watches the connection itself.
    """
    handler = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not handler.done():
            handler.cancel()
    if handler in done:
        return handler.result()
    with contextlib.suppress(asyncio.CancelledError):
        await handler
    logger.info("client disconnected; request cancelled")
    return Response(status_code=499)  # nobody is listening; the status only shows in logs


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --------------------------------------------------------------------------------------
# Operational routes (no API key: health checks and scrapers)
# --------------------------------------------------------------------------------------


@ops.get("/health")
async def health(request: Request) -> Response:
    if request.app.state.engine.is_alive:
        return Response(status_code=200)
    return _error_response(503, "ServiceUnavailableError", "the engine is not running")


@ops.get("/version")
async def version() -> VersionResponse:
    return VersionResponse(version=server_version())


@ops.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@ops.post("/tokenize")
async def tokenize(
    body: TokenizeRequest,
    server: Annotated[ChatServer, Depends(_chat_server)],
) -> TokenizeResponse:
    server.check_model(body.model)
    tokenizer = server.engine.tokenizer
    if isinstance(body, TokenizeChatRequest):
        token_ids = await server.prompt_token_ids(body)
    else:
        check_prompt_limits(body.prompt, server.settings.limits)
        token_ids = await server.run_blocking(
            tokenizer.encode, body.prompt, body.add_special_tokens
        )
    strs = tokenizer.convert_ids_to_tokens(token_ids) if body.return_token_strs else None
    return TokenizeResponse(
        count=len(token_ids),
        max_model_len=server.engine.max_model_len,
        tokens=token_ids,
        token_strs=strs,
    )


@ops.post("/detokenize")
async def detokenize(
    body: DetokenizeRequest,
    server: Annotated[ChatServer, Depends(_chat_server)],
) -> DetokenizeResponse:
    server.check_model(body.model)
    server.check_token_ids(body.tokens, "tokens")
    text = await server.run_blocking(server.engine.tokenizer.decode, body.tokens)
    return DetokenizeResponse(prompt=text)


# --------------------------------------------------------------------------------------
# Errors: everything leaves as OpenAI's envelope
# --------------------------------------------------------------------------------------


def _error_response(
    status: int, error_type: str, message: str, param: str | None = None
) -> JSONResponse:
    info = ErrorInfo(message=message, type=error_type, param=param, code=status)
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status)


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
    if _is_v1(request.scope):
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
    return _error_response(exc.status_code, names.get(exc.status_code, "Error"), str(exc.detail))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error serving %s %s", request.method, request.url.path)
    return JSONResponse(error_body(exc).model_dump(), status_code=500)


# --------------------------------------------------------------------------------------
# Request metrics
# --------------------------------------------------------------------------------------


class HTTPMetricsMiddleware:
    """Counts requests by endpoint (route path, or 'other') and response status."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, paths: frozenset[str]):
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            path = scope["path"].removeprefix(scope.get("root_path", ""))
            endpoint = path if path in self.paths else "other"
            self.metrics.http_requests.labels(endpoint=endpoint, status=str(status)).inc()


# --------------------------------------------------------------------------------------
# Request body limit
# --------------------------------------------------------------------------------------


class BodySizeLimitMiddleware:
    """413 for a body over `max_bytes`: at once from Content-Length, else while it streams
    in (chunked uploads). The body is read here, never more than the limit, then handed on."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._reject(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replay() -> Message:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()  # after the body: wait for the disconnect

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        response = _error_response(
            413,
            "RequestTooLargeError",
            f"the request body is larger than the server's limit of {self.max_bytes} bytes "
            "(--max-request-body-bytes)",
        )
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
