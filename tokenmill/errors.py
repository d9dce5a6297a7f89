"""Exceptions that carry an HTTP status and the offending parameter."""

from __future__ import annotations


class TokenmillError(Exception):
    """Base of tokenmill's own errors."""

    status_code = 500
    error_type = "internal_server_error"

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(TokenmillError):
    """The client sent something we cannot serve (HTTP 400)."""

    status_code = 400
    error_type = "BadRequestError"


class NotFoundError(TokenmillError):
    """The named resource (e.g. model) does not exist (HTTP 404)."""

    status_code = 404
    error_type = "NotFoundError"


class AuthenticationError(TokenmillError):
    """Missing or wrong API key (HTTP 401)."""

    status_code = 401
    error_type = "AuthenticationError"


class ServiceUnavailableError(TokenmillError):
    """The engine cannot take the request now (HTTP 503)."""

    status_code = 503
    error_type = "ServiceUnavailableError"


class OverloadedError(ServiceUnavailableError):
    """Too many requests are waiting; the client should retry later (HTTP 503 + Retry-After)."""

    def __init__(self, message: str, *, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestFailedError(TokenmillError):
    """Serving this one request failed inside the engine (a model or grammar error); the
    engine goes on serving the others (HTTP 500)."""

    status_code = 500
    error_type = "InternalServerError"


class ModelLoadError(TokenmillError):
    """A model could not be found or loaded; the message names the problem."""
