"""A Chat Completions request's `tools`, `tool_choice` and `parallel_tool_calls`, checked once:
what the chat template is given, and the constraint that keeps the model's calls valid."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.structured.spec import MAX_JSON_SCHEMA_DEPTH, StructuredSpec, check_schema_depth
from tokenmill.tools.formats import ToolCallFormat, ToolChoiceMode, generic_system_prompt

_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")  # OpenAI's function names (and dots, as vLLM)
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}
_FUNCTION_KEYS = {"name", "description", "parameters", "strict"}


@dataclass(frozen=True, slots=True)
class ToolUse:
    """The tools of one request and how the output may use them.

    mode None: tool_choice "none" (the template sees the tools; the output is plain text).
    """

    tools: list[dict[str, Any]]  # as sent: {"type": "function", "function": {...}}
    functions: list[dict[str, Any]]  # name, description, parameters (a schema object)
    mode: ToolChoiceMode | None
    parallel: bool
    fmt: ToolCallFormat

    @property
    def parses_calls(self) -> bool:
        return self.mode is not None

    def constraint(self) -> StructuredSpec | None:
        """The structural tag the output must follow (None: tool_choice none)."""
        if self.mode is None:
            return None
        functions = self.functions
        if self.mode == "named":
            functions = functions[:1]
        value = self.fmt.structural_tag(functions, self.mode, self.parallel)
        return StructuredSpec(kind="structural_tag", value=value, backend="xgrammar", param="tools")

    def template_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as the template gets it: earlier calls' arguments as objects (as
        transformers' templates expect); for a template without tool support, the tools in a
        system message and earlier calls written in the format the model is asked to use."""
        result = [_with_parsed_arguments(m) for m in messages]
        if not self.fmt.generic:
            return result
        result = [self._calls_as_text(m) for m in result]
        prompt = generic_system_prompt(self.functions, self.fmt)
        if result and result[0]["role"] == "system":
            first = dict(result[0])
            first["content"] = _with_text(first.get("content"), prompt, "\n\n")
            return [first, *result[1:]]
        # a vision model's template takes content as parts (its messages say so)
        as_parts = any(isinstance(m.get("content"), list) for m in result)
        content = [{"type": "text", "text": prompt}] if as_parts else prompt
        return [{"role": "system", "content": content}, *result]

    def template_tools(self) -> list[dict[str, Any]] | None:
        """`tools` for the template (None for a template that renders none)."""
        return None if self.fmt.generic else self.tools

    def _calls_as_text(self, message: dict[str, Any]) -> dict[str, Any]:
        calls = message.get("tool_calls")
        if not calls:
            return message
        texts = [
            self.fmt.call_text(
                c["function"]["name"],
                json.dumps(c["function"].get("arguments", {}), ensure_ascii=False),
            )
            for c in calls
        ]
        result = {k: v for k, v in message.items() if k != "tool_calls"}
        result["content"] = _with_text(message.get("content"), "\n".join(texts), "\n")
        return result


def _with_text(content: str | list[dict[str, Any]] | None, text: str, sep: str) -> Any:
    """A message's content with `text` after it: joined by `sep`, or as one more text part
    where the content is a list of parts (a vision model's template)."""
    if isinstance(content, list):
        return [*content, {"type": "text", "text": text}]
    return sep.join(filter(None, [content or "", text]))


def tool_use(
    tools: list[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel_tool_calls: bool | None,
    fmt: ToolCallFormat,
    max_tools: int,
) -> ToolUse | None:
    """The request's tools checked (400 naming what is wrong), or None without tools. An
    empty list with tool_choice "auto" or "required" is no tools, as OpenAI and vLLM take
    it; tool_choice without any tools list is a 400."""
    if not tools:
        allowed = (None, "none") if tools is None else (None, "none", "auto", "required")
        if tool_choice not in allowed:
            raise InvalidRequestError(
                "tool_choice is only allowed when tools are given", param="tool_choice"
            )
        return None
    if len(tools) > max_tools:
        raise InvalidRequestError(
            f"at most {max_tools} tools may be given; got {len(tools)}", param="tools"
        )
    functions = [_function(tool, i) for i, tool in enumerate(tools)]
    names = [f["name"] for f in functions]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidRequestError(
            f"tool names must be unique; repeated: {duplicates}", param="tools"
        )
    mode: ToolChoiceMode | None
    if tool_choice is None or tool_choice == "auto":
        mode = "auto"
    elif tool_choice == "none":
        mode = None
    elif tool_choice == "required":
        mode = "required"
    else:
        wanted = _named_choice(tool_choice)
        if wanted not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {wanted!r}, which is not in tools {names}",
                param="tool_choice",
            )
        functions = [functions[names.index(wanted)]]
        mode = "named"
    parallel = True if parallel_tool_calls is None else bool(parallel_tool_calls)
    return ToolUse(tools, functions, mode, parallel, fmt)


def _function(tool: Any, index: int) -> dict[str, Any]:
    param = f"tools.{index}"
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise InvalidRequestError(
            f"{param}: only function tools are supported ({{'type': 'function', ...}})",
            param=param,
        )
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidRequestError(f"{param}.function must be an object", param=f"{param}.function")
    unknown = set(function) - _FUNCTION_KEYS
    if unknown:
        raise InvalidRequestError(
            f"{param}.function has unknown keys {sorted(unknown)}", param=f"{param}.function"
        )
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"{param}.function.name must be 1 to 64 letters, digits, '_', '-' or '.'; got {name!r}",
            param=f"{param}.function.name",
        )
    parameters = function.get("parameters")
    if parameters is None:
        parameters = _EMPTY_PARAMETERS
    if not isinstance(parameters, dict):
        raise InvalidRequestError(
            f"{param}.function.parameters must be a JSON schema object",
            param=f"{param}.function.parameters",
        )
    check_schema_depth(parameters, f"{param}.function.parameters", MAX_JSON_SCHEMA_DEPTH)
    result = {"name": name, "parameters": parameters}
    if function.get("description") is not None:
        result["description"] = function["description"]
    return result


def _named_choice(tool_choice: Any) -> str:
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return function["name"]
    raise InvalidRequestError(
        "tool_choice must be 'none', 'auto', 'required' or "
        "{'type': 'function', 'function': {'name': ...}}",
        param="tool_choice",
    )


def _with_parsed_arguments(message: dict[str, Any]) -> dict[str, Any]:
    """An assistant message's tool_calls with arguments as objects (OpenAI sends JSON text)."""
    calls = message.get("tool_calls")
    if not calls:
        return message
    parsed = []
    for call in calls:
        function = dict(call.get("function") or {})
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                function["arguments"] = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as exc:
                raise InvalidRequestError(
                    f"a tool call's arguments are not valid JSON: {exc}", param="messages"
                ) from None
        parsed.append({**call, "function": function})
    return {**message, "tool_calls": parsed}
