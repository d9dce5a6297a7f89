"""StructuredSpec: one request's output constraint, parsed once from any of the accepted spellings."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenmill.errors import InvalidRequestError

# structural_tag: xgrammar's (JSON text); tool calls use it (tokenmill/tools)
StructuredKind = Literal["json", "regex", "choice", "grammar", "json_object", "structural_tag"]
_Constraint = tuple[str, StructuredKind, Any]  # (request field, kind, raw value)

# vLLM's spellings of backend names -> ours; "auto" means the server default
_BACKEND_ALIASES = {"lm_format_enforcer": "lm-format-enforcer", "auto": ""}
# vLLM v0 accepted "name:option,option"; these are the options with a meaning here
_NO_FALLBACK = "no-fallback"  # we never fall back to another backend: a no-op
_DISABLE_ANY_WHITESPACE = "disable-any-whitespace"  # compact JSON: whitespace_pattern ""
# current vLLM's `structured_outputs` keys that select a constraint, with their kind
_STRUCTURED_OUTPUTS_KINDS: dict[str, StructuredKind] = {
    "json": "json",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
    "json_object": "json_object",
}
# keys of `structured_outputs` that tune the constraint or that we accept as no-ops when unset
_STRUCTURED_OUTPUTS_OPTIONS = {"whitespace_pattern", "disable_any_whitespace", "disable_fallback"}
_STRUCTURED_OUTPUTS_UNSUPPORTED = {"disable_additional_properties", "structural_tag"}
# Objects and arrays nested in a JSON schema; checked before anything recursive (json.dumps,
# a backend's compiler) walks it. Real schemas stay well under a dozen levels.
MAX_JSON_SCHEMA_DEPTH = 64


@dataclass(frozen=True, slots=True)
class StructuredSpec:
    """What the output of one request must match, in a canonical text form.

    `value` is: for json, the JSON schema as compact JSON text (key order kept: backends emit
    properties in schema order); for regex, the pattern; for choice, the choices as a JSON list;
    for grammar, the grammar text (GBNF/EBNF `root ::= ...`, or Lark with a `start` rule);
    for json_object, "" (any JSON object).
    """

    kind: StructuredKind
    value: str
    whitespace_pattern: str | None = None  # JSON kinds only; None = the backend's default
    backend: str | None = None  # None = the server's default backend
    param: str | None = field(default=None, compare=False)  # request field, for error messages

    @property
    def choices(self) -> list[str]:
        """The choices of a `choice` spec."""
        return list(json.loads(self.value)) if self.kind == "choice" else []


def spec_from_request_fields(
    *,
    guided_json: Any = None,
    guided_regex: Any = None,
    guided_choice: Any = None,
    guided_grammar: Any = None,
    guided_whitespace_pattern: Any = None,
    guided_decoding_backend: Any = None,
    response_format: Any = None,
    structured_outputs: Any = None,
    max_json_depth: int = MAX_JSON_SCHEMA_DEPTH,
) -> StructuredSpec | None:
    """The one constraint a request asks for, or None; InvalidRequestError (400) for bad input.

    Accepts vLLM's `guided_*` extras, OpenAI's `response_format` and current vLLM's
    `structured_outputs` dict; more than one constraint in one request is a 400 naming them.
    A JSON schema nested deeper than max_json_depth is a 400 too.
    """
    guided: list[_Constraint] = [
        ("guided_json", "json", guided_json),
        ("guided_regex", "regex", guided_regex),
        ("guided_choice", "choice", guided_choice),
        ("guided_grammar", "grammar", guided_grammar),
    ]
    found = [constraint for constraint in guided if constraint[2] is not None]
    found += _response_format_constraints(response_format)
    options = _as_dict(structured_outputs, "structured_outputs")
    found += _structured_outputs_constraints(options)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(param for param, _, _ in found)
        raise InvalidRequestError(
            f"only one structured-output constraint may be given per request; got {names}",
            param=found[1][0],
        )
    param, kind, raw = found[0]
    backend, backend_whitespace = _parse_backend(guided_decoding_backend)
    whitespace = _whitespace_pattern(guided_whitespace_pattern, options, backend_whitespace)
    return StructuredSpec(
        kind=kind,
        value=_canonical_value(kind, raw, param, max_json_depth),
        whitespace_pattern=whitespace if kind in ("json", "json_object") else None,
        backend=backend,
        param=param,
    )


def _as_dict(obj: Any, param: str) -> dict[str, Any] | None:
    """A request sub-object as a plain dict (pydantic models dumped by alias), or None."""
    if obj is None:
        return None
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(by_alias=True, exclude_none=True)
    if not isinstance(obj, Mapping):
        raise InvalidRequestError(f"{param} must be an object", param=param)
    return dict(obj)


def _response_format_constraints(response_format: Any) -> list[_Constraint]:
    """OpenAI's response_format: text (none), json_object, or json_schema {name, schema, strict}."""
    fmt = _as_dict(response_format, "response_format")
    if fmt is None or fmt.get("type") == "text":
        return []
    if fmt.get("type") == "json_object":
        return [("response_format", "json_object", "")]
    if fmt.get("type") != "json_schema":
        raise InvalidRequestError(
            "response_format.type must be one of 'text', 'json_object', 'json_schema'; "
            f"got {fmt.get('type')!r}",
            param="response_format.type",
        )
    json_schema = _as_dict(fmt.get("json_schema"), "response_format.json_schema")
    if json_schema is None:
        raise InvalidRequestError(
            "response_format of type 'json_schema' needs a 'json_schema' object",
            param="response_format.json_schema",
        )
    schema = json_schema.get("schema", json_schema.get("schema_"))
    if schema is None:  # OpenAI makes `schema` optional: then any JSON object
        return [("response_format.json_schema", "json_object", "")]
    return [("response_format.json_schema.schema", "json", schema)]


