"""Chat templates: resolve --chat-template, build a conversation's template variables, and
render them in the sandbox (template_sandbox.py: templates are untrusted code)."""

from __future__ import annotations

import codecs
import logging
import re
from pathlib import Path
from typing import Any

import jinja2.defaults

from tokenmill.errors import InvalidRequestError
from tokenmill.tokenizer.template_sandbox import RenderBudget, render_sandboxed
from tokenmill.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_TEMPLATE_GLOBALS = frozenset({"raise_exception", "strftime_now"})  # HF's, added to Jinja's
# Names the renderer or the environment defines, and HF's own apply_chat_template options:
# chat_template_kwargs may not set them.
RESERVED_VARIABLES = (
    frozenset(
        "messages add_generation_prompt continue_final_message documents tools bos_token "
        "eos_token chat_template tokenize".split()
    )
    | frozenset(jinja2.defaults.DEFAULT_NAMESPACE)
    | _TEMPLATE_GLOBALS
)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
_JINJA_CHARS = "{}\n"  # a value with none of these is meant as a file path (vLLM's rule)


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
    budget: RenderBudget | None = None,
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
        budget=budget,
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
    budget: RenderBudget | None = None,
) -> str:
    """Render a conversation to the prompt text; any template failure is a 400 with its message."""
    extra = _checked_kwargs(template_kwargs)
    if continue_final_message:
        messages = _tag_final_message(messages)
    variables = {
        "bos_token": bos_token,
        "eos_token": eos_token,
        **extra,
        "messages": messages,
        "add_generation_prompt": add_generation_prompt and not continue_final_message,
        "documents": documents,
        "tools": tools,
    }
    text = render_sandboxed(template, variables, budget or RenderBudget())
    return _cut_at_tag(text) if continue_final_message else text


def _checked_kwargs(template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """chat_template_kwargs, which may add variables but not replace the renderer's own."""
    extra = dict(template_kwargs or {})
    clash = sorted(RESERVED_VARIABLES & extra.keys())
    if clash:
        raise InvalidRequestError(
            f"chat_template_kwargs may not set {', '.join(clash)}: reserved for the renderer "
            "(use the request fields)",
            param="chat_template_kwargs",
        )
    return extra


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


_READS_PARTS = re.compile(r"""for\s+\w+\s+in\s+\w+(\[\s*['"]content['"]\s*\]|\.content)""")


def template_reads_parts(template: str | None) -> bool:
    """Whether a chat template loops over a message's content parts (OpenAI's list form, as
    vision models' templates do) rather than printing it as one string."""
    return template is not None and _READS_PARTS.search(template) is not None
