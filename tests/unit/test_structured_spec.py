"""spec_from_request_fields: every accepted spelling of a constraint, and the 400s for bad ones."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.structured import StructuredSpec, spec_from_request_fields

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


class Person(pydantic.BaseModel):
    name: str
    age: int


class JsonSchemaFormat(pydantic.BaseModel):
    """Like the server's protocol model: `schema` is a reserved name in pydantic, so aliased."""

    name: str
    schema_: dict[str, Any] | None = pydantic.Field(default=None, alias="schema")


class ResponseFormat(pydantic.BaseModel):
    type: str
    json_schema: JsonSchemaFormat | None = None


def spec(**fields: Any) -> StructuredSpec:
    result = spec_from_request_fields(**fields)
    assert result is not None
    return result


def rejects(match: str, param: str | None = None, **fields: Any) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError, match=match) as info:
        spec_from_request_fields(**fields)
    assert info.value.status_code == 400
    if param is not None:
        assert info.value.param == param
    return info.value


def test_no_constraint_is_none() -> None:
    assert spec_from_request_fields() is None
    assert spec_from_request_fields(response_format={"type": "text"}) is None
    assert spec_from_request_fields(guided_decoding_backend="outlines") is None
    assert spec_from_request_fields(structured_outputs={"json": None, "json_object": False}) is None


def test_guided_json_as_text_dict_or_pydantic_model_is_one_canonical_value() -> None:
    from_dict = spec(guided_json=SCHEMA)
    assert from_dict.kind == "json"
    assert json.loads(from_dict.value) == SCHEMA
    assert spec(guided_json=json.dumps(SCHEMA, indent=2)).value == from_dict.value
    from_model = spec(guided_json=Person)
    assert json.loads(from_model.value) == Person.model_json_schema()
    assert spec(guided_json=Person.model_json_schema()).value == from_model.value


def test_schema_key_order_is_kept_because_it_is_the_field_order() -> None:
    ordered = {"type": "object", "properties": {"zeta": {}, "alpha": {}}}
    value = spec(guided_json=ordered).value
    assert value.index('"zeta"') < value.index('"alpha"')


@pytest.mark.parametrize(
    ("fields", "kind", "value"),
    [
        ({"guided_regex": r"\d+"}, "regex", r"\d+"),
        ({"guided_choice": ["yes", "no"]}, "choice", '["yes", "no"]'),
        ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"'),
        ({"response_format": {"type": "json_object"}}, "json_object", ""),
        ({"structured_outputs": {"regex": "a+"}}, "regex", "a+"),
        ({"structured_outputs": {"choice": ["x"]}}, "choice", '["x"]'),
        ({"structured_outputs": {"grammar": "start: A"}}, "grammar", "start: A"),
        ({"structured_outputs": {"json_object": True}}, "json_object", ""),
    ],
)
def test_each_spelling_gives_its_kind(fields: dict[str, Any], kind: str, value: str) -> None:
    result = spec(**fields)
    assert (result.kind, result.value) == (kind, value)
    assert result.backend is None


def test_response_format_json_schema_as_dict_or_pydantic_model() -> None:
    as_dict = spec(
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    )
    as_model = spec(
        response_format=ResponseFormat(
            type="json_schema", json_schema=JsonSchemaFormat(name="p", schema=SCHEMA)
        )
    )
    assert as_dict == as_model == spec(guided_json=SCHEMA)
    assert as_dict.param == "response_format.json_schema.schema"
    without_schema = spec(response_format={"type": "json_schema", "json_schema": {"name": "p"}})
    assert without_schema.kind == "json_object"


def test_structured_outputs_json_matches_guided_json() -> None:
    assert spec(structured_outputs={"json": SCHEMA}) == spec(guided_json=SCHEMA)


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"guided_json": SCHEMA, "guided_regex": "a"}, ["guided_json", "guided_regex"]),
        (
            {"guided_choice": ["a"], "response_format": {"type": "json_object"}},
            ["guided_choice", "response_format"],
        ),
        (
            {"guided_grammar": "root ::= [a]", "structured_outputs": {"json": SCHEMA}},
            ["guided_grammar", "structured_outputs.json"],
        ),
        (
            {"structured_outputs": {"regex": "a", "choice": ["b"]}},
            ["structured_outputs.regex", "structured_outputs.choice"],
        ),
    ],
)
def test_conflicting_constraints_are_a_400_naming_them(
    fields: dict[str, Any], names: list[str]
) -> None:
    error = rejects("only one structured-output constraint", **fields)
    for name in names:
        assert name in error.message
    assert error.param == names[1]