def _structured_outputs_constraints(
    options: dict[str, Any] | None,
) -> list[_Constraint]:
    """Current vLLM's `structured_outputs: {"json" | "regex" | "choice" | "grammar": ...}`."""
    if options is None:
        return []
    known = set(_STRUCTURED_OUTPUTS_KINDS) | _STRUCTURED_OUTPUTS_OPTIONS
    for key, raw in options.items():
        if key in _STRUCTURED_OUTPUTS_UNSUPPORTED and raw not in (None, False):
            raise InvalidRequestError(
                f"structured_outputs.{key} is not supported", param=f"structured_outputs.{key}"
            )
        if key not in known | _STRUCTURED_OUTPUTS_UNSUPPORTED:
            raise InvalidRequestError(
                f"unknown key structured_outputs.{key}; expected one of {sorted(known)}",
                param=f"structured_outputs.{key}",
            )
    return [
        (f"structured_outputs.{key}", kind, "" if kind == "json_object" else options[key])
        for key, kind in _STRUCTURED_OUTPUTS_KINDS.items()
        if options.get(key) not in (None, False)
    ]


def _parse_backend(raw: Any) -> tuple[str | None, str | None]:
    """(backend name or None for the default, whitespace pattern implied by its options)."""
    if raw is None:
        return None, None
    if not isinstance(raw, str):
        raise InvalidRequestError(
            "guided_decoding_backend must be a string", param="guided_decoding_backend"
        )
    name, _, option_text = raw.strip().lower().partition(":")
    name = _BACKEND_ALIASES.get(name, name)
    whitespace = None
    for option in filter(None, (o.strip() for o in option_text.split(","))):
        if option == _DISABLE_ANY_WHITESPACE:
            whitespace = ""
        elif option != _NO_FALLBACK:
            raise InvalidRequestError(
                f"unknown guided_decoding_backend option {option!r}; supported: "
                f"{_NO_FALLBACK!r}, {_DISABLE_ANY_WHITESPACE!r}",
                param="guided_decoding_backend",
            )
    return name or None, whitespace


def _whitespace_pattern(
    guided: Any, options: dict[str, Any] | None, from_backend: str | None
) -> str | None:
    """The one whitespace pattern for JSON, from whichever field gave it; conflicts are a 400."""
    options = options or {}
    given = {
        "guided_whitespace_pattern": guided,
        "structured_outputs.whitespace_pattern": options.get("whitespace_pattern"),
        "structured_outputs.disable_any_whitespace": ""
        if options.get("disable_any_whitespace")
        else None,
        "guided_decoding_backend": from_backend,
    }
    named = {param: value for param, value in given.items() if value is not None}
    for param, value in named.items():
        if not isinstance(value, str):
            raise InvalidRequestError(f"{param} must be a string", param=param)
    if len(set(named.values())) > 1:
        raise InvalidRequestError(
            f"conflicting JSON whitespace settings: {', '.join(named)}", param=next(iter(named))
        )
    return next(iter(named.values()), None)


def _canonical_value(kind: StructuredKind, raw: Any, param: str, max_json_depth: int) -> str:
    """The canonical text of one constraint (see StructuredSpec.value)."""
    if kind == "json":
        schema = _schema_dict(raw, param)
        check_schema_depth(schema, param, max_json_depth)
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    if kind == "choice":
        return json.dumps(_choices(raw, param), ensure_ascii=False)
    if kind == "json_object":
        return ""
    if not isinstance(raw, str) or not raw:
        raise InvalidRequestError(f"{param} must be a non-empty string", param=param)
    return raw


def _schema_dict(raw: Any, param: str) -> dict[str, Any]:
    """A JSON schema given as JSON text, a dict, or a pydantic model class, as a dict."""
    if isinstance(raw, type) and hasattr(raw, "model_json_schema"):
        raw = raw.model_json_schema()
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param=param) from exc
        except RecursionError:  # the decoder guards its recursion; far deeper than any limit
            raise InvalidRequestError(f"{param} is nested too deeply", param=param) from None
    if not isinstance(raw, Mapping):
        raise InvalidRequestError(
            f"{param} must be a JSON schema object, got {type(raw).__name__}", param=param
        )
    return dict(raw)


def check_schema_depth(schema: dict[str, Any], param: str, max_depth: int) -> None:
    """400 if objects/arrays nest deeper than max_depth. An explicit stack, not recursion, that
    stops at the first level too deep: no input (deep, or cyclic from the offline API) can
    exhaust the check itself."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, Mapping):
            children: Any = value.values()
        elif isinstance(value, list | tuple):
            children = value
        else:
            continue
        if depth > max_depth:
            raise InvalidRequestError(
                f"{param} is nested more than {max_depth} levels deep (the limit)", param=param
            )
        stack.extend((child, depth + 1) for child in children)


def _choices(raw: Any, param: str) -> list[str]:
    """A non-empty list of strings."""
    if not isinstance(raw, list | tuple) or not raw:
        raise InvalidRequestError(f"{param} must be a non-empty list of strings", param=param)
    if not all(isinstance(choice, str) for choice in raw):
        raise InvalidRequestError(f"every item of {param} must be a string", param=param)
    return list(raw)
