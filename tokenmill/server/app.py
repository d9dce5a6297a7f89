"""build_app: the FastAPI app around one engine, assembled from the routers, the middleware and
the error handlers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from tokenmill.engine.client import EngineClient
from tokenmill.server.errors import add_exception_handlers
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.middleware import (
    APIKeyMiddleware,
    BodySizeLimitMiddleware,
    HTTPMetricsMiddleware,
    RequestIdMiddleware,
)
from tokenmill.server.routers import (
    chat,
    completions,
    embeddings,
    infill,
    invocations,
    models,
    ops,
    playground,
    responses,
    score,
    tokenize,
)
from tokenmill.server.routers.ops import server_version
from tokenmill.server.serving_chat import ChatServer
from tokenmill.server.serving_completion import CompletionServer
from tokenmill.server.serving_embedding import EmbeddingServer
from tokenmill.server.serving_responses import ResponsesServer
from tokenmill.server.serving_score import ScoreServer
from tokenmill.server.settings import ServerSettings
from tokenmill.server.stats_log import StatsLogger
from tokenmill.tokenizer.template_sandbox import start_renderer

logger = logging.getLogger(__name__)

# In the order their routes are listed (OpenAPI); a new endpoint family is one more here.
ROUTERS: tuple[APIRouter, ...] = (
    models.router,
    completions.router,
    chat.router,
    responses.router,
    embeddings.router,
    embeddings.pooling_router,
    score.router,
    infill.router,
    invocations.router,
    ops.router,
    tokenize.router,
)
# The routes that run the model (all but these): GET /load counts their requests in flight.
LOAD_ROUTERS: tuple[APIRouter, ...] = tuple(
    r for r in ROUTERS if r not in (models.router, ops.router, tokenize.router)
)


def build_app(engine: EngineClient, settings: ServerSettings) -> FastAPI:
    """The whole HTTP server around one engine; the app starts and stops the engine."""
    docs: dict[str, Any] = {} if settings.docs else dict(docs_url=None, redoc_url=None,
                                                          openapi_url=None)  # fmt: skip
    app = FastAPI(title="tokenmill", version=server_version(), lifespan=_lifespan, **docs)
    metrics = ServerMetrics(
        engine.stats_per_engine, settings.served_model_names[0], engine.max_model_len,
        engine.cache_info,
    )  # fmt: skip
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-tokenizer")
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics
    app.state.executor = executor
    app.state.completion = CompletionServer(engine, settings, metrics, executor)
    app.state.chat = ChatServer(engine, settings, metrics, executor)
    app.state.embedding = EmbeddingServer(engine, settings, metrics, executor, chat=app.state.chat)
    app.state.score = ScoreServer(
        engine, settings, metrics, executor, embedding=app.state.embedding
    )
    app.state.responses = ResponsesServer(engine, settings, metrics, executor, chat=app.state.chat)
    routers = ROUTERS + ((playground.router,) if settings.playground else ())
    for router in routers:
        app.include_router(router)
    add_exception_handlers(app)
    _add_middleware(app, settings, metrics, routers)
    return app


def _add_middleware(
    app: FastAPI, settings: ServerSettings, metrics: ServerMetrics, routers: tuple[APIRouter, ...]
) -> None:
    """Outermost last: request metrics, then the API key, the body limit, CORS."""
    if settings.allowed_origins is not None:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.allowed_origins,
            allow_credentials=settings.allow_credentials,
            allow_methods=settings.allowed_methods,
            allow_headers=settings.allowed_headers,
        )
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_body_bytes)
    if settings.api_keys:  # outside the body limit: no key, no body read
        app.add_middleware(APIKeyMiddleware, api_keys=settings.api_keys)
    paths = frozenset(getattr(r, "path", "") for router in routers for r in router.routes)
    load_paths = frozenset(
        getattr(r, "path", "")
        for router in LOAD_ROUTERS
        for r in router.routes
        if "POST" in getattr(r, "methods", ())
    )
    app.add_middleware(HTTPMetricsMiddleware, metrics=metrics, paths=paths, load_paths=load_paths)
    if settings.request_id_headers:
        app.add_middleware(RequestIdMiddleware)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine: EngineClient = app.state.engine
    settings: ServerSettings = app.state.settings
    await engine.start()
    await asyncio.to_thread(start_renderer)  # the chat-template sandbox process
    logger.info(
        "tokenmill ready on %s: model %s, served as %s",
        settings.address, engine.model_name, ", ".join(settings.served_model_names),
    )  # fmt: skip
    stats_line = None
    if settings.log_stats_interval_s is not None:
        stats = StatsLogger(app.state.metrics, engine.stats, settings.log_stats_interval_s)
        stats_line = asyncio.create_task(stats.run(), name="tokenmill-stats-line")
    try:
        yield
    finally:
        if stats_line is not None:
            stats_line.cancel()
        await engine.shutdown()  # the tokenizer executor's idle thread ends with the process