@pytest.mark.parametrize(
    ("fields", "match", "param"),
    [
        ({"guided_json": "{not json"}, "guided_json is not valid JSON", "guided_json"),
        ({"guided_json": "[1, 2]"}, "must be a JSON schema object", "guided_json"),
        ({"guided_choice": []}, "non-empty list", "guided_choice"),
        ({"guided_choice": ["a", 1]}, "must be a string", "guided_choice"),
        ({"guided_regex": ""}, "non-empty string", "guided_regex"),
        ({"guided_grammar": 3}, "non-empty string", "guided_grammar"),
        ({"response_format": {"type": "xml"}}, "response_format.type", "response_format.type"),
        (
            {"response_format": {"type": "json_schema"}},
            "needs a 'json_schema' object",
            "response_format.json_schema",
        ),
        (
            {"structured_outputs": {"jsonn": SCHEMA}},
            "unknown key structured_outputs.jsonn",
            "structured_outputs.jsonn",
        ),
        (
            {"structured_outputs": {"regex": "a", "structural_tag": "{}"}},
            "not supported",
            "structured_outputs.structural_tag",
        ),
        ({"structured_outputs": ["json"]}, "must be an object", "structured_outputs"),
    ],
)
def test_bad_fields_are_a_400_naming_the_field(
    fields: dict[str, Any], match: str, param: str
) -> None:
    rejects(match, param, **fields)


@pytest.mark.parametrize(
    ("raw", "backend", "whitespace"),
    [
        ("xgrammar", "xgrammar", None),
        ("Outlines", "outlines", None),
        ("lm_format_enforcer", "lm-format-enforcer", None),
        ("auto", None, None),
        ("xgrammar:no-fallback", "xgrammar", None),
        ("xgrammar:disable-any-whitespace", "xgrammar", ""),
        ("no-such-backend", "no-such-backend", None),  # the manager rejects unknown names
    ],
)
def test_backend_names_and_options(raw: str, backend: str | None, whitespace: str | None) -> None:
    result = spec(guided_json=SCHEMA, guided_decoding_backend=raw)
    assert (result.backend, result.whitespace_pattern) == (backend, whitespace)


def test_unknown_backend_option_is_a_400() -> None:
    rejects(
        "unknown guided_decoding_backend option",
        "guided_decoding_backend",
        guided_json=SCHEMA,
        guided_decoding_backend="xgrammar:fast",
    )


def test_whitespace_pattern_from_any_spelling_and_conflicts() -> None:
    assert spec(guided_json=SCHEMA, guided_whitespace_pattern=r"[ ]?").whitespace_pattern == r"[ ]?"
    so = spec(structured_outputs={"json": SCHEMA, "whitespace_pattern": r"\n?"})
    assert so.whitespace_pattern == r"\n?"
    compact = spec(structured_outputs={"json": SCHEMA, "disable_any_whitespace": True})
    assert compact.whitespace_pattern == ""
    rejects(
        "conflicting JSON whitespace settings",
        guided_json=SCHEMA,
        guided_whitespace_pattern=" ",
        structured_outputs={"whitespace_pattern": "\t"},
    )


def test_whitespace_pattern_only_applies_to_json() -> None:
    assert spec(guided_regex="a", guided_whitespace_pattern=" ").whitespace_pattern is None


def test_equal_specs_ignore_the_param_they_came_from() -> None:
    a = spec(guided_json=SCHEMA)
    b = spec(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    )
    assert a.param != b.param
    assert a == b and hash(a) == hash(b)  # one compiled grammar in the manager's cache
    assert spec(guided_choice=["a", "b"]).choices == ["a", "b"]
