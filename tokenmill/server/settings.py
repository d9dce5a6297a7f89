"""ServerSettings: the HTTP server's own options (the engine's live in EngineConfig).

The command line imports this module to build its parser: it stays free of heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenmill.multimodal.media import MediaPolicy
    from tokenmill.server.limits import RequestLimits

DEFAULT_MAX_REQUEST_BODY_BYTES = 32 * 2**20  # far above any sane chat request


def _default_limits() -> RequestLimits:
    from tokenmill.server.limits import RequestLimits  # imports torch (via structured)

    return RequestLimits()


def _default_media() -> MediaPolicy:
    from tokenmill.multimodal.media import MediaPolicy  # imports Pillow and httpx

    return MediaPolicy()


def default_served_model_names(model: str) -> list[str]:
    """The names a model is served under without --served-model-name: `model` as given (vLLM
    uses it as is), except that a .gguf file is served as its file name without the suffix,
    with the path as given kept as an alias (clients may send either)."""
    path = PurePath(model)
    if path.suffix.lower() == ".gguf" and path.stem:
        return [path.stem, model] if path.stem != model else [model]
    return [model]


@dataclass(slots=True)
class ServerSettings:
    """The server's own options, built once by the command line (or a test)."""

    served_model_names: list[str]  # names clients may send as `model`; the first is the default
    # required as a Bearer token on /v1/* when set; several (vLLM's --api-key A B): any of them
    api_key: str | list[str] | None = None
    allowed_origins: list[str] | None = None  # CORS; None = no CORS headers at all
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    disable_log_requests: bool = False
    # the periodic stats line's interval (server/stats_log.py); None: no stats line
    log_stats_interval_s: float | None = None
    address: str = ""  # where the server listens, for the ready line
    # caps on one request (each over-cap value is a 400)
    limits: RequestLimits = field(default_factory=_default_limits)
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES  # larger bodies get a 413
    request_id_headers: bool = False  # echo X-Request-Id (or a new one) on every response
    docs: bool = True  # FastAPI's /docs, /redoc and /openapi.json
    playground: bool = True  # the chat page at / (tokenmill/server/playground/)
    prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens
    force_include_usage: bool = False  # every stream ends with usage (stream_options or not)
    # under every request's chat_template_kwargs (--default-chat-template-kwargs)
    default_chat_template_kwargs: dict[str, Any] | None = None
    # logprobs name tokens "token_id:{id}" unless a request says otherwise (vLLM's flag)
    return_tokens_as_token_ids: bool = False
    # the tool-call syntax (tokenmill/tools/formats.py; vLLM's --tool-call-parser names);
    # None = found from the chat template
    tool_call_parser: str | None = None
    # what a request's image URLs may do (http(s) only to --allowed-media-domains)
    media: MediaPolicy = field(default_factory=_default_media)

    @property
    def api_keys(self) -> tuple[str, ...]:
        """The keys a client may send; () = no auth."""
        if self.api_key is None:
            return ()
        return (self.api_key,) if isinstance(self.api_key, str) else tuple(self.api_key)
