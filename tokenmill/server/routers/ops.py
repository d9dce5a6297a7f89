"""Operational routes, without the API key (health checks and scrapers): /health, /ping,
/version, /metrics, /load."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Request
from starlette.responses import Response

from tokenmill.server.errors import error_response
from tokenmill.server.protocol import VersionResponse

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> Response:
    if request.app.state.engine.is_alive:
        return Response(status_code=200)
    return error_response(503, "ServiceUnavailableError", "the engine is not running")


@router.get("/ping")
@router.post("/ping")
async def ping(request: Request) -> Response:
    """SageMaker's health check, as vLLM serves it: the same answer as /health."""
    return await health(request)


@router.get("/version")
async def version() -> VersionResponse:
    return VersionResponse(version=server_version())


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/load")
async def load(request: Request) -> dict[str, int]:
    """vLLM's server load: requests to the model's routes in flight (a router's signal)."""
    return {"server_load": request.app.state.metrics.server_load}


def server_version() -> str:
    import tokenmill

    version = getattr(tokenmill, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        with contextlib.suppress(PackageNotFoundError):
            version = package_version("tokenmill")
    return str(version or "0+unknown")
