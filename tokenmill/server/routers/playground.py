"""The playground: a chat page at `/` (static files shipped in the package, no build step,
nothing fetched from elsewhere) that talks to this server's own /v1 API like any client.

The page and its config need no API key: they hold nothing but the page and the served
model's name. Every call the page makes to /v1 carries the key the user types in. The page
writes model output as text only (never as HTML), and the Content-Security-Policy below lets
it run no script but its own file, so output that slips past escaping still cannot run.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from tokenmill.errors import NotFoundError
from tokenmill.server.routers.ops import server_version

router = APIRouter(include_in_schema=False)

# The files the page is made of, and what they are; nothing else under /playground/ is served.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
}
_HEADERS = {
    # its own files only; connections back to this origin (/v1, /metrics) only
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a new tokenmill's page after an upgrade, not a stale one
}


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("tokenmill.server").joinpath("playground", name).read_bytes()


def _file(name: str) -> Response:
    return Response(_asset(name), media_type=ASSETS[name], headers=_HEADERS)


@router.api_route("/", methods=["GET", "HEAD"])
async def page() -> Response:
    return _file("index.html")


@router.get("/playground/config")
async def config(request: Request) -> JSONResponse:
    """What the page shows before any keyed call: the served model and whether a key is
    needed (the same facts /metrics already gives without a key)."""
    settings, engine = request.app.state.settings, request.app.state.engine
    body = {
        "model": settings.served_model_names[0],
        "max_model_len": engine.max_model_len,
        "api_key_required": bool(settings.api_keys),
        "version": server_version(),
    }
    return JSONResponse(body, headers=_HEADERS)


@router.api_route("/playground/{name}", methods=["GET", "HEAD"])
async def asset(name: str) -> Response:
    """One of the page's own files (declared after /playground/config, which it would shadow)."""
    if name not in ASSETS:
        raise NotFoundError(f"no playground file `{name}`")
    return _file(name)
