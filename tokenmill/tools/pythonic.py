"""The pythonic tool-call syntax (Llama 3.2 / Llama 4 pythonic templates, vLLM's `pythonic`
parser): a list of calls with keyword arguments as Python literals,
`[get_weather(city="Paris", days=3), get_time(zone="CET")]`.

The constraint is an xgrammar structural tag whose calls are EBNF generated here from each
tool's JSON schema (a subset: string, integer, number, boolean, null, enum, const, arrays
with items, objects with properties; other schemas take any Python literal). Arguments are
returned as JSON, converted from the literals once a call is complete, so a call's arguments
arrive whole in one delta (still a prefix-stable split: see parser.py).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from tokenmill.tools.output import (
    BracketScan,
    ParsedCall,
    ParsedOutput,
    closing_bracket,
    partial_suffix,
)

_CALL_START = re.compile(r"\[([A-Za-z_][A-Za-z0-9_.\-]*)\(")
_CALL = re.compile(r"([A-Za-z_][A-Za-z0-9_.\-]*)\(")

_LITERALS = r"""
py_value ::= py_string | py_number | py_bool | py_none | py_list | py_dict
py_string ::= "\"" py_char* "\""
py_char ::= [^"\\\n] | "\\" ["\\/bfnrt]
py_int ::= "-"? ("0" | [1-9] [0-9]*)
py_number ::= py_int ("." [0-9]+)? ([eE] [+\-]? [0-9]+)?
py_bool ::= "True" | "False"
py_none ::= "None"
py_list ::= "[" (py_value (", " py_value)*)? "]"
py_dict ::= "{" (py_string ": " py_value (", " py_string ": " py_value)*)? "}"
"""


def structural_tag(tools: list[dict[str, Any]], mode: str, parallel: bool) -> str:
    """The tag for `tools` (each {"name", "parameters"}) in a tool_choice mode (see
    formats.ToolCallFormat.structural_tag)."""
    rules: list[str] = [_LITERALS]
    call_rules = []
    for i, tool in enumerate(tools):
        rules += _schema_rules(f"t{i}", tool["parameters"])
        call_rules.append(f'"{tool["name"]}(" t{i}_args ")"')
    rules.append("call ::= " + " | ".join(call_rules))
    more = ' (", " call)*' if parallel else ""
    grammar_rules = "\n".join(rules)
    if mode in ("required", "named"):
        grammar = f'root ::= "[" call{more} "]"\n{grammar_rules}'
        fmt: dict[str, Any] = {"type": "grammar", "grammar": grammar}
    else:  # auto: a call list starts with "[name(", then its arguments are held
        tags = [
            {
                "type": "tag",
                "begin": f"[{tool['name']}(",
                "content": {
                    "type": "grammar",
                    "grammar": f'root ::= t{i}_args ")"{more}\n{grammar_rules}',
                },
                "end": "]",
            }
            for i, tool in enumerate(tools)
        ]
        fmt = {"type": "triggered_tags", "triggers": [t["begin"] for t in tags], "tags": tags,
               "at_least_one": False, "stop_after_first": not parallel}  # fmt: skip
    return json.dumps({"type": "structural_tag", "format": fmt}, ensure_ascii=False)


def _schema_rules(prefix: str, schema: dict[str, Any]) -> list[str]:
    """EBNF rules: `{prefix}_args` (the keyword arguments of an object schema) and the value
    rules they use."""
    rules: list[str] = []
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or [])
    names = list(properties)
    items = []
    for j, name in enumerate(names):
        value = _value_rule(f"{prefix}_p{j}", properties[name], rules)
        items.append(f"{json.dumps(name + '=')} {value}")
    # S_j: nothing written yet from property j on; T_j: something written before
    n = len(names)
    rules.append(f'{prefix}_s{n} ::= ""')
    rules.append(f'{prefix}_t{n} ::= ""')
    for j in range(n - 1, -1, -1):
        first = f"{items[j]} {prefix}_t{j + 1}"
        later = f'", " {items[j]} {prefix}_t{j + 1}'
        if names[j] in required:
            rules.append(f"{prefix}_s{j} ::= {first}")
            rules.append(f"{prefix}_t{j} ::= {later}")
        else:
            rules.append(f"{prefix}_s{j} ::= {first} | {prefix}_s{j + 1}")
            rules.append(f"{prefix}_t{j} ::= {later} | {prefix}_t{j + 1}")
    rules.append(f"{prefix}_args ::= {prefix}_s0")
    return rules


def _value_rule(name: str, schema: Any, rules: list[str]) -> str:
    """The rule (or literal) for one value of `schema`; adds the rules it needs."""
    if not isinstance(schema, dict):
        return "py_value"
    if "const" in schema:
        return _literal(schema["const"])
    if "enum" in schema:
        rules.append(f"{name} ::= " + " | ".join(_literal(v) for v in schema["enum"]))
        return name
    kind = schema.get("type")
    simple = {"string": "py_string", "integer": "py_int", "number": "py_number",
              "boolean": "py_bool", "null": "py_none"}  # fmt: skip
    if isinstance(kind, str) and kind in simple:
        return simple[kind]
    if kind == "array":
        item = _value_rule(f"{name}_i", schema.get("items"), rules)
        rules.append(f'{name} ::= "[" ({item} (", " {item})*)? "]"')
        return name
    if kind == "object" and schema.get("properties"):
        fields = []
        for k, (key, sub) in enumerate(schema["properties"].items()):
            fields.append(
                f'{json.dumps(json.dumps(key))} ": " {_value_rule(f"{name}_f{k}", sub, rules)}'
            )
        rules.append(
            f'{name} ::= "{{" ({" | ".join(fields)}) (", " ({" | ".join(fields)}))* "}}" | "{{}}"'
        )
        return name
    return "py_value"


def _literal(value: Any) -> str:
    """An EBNF string matching `value` written as a Python literal."""
    if value is True or value is False or value is None:
        text = repr(value)
    else:
        text = json.dumps(value, ensure_ascii=False)  # strings double-quoted, numbers as JSON
    return json.dumps(text)


def parse(text: str, final: bool, scans: dict[int, BracketScan] | None = None) -> ParsedOutput:
    """Content and calls of `text`: call lists `[name(...), ...]` where a call starts; each
    call whole (its arguments as JSON) once its closing parenthesis arrives."""
    out = ParsedOutput("")
    pos = 0
    while True:
        match = _CALL_START.search(text, pos)
        if match is None:
            tail = text[pos:]
            out.content += tail if final else tail[: len(tail) - _held(tail)]
            return out
        out.content += text[pos : match.start()]
        end = _parse_list(text, match.start(), out.calls, scans)
        if end is None:
            return out
        if end < 0:  # not a call list after all: its bracket is text
            out.content += "["
            pos = match.start() + 1
            continue
        pos = end
        out.settle(pos)


def _held(tail: str) -> int:
    """How much of the end of `tail` may be the start of a call list still arriving."""
    start = tail.rfind("[")
    if start >= 0 and re.fullmatch(r"\[[A-Za-z0-9_.\-]*", tail[start:]):
        return len(tail) - start
    return partial_suffix(tail, "[")


def _parse_list(
    text: str, start: int, calls: list[ParsedCall], scans: dict[int, BracketScan] | None
) -> int | None:
    """Parse the call list at text[start] ("["); appends its complete calls (and a started
    one, by name). Returns its end, None when the text ends inside it, -1 if it is not one."""
    pos = start + 1
    while True:
        match = _CALL.match(text, pos)
        if match is None:
            rest = text[pos:]
            return None if re.fullmatch(r"[A-Za-z0-9_.\-]*", rest) else -1
        close = closing_bracket(text, match.end(), depth=1, scans=scans)
        if close is None:
            calls.append(ParsedCall(match.group(1)))
            return None
        arguments = _arguments_json(text[match.start() : close + 1])
        if arguments is None:
            return -1
        calls.append(ParsedCall(match.group(1), arguments))
        pos = close + 1
        if text.startswith(", ", pos):
            pos += 2
        elif text.startswith("]", pos):
            return pos + 1
        elif len(text) - pos < 2 and ", ".startswith(text[pos:]):
            return None
        else:
            calls.pop()
            return -1


def _arguments_json(call: str) -> str | None:
    """`name(k=v, ...)` -> '{"k": v, ...}', None if it is not a call of literals."""
    try:
        node = ast.parse(call, mode="eval").body
        if not isinstance(node, ast.Call) or node.args:
            return None
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg}
        return json.dumps(kwargs, ensure_ascii=False)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None


def call_text(name: str, arguments: str) -> str:
    """A call as this syntax writes it (arguments: a JSON object)."""
    values = json.loads(arguments) if arguments.strip() else {}
    kwargs = ", ".join(f"{key}={_python(value)}" for key, value in values.items())
    return f"[{name}({kwargs})]"


def _python(value: Any) -> str:
    if value is True or value is False or value is None:
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_python(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_python(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)
