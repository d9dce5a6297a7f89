"""Tool-call formats: how a model family writes a call, found from its chat template, and the
structural tag (xgrammar's) that keeps every call it starts a valid call of a given tool.

Each format writes one call as the literal `begin` + tool name + `middle` + the arguments
(a JSON object matching the tool's parameters) + `end`; text outside calls is free. Because
the constraint makes the model write exactly that, parsing (parser.py) is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from tokenmill.tools import pythonic

ToolChoiceMode = Literal["auto", "required", "named"]
MAX_WHITESPACE = 16  # whitespace characters between two JSON tokens of a call's arguments


@dataclass(frozen=True, slots=True)
class ToolCallFormat:
    """One family's call syntax (named as vLLM's --tool-call-parser values)."""

    name: str
    trigger: str  # the text that starts a call (the structural tag's trigger)
    begin: str  # a call, up to its tool name
    middle: str  # between the name and the arguments object
    end: str  # after the arguments object
    generic: bool = False  # for templates without tool support: tools described in a system message
    pythonic: bool = False  # calls as Python (pythonic.py); begin/middle/end unused

    def call_text(self, name: str, arguments: str) -> str:
        """How this format writes a call (for earlier calls in the conversation, when the
        template cannot render tool_calls itself)."""
        if self.pythonic:
            return pythonic.call_text(name, arguments)
        return f"{self.begin}{name}{self.middle}{arguments}{self.end}"

    def structural_tag(
        self, tools: list[dict[str, Any]], mode: ToolChoiceMode, parallel: bool
    ) -> str:
        """xgrammar's structural tag (as JSON text): in auto mode free text until the trigger,
        then a call of one of `tools`; required: calls only, at least one; named: exactly one
        call of the one tool given. `parallel` False: at most one call."""
        if self.pythonic:
            return pythonic.structural_tag(tools[:1] if mode == "named" else tools, mode, parallel)
        tags = [
            {
                "type": "tag",
                "begin": self.begin + tool["name"] + self.middle,
                "content": {
                    "type": "json_schema",
                    "json_schema": tool["parameters"],
                    # JSON's free whitespace, capped per gap: a model cannot pad a call forever
                    "max_whitespace_cnt": MAX_WHITESPACE,
                },
                "end": self.end,
            }
            for tool in tools
        ]
        fmt: dict[str, Any]
        if mode == "named":
            fmt = tags[0]
        elif mode == "required":  # calls only: the first at once, the others after newlines
            fmt = {"type": "tags_with_separator", "tags": tags, "separator": "\n",
                   "at_least_one": True, "stop_after_first": not parallel}  # fmt: skip
        else:
            fmt = {"type": "triggered_tags", "triggers": [self.trigger], "tags": tags,
                   "at_least_one": False, "stop_after_first": not parallel}  # fmt: skip
        return json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)


HERMES = ToolCallFormat(
    name="hermes",
    trigger="<tool_call>",
    begin='<tool_call>\n{"name": "',
    middle='", "arguments": ',
    end="}\n</tool_call>",
)
LLAMA3_JSON = ToolCallFormat(
    name="llama3_json",
    trigger='{"name": ',
    begin='{"name": "',
    middle='", "parameters": ',
    end="}",
)
MISTRAL = ToolCallFormat(
    name="mistral",
    trigger="[TOOL_CALLS]",
    begin='[TOOL_CALLS][{"name": "',
    middle='", "arguments": ',
    end="}]",
)
# templates without tool support: the Hermes syntax, taught by a system message
GENERIC = ToolCallFormat(
    name="generic",
    trigger=HERMES.trigger,
    begin=HERMES.begin,
    middle=HERMES.middle,
    end=HERMES.end,
    generic=True,
)

PYTHONIC = ToolCallFormat(
    name="pythonic", trigger="[", begin="[", middle="(", end=")]", pythonic=True
)

FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL, PYTHONIC, GENERIC)}
# vLLM's --tool-call-parser names that write one of these syntaxes
PARSER_ALIASES = {"llama4_json": "llama3_json", "llama4_pythonic": "pythonic"}


def format_named(name: str) -> ToolCallFormat:
    """The format of a --tool-call-parser value; ValueError naming the known ones."""
    key = PARSER_ALIASES.get(name, name)
    if key not in FORMATS:
        raise ValueError(
            f"unknown tool-call parser {name!r}; tokenmill knows {', '.join(sorted(FORMATS))}"
        )
    return FORMATS[key]


def detect_format(template: str | None) -> ToolCallFormat:
    """The tool-call syntax a chat template teaches its model: GENERIC when it renders no tools
    (they are described in a system message), Hermes when it renders them in a syntax not
    recognised here."""
    if not template or "tools" not in template:
        return GENERIC
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "[func_name1(" in template:  # Llama 3.2 / 4 pythonic templates spell out the syntax
        return PYTHONIC
    if "<|python_tag|>" in template or ('"parameters"' in template and "ipython" in template):
        return LLAMA3_JSON
    return HERMES  # it renders the tools its own way; the commonest call syntax


def generic_system_prompt(tools: list[dict[str, Any]], fmt: ToolCallFormat) -> str:
    """What a template without tool support is told about the tools (as a system message)."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    example = fmt.call_text("<function-name>", "<arguments-json-object>")
    return (
        "You can call the following functions. To call one, reply with\n"
        f"{example}\n"
        "and nothing else for that call.\n\n"
        f"Functions:\n{listing}"
    )
