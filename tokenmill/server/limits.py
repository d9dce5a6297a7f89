"""RequestLimits: the most one request may ask for, and the checks of a parsed request against it.

Every limit is checked before the work it bounds (copying n sequences, tokenizing, rendering,
compiling a grammar) and costs time linear in what the client already sent. A request over a
limit is a 400 naming the parameter, the limit and the value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import MAX_LOGPROBS, MAX_NUM_BAD_WORDS
from tokenmill.server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    Prompt,
    TokenizeChatRequest,
)
from tokenmill.structured.spec import MAX_JSON_SCHEMA_DEPTH, StructuredSpec
from tokenmill.tokenizer.template_sandbox import (
    MAX_RENDER_CHARS,
    MAX_RENDER_MEMORY_MIB,
    MAX_RENDER_SECONDS,
    RenderBudget,
)

AnyRequest = CompletionRequest | ChatCompletionRequest
ChatInputRequest = ChatCompletionRequest | TokenizeChatRequest


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Caps on one request, part of ServerSettings. Limits that the offline API enforces too
    take their defaults from the module that enforces them."""

    # -- choices and sampling ----------------------------------------------------------------
    max_n: int = 128  # n and best_of: sequences per prompt (OpenAI's own cap on n)
    max_logprobs: int = MAX_LOGPROBS  # logprobs, top_logprobs, prompt_logprobs (vLLM's: 20)
    max_stop: int = 64  # stop strings in one request
    max_stop_chars: int = 1024  # characters in one stop string
    max_stop_token_ids: int = 1024  # stop_token_ids entries
    # logit_bias entries; vLLM allows one per vocabulary token, but banning or boosting a few
    # thousand tokens covers real uses and keeps the per-step bias work small
    max_logit_bias: int = 2048
    max_allowed_token_ids: int | None = None  # allowed_token_ids entries; None = vocabulary size
    # bad_words entries, before tokenizing (each becomes one or two token sequences, and the
    # engine takes at most MAX_NUM_BAD_WORDS = 128 of those, as vLLM)
    max_bad_words: int = MAX_NUM_BAD_WORDS
    max_bad_word_chars: int = 1024  # characters in one bad word

    # -- structured outputs (what a grammar compiler is handed) ------------------------------
    max_json_schema_chars: int = 65_536  # a JSON schema, as compact JSON text
    max_json_schema_depth: int = MAX_JSON_SCHEMA_DEPTH  # objects/arrays nested in a schema: 64
    max_regex_chars: int = 16_384  # a guided regex
    max_grammar_chars: int = 65_536  # a guided grammar (GBNF/EBNF or Lark)
    max_choices: int = 1024  # guided_choice entries
    max_choices_chars: int = 65_536  # all guided_choice strings together

    # -- prompts and messages ----------------------------------------------------------------
    max_prompts: int = 1024  # prompts in one completions request (strings or token arrays)
    max_messages: int = 2048  # messages in one chat request
    # characters of text: all prompt strings of a completions request, or all message contents
    # and documents of a chat request (4 MiB; ~1M tokens, beyond any served context)
    max_input_chars: int = 4 * 1024 * 1024
    max_chat_template_chars: int = 262_144  # a request's own chat_template (real ones: < 20k)
    # tools in one chat request (OpenAI's cap); their JSON counts in max_input_chars, and each
    # parameters schema is held to max_json_schema_depth
    max_tools: int = 128
    max_images: int = 16  # image parts in one chat request (--limit-mm-per-prompt)

    # -- chat template rendering (templates are untrusted code) ------------------------------
    max_template_seconds: float = MAX_RENDER_SECONDS  # wall time of one render: 2 s
    max_template_chars: int = MAX_RENDER_CHARS  # rendered prompt characters: 8 MiB
    max_template_memory_mib: int = MAX_RENDER_MEMORY_MIB  # the renderer process's memory: 1 GiB

    @property
    def render_budget(self) -> RenderBudget:
        return RenderBudget(
            self.max_template_seconds, self.max_template_chars, self.max_template_memory_mib
        )


