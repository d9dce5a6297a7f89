"""Backend-neutral constraint helpers: schema checks, choice and JSON regexes, grammar dialects."""

from __future__ import annotations

import json
import re
from typing import Any

from tokenmill.errors import InvalidRequestError
from tokenmill.structured.spec import StructuredSpec

OBJECT_SCHEMA = '{"type":"object"}'  # json_object: any JSON object
_DEFAULT_PARAMS = {
    "json": "guided_json",
    "regex": "guided_regex",
    "choice": "guided_choice",
    "grammar": "guided_grammar",
    "json_object": "response_format",
}
_REGEX_META = frozenset("\\.^$*+?()[]{}|")
_EBNF_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_EBNF_RULE = re.compile(r"^\s*[A-Za-z_][\w.-]*\s*::=", re.MULTILINE)
# xgrammar prefixes C++ errors with "[12:34:56] /path/file.cc:123: "
_CPP_LOCATION = re.compile(r"^\[[\d:]+\]\s+\S+:\d+:\s*")


def param_of(spec: StructuredSpec) -> str:
    """The request field an error about `spec` should name."""
    return spec.param or _DEFAULT_PARAMS[spec.kind]


def invalid(spec: StructuredSpec, problem: str) -> InvalidRequestError:
    """A 400 naming the request field of `spec`."""
    return InvalidRequestError(f"{param_of(spec)}: {problem}", param=param_of(spec))


def compiler_message(exc: BaseException) -> str:
    """A compiler's error text without C++ source locations or trailing whitespace."""
    return _CPP_LOCATION.sub("", str(exc).strip()).strip() or type(exc).__name__


def schema_text(spec: StructuredSpec) -> str:
    """The JSON schema of a json or json_object spec, checked against its meta-schema."""
    if spec.kind == "json_object":
        return OBJECT_SCHEMA
    check_json_schema(spec)
    return spec.value


def check_json_schema(spec: StructuredSpec) -> dict[str, Any]:
    """The schema as a dict; a 400 carrying jsonschema's message if it is not a valid schema."""
    import jsonschema

    schema = json.loads(spec.value)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        path = "/".join(str(part) for part in exc.path)
        where = f" at {path}" if path else ""
        raise invalid(spec, f"invalid JSON schema{where}: {exc.message}") from exc
    return dict(schema)


def regex_escape(text: str) -> str:
    """`text` as a regex matching exactly it (escapes only metacharacters: portable to Rust)."""
    return "".join("\\" + char if char in _REGEX_META else char for char in text)


def choice_regex(spec: StructuredSpec) -> str:
    """A regex matching exactly one of the choices."""
    return "(" + "|".join(regex_escape(choice) for choice in spec.choices) + ")"


def ebnf_literal(text: str) -> str:
    """`text` as a quoted GBNF/EBNF string literal."""
    body = "".join(
        _EBNF_ESCAPES.get(char, f"\\x{ord(char):02x}" if ord(char) < 0x20 else char)
        for char in text
    )
    return f'"{body}"'


def choice_ebnf(spec: StructuredSpec) -> str:
    """A GBNF grammar matching exactly one of the choices."""
    return "root ::= " + " | ".join(ebnf_literal(choice) for choice in spec.choices)


def is_ebnf(grammar: str) -> bool:
    """GBNF/EBNF (`name ::= ...` rules) rather than Lark (`name: ...` rules)."""
    return _EBNF_RULE.search(grammar) is not None


def strip_anchors(regex: str) -> str:
    """Drop a leading ^ and trailing $: the whole output must match anyway."""
    if regex.startswith("^"):
        regex = regex[1:]
    if regex.endswith("$"):
        body = regex[:-1]
        if (len(body) - len(body.rstrip("\\"))) % 2 == 0:  # the $ is not escaped
            regex = body
    return regex


def regex_problem(regex: str, backend_message: str) -> str:
    """The clearest explanation of a rejected regex: Python's syntax error if it has one."""
    try:
        re.compile(regex)
    except re.error as exc:
        return f"invalid regex: {exc}"
    return f"unsupported regex: {backend_message}"
