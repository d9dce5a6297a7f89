"""Chat templates: resolve --chat-template and render templates in a Jinja sandbox (as HF does)."""

from __future__ import annotations

import codecs
import json
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import InvalidRequestError
from tokenmill.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Variables the renderer sets itself; chat_template_kwargs may not replace them.
RESERVED_VARIABLES = frozenset(
    {"messages", "add_generation_prompt", "continue_final_message", "documents", "tools"}
)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
_JINJA_CHARS = "{}\n"  # a value with none of these is meant as a file path (vLLM's rule)
# Templates are untrusted code: a runaway one is stopped when it next emits output.
MAX_RENDER_SECONDS = 5.0
MAX_RENDER_CHARS = 20_000_000


def resolve_chat_template(value: str) -> str:
    """The text of a --chat-template value: a readable file's contents, else the template itself."""
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:
        if not any(c in value for c in _JINJA_CHARS):
            raise ValueError(
                f"--chat-template {value!r} looks like a file path but cannot be read: {exc}"
            ) from exc
    return codecs.decode(value, "unicode_escape")  # lets a shell pass "\n" as a newline


def no_template_error() -> InvalidRequestError:
    return InvalidRequestError(
        "this model has no chat template; pass --chat-template (a file or the template text) "
        "when starting the server, or chat_template in the request",
        param="messages",
    )


def render_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    *,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    documents: list[dict[str, Any]] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render with `chat_template` (text) if given, else the tokenizer's; no template is a 400."""
    template = chat_template or tokenizer.chat_template
    if template is None:
        raise no_template_error()
    return render_chat_template(
        template,
        messages,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        documents=documents,
        tools=tools,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        template_kwargs=chat_template_kwargs,
    )


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    documents: list[dict[str, Any]] | None = None,
    tools: list[dict[str, Any]] | None = None,
    bos_token: str | None = None,
    eos_token: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """Render a conversation to the prompt text; any template failure is a 400 with its message."""
    extra = dict(template_kwargs or {})
    clash = sorted(RESERVED_VARIABLES & extra.keys())
    if clash:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {', '.join(clash)}; use the request fields",
            param="chat_template_kwargs",
        )
    if continue_final_message:
        messages = _tag_final_message(messages)
    variables = {"bos_token": bos_token, "eos_token": eos_token, **extra}
    text = _render(
        template,
        messages=messages,
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        documents=documents,
        tools=tools,
        **variables,
    )
    return _cut_at_tag(text) if continue_final_message else text


def _render(template: str, **variables: Any) -> str:
    try:
        return _collect(compile_template(template).generate(**variables))
    except InvalidRequestError:
        raise
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(f"chat template error: {exc}", param="chat_template") from exc
    except Exception as exc:  # the template is untrusted code: whatever it raises is its fault
        raise InvalidRequestError(
            f"chat template error: {type(exc).__name__}: {exc}", param="chat_template"
        ) from exc


def _collect(pieces: Iterator[str]) -> str:
    """Collect the output, giving up on templates that run away (too slow or too long)."""
    deadline, size, parts = time.monotonic() + MAX_RENDER_SECONDS, 0, list[str]()
    for piece in pieces:
        parts.append(piece)
        size += len(piece)
        if size > MAX_RENDER_CHARS or time.monotonic() > deadline:
            raise InvalidRequestError(
                f"chat template error: output over {MAX_RENDER_CHARS} characters or "
                f"{MAX_RENDER_SECONDS} s",
                param="chat_template",
            )
    return "".join(parts)


@lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile once per distinct template text (the model's, the server's, recent per-request)."""
    try:
        return _environment().from_string(template)
    except jinja2.TemplateError as exc:
        raise InvalidRequestError(
            f"chat template syntax error: {exc}", param="chat_template"
        ) from exc


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; HF's does not, and templates expect HF's.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tag_final_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark the end of the final message so the rendered text can be cut right after it."""
    if not messages:
        raise InvalidRequestError("continue_final_message needs a message", param="messages")
    final = dict(messages[-1])
    if not isinstance(final.get("content"), str):
        raise InvalidRequestError(
            "continue_final_message is set but the final message has no text content",
            param="messages",
        )
    final["content"] = final["content"] + _CONTINUE_TAG
    return [*messages[:-1], final]


def _cut_at_tag(text: str) -> str:
    """Drop the final message's end-of-turn (and anything after), as transformers does."""
    tag = _CONTINUE_TAG.strip()
    if tag not in text:
        raise InvalidRequestError(
            "continue_final_message is set but the chat template drops the final message",
            param="continue_final_message",
        )
    location = text.rindex(tag)
    if text[location : location + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return text[:location]
    return text[:location].rstrip()  # the template trimmed the message's trailing space
