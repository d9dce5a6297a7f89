"""ASGI middleware: the API key before the body, the body-size limit, request metrics."""

from __future__ import annotations

import uuid

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenmill.server.auth import auth_error, key_matches, needs_key
from tokenmill.server.errors import error_body, error_response
from tokenmill.server.metrics import ServerMetrics


class APIKeyMiddleware:
    """401 for a request to a keyed route (/v1, /pooling, /invocations) without the key,
    before its body is read (an unauthenticated client cannot make the server buffer or
    parse anything). CORS preflights pass."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]):
        self.app, self.api_keys = app, api_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] != "OPTIONS" and needs_key(scope):
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"").decode("latin-1")
            if not key_matches(authorization, self.api_keys):
                exc = auth_error()
                response = JSONResponse(
                    error_body(exc).model_dump(), 401, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class HTTPMetricsMiddleware:
    """Counts requests by handler (route path, or 'none' as the instrumentator vLLM uses
    says), method and status class ("2xx"); and those to `load_paths` in flight, streams
    until their last byte (GET /load, vLLM's server load)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: ServerMetrics,
        paths: frozenset[str],
        load_paths: frozenset[str] = frozenset(),
    ):
        self.app, self.metrics, self.paths, self.load_paths = app, metrics, paths, load_paths

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

        path = scope["path"].removeprefix(scope.get("root_path", ""))
        load = path in self.load_paths
        self.metrics.server_load += load
        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.server_load -= load
            handler = path if path in self.paths else "none"
            self.metrics.http_requests.labels(
                handler=handler, method=scope["method"], status=f"{status // 100}xx"
            ).inc()


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
        response = error_response(
            413,
            "RequestTooLargeError",
            f"the request body is larger than the server's limit of {self.max_bytes} bytes "
            "(--max-request-body-bytes)",
        )
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


class RequestIdMiddleware:
    """X-Request-Id on every response: the client's own, else a new one (vLLM's
    --enable-request-id-headers)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"x-request-id")
        request_id = given if given else uuid.uuid4().hex.encode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