def check_sampling_limits(request: AnyRequest, limits: RequestLimits, vocab_size: int) -> None:
    """n, best_of, stop strings, bad words and the token-id lists; before anything is built
    from them."""
    _check_value("n", request.n, limits.max_n)
    if request.best_of is not None:
        _check_value("best_of", request.best_of, limits.max_n)
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    _check_count("stop", len(stop), limits.max_stop, "strings")
    for i, text in enumerate(stop):
        _check_count("stop", len(text), limits.max_stop_chars, "characters", f"stop[{i}]")
    num_stop_ids = len(request.stop_token_ids or [])
    _check_count("stop_token_ids", num_stop_ids, limits.max_stop_token_ids, "entries")
    _check_count("logit_bias", len(request.logit_bias or {}), limits.max_logit_bias, "entries")
    max_allowed = limits.max_allowed_token_ids or vocab_size
    num_allowed = len(request.allowed_token_ids or [])
    _check_count("allowed_token_ids", num_allowed, max_allowed, "entries")
    bad_words = request.bad_words or []
    _check_count("bad_words", len(bad_words), limits.max_bad_words, "words")
    for i, word in enumerate(bad_words):
        _check_count(
            "bad_words", len(word), limits.max_bad_word_chars, "characters", f"bad_words[{i}]"
        )


def check_structured_limits(spec: StructuredSpec | None, limits: RequestLimits) -> None:
    """The constraint's size, before a backend compiles it (its depth: spec_from_request_fields)."""
    if spec is None:
        return
    param = spec.param or "structured_outputs"
    if spec.kind == "choice":
        choices = spec.choices
        _check_count(param, len(choices), limits.max_choices, "choices")
        num_chars = sum(len(choice) for choice in choices)
        _check_count(param, num_chars, limits.max_choices_chars, "characters in all choices")
        return
    max_chars = {
        "json": limits.max_json_schema_chars,
        "regex": limits.max_regex_chars,
        "grammar": limits.max_grammar_chars,
    }.get(spec.kind)
    if max_chars is not None:
        noun = "characters (as compact JSON)" if spec.kind == "json" else "characters"
        _check_count(param, len(spec.value), max_chars, noun)


def check_prompt_limits(prompt: Prompt, limits: RequestLimits) -> None:
    """How many prompts a completions request holds, and how much text, before tokenizing."""
    if isinstance(prompt, str):
        _check_count("prompt", len(prompt), limits.max_input_chars, "characters")
        return
    if prompt and not isinstance(prompt[0], int):  # a list of strings or of token arrays
        _check_count("prompt", len(prompt), limits.max_prompts, "prompts")
    num_chars = sum(len(item) for item in prompt if isinstance(item, str))
    _check_count("prompt", num_chars, limits.max_input_chars, "characters of text")


def check_text_limits(texts: list[str], param: str, limits: RequestLimits) -> None:
    """How many texts a score or rerank request holds, and how much text, before tokenizing."""
    _check_count(param, len(texts), limits.max_prompts, "texts")
    _check_count(param, sum(len(t) for t in texts), limits.max_input_chars, "characters of text")


def check_chat_limits(request: ChatInputRequest, limits: RequestLimits) -> None:
    """Messages (count and text), documents and the request's own template, before rendering."""
    _check_count("messages", len(request.messages), limits.max_messages, "messages")
    num_chars = _message_chars(request.messages)
    num_chars += sum(len(d.text) + len(d.title or "") for d in request.documents or [])
    tools = getattr(request, "tools", None)
    if tools:
        _check_count("tools", len(tools), limits.max_tools, "tools")
        tool_chars = _json_chars(tools, limits.max_json_schema_depth + 4, "tools")
        _check_count("tools", tool_chars, limits.max_input_chars, "characters")
        num_chars += tool_chars
    _check_count("messages", num_chars, limits.max_input_chars, "characters of text")
    if request.chat_template is not None:
        _check_count(
            "chat_template",
            len(request.chat_template),
            limits.max_chat_template_chars,
            "characters",
        )


def _json_chars(value: object, max_depth: int, param: str) -> int:
    """Characters of the strings (keys too) in a parsed JSON value, walked with an explicit
    stack (a hostile nesting cannot exhaust it); a 400 beyond max_depth levels."""
    total = 0
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            total += len(item)
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > max_depth:
            raise InvalidRequestError(
                f"{param} is nested more than {max_depth} levels deep", param=param
            )
        if isinstance(item, dict):
            total += sum(len(str(k)) for k in item)
            stack.extend((v, depth + 1) for v in item.values())
        else:
            stack.extend((v, depth + 1) for v in item)
    return total


def _message_chars(messages: Sequence[ChatMessage]) -> int:
    total = 0
    for message in messages:
        content = message.content
        if isinstance(content, str):
            total += len(content)
        elif content is not None:
            total += sum(len(part.text or "") for part in content)
    return total


def _check_value(param: str, value: int, limit: int) -> None:
    if value > limit:
        raise InvalidRequestError(f"{param} must be <= {limit}; got {value}", param=param)


def _check_count(param: str, count: int, limit: int, noun: str, subject: str | None = None) -> None:
    if count > limit:
        raise InvalidRequestError(
            f"{subject or param} may have at most {limit} {noun}; got {count}", param=param
        )
