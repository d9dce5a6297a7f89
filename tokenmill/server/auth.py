"""API-key auth: the key comparison, the route dependency, and the /v1 router that needs it."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Depends, Request
from starlette.types import Scope

from tokenmill.errors import AuthenticationError


def v1_router() -> APIRouter:
    """A router for /v1 routes: every route on it requires the API key (when one is set)."""
    return APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


def check_api_key(request: Request) -> None:
    """401 unless the request carries `Authorization: Bearer <key>` (when a key is set).

    APIKeyMiddleware checks the same before the body is read; this route dependency is the
    second lock, on every /v1 route however its path was spelled."""
    keys: tuple[str, ...] = request.app.state.settings.api_keys
    if keys and not key_matches(request.headers.get("authorization"), keys):
        raise auth_error()


def key_matches(authorization: str | None, keys: tuple[str, ...]) -> bool:
    """Constant-time comparison of `Bearer <token>` with each key (every one compared)."""
    scheme, _, token = (authorization or "").partition(" ")
    given = token.strip().encode()
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    return scheme.lower() == "bearer" and any(matches)


def auth_error() -> AuthenticationError:
    return AuthenticationError(
        "invalid or missing API key; send it as `Authorization: Bearer <key>`"
    )


# the routes outside /v1 that run the model, and so need the key as /v1's do
_KEYED_OUTSIDE_V1 = frozenset({"/pooling", "/invocations", "/score", "/rerank", "/v2/rerank"})


def needs_key(scope: Scope) -> bool:
    """Whether routing would see a path that needs the API key (the decoded path, less the
    root path): /v1 and below, and the model's routes outside it."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == "/v1" or path.startswith("/v1/") or path.rstrip("/") in _KEYED_OUTSIDE_V1
