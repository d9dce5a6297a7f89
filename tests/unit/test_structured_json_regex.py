"""Regex and grammar text the backends are fed: integer ranges, escapes, anchors, dialects."""

from __future__ import annotations

import json
import random
import re

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.structured import StructuredSpec, spec_from_request_fields
from tokenmill.structured.constraints import (
    choice_regex,
    ebnf_literal,
    is_ebnf,
    regex_escape,
    strip_anchors,
)
from tokenmill.structured.json_regex import integer_range_regex, json_regex


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (1, 9999),
        (-5, 5),
        (0, None),
        (1, None),
        (None, 3),
        (None, -7),
        (17, 17),
        (-100, -3),
        (123, 4567),
        (None, None),
        (0, 0),
        (5, 1_000_000),
        (-999, None),
    ],
)
def test_integer_range_regex_matches_exactly_the_range(low: int | None, high: int | None) -> None:
    pattern = re.compile(integer_range_regex(low, high))
    rng = random.Random(0)
    numbers = list(range(-1200, 1200)) + [rng.randint(-(10**7), 10**7) for _ in range(1000)]
    for n in numbers:
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert bool(pattern.fullmatch(str(n))) == inside, n
    for text in ["-0", "01", "007", "", "-", "+1", "1.0"]:
        assert not pattern.fullmatch(text), text


def test_empty_integer_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="empty"):
        integer_range_regex(3, 2)


def json_spec(schema: dict) -> StructuredSpec:
    result = spec_from_request_fields(guided_json=schema)
    assert result is not None
    return result


def test_json_regex_enforces_integer_ranges_everywhere_in_the_schema() -> None:
    schema = {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "level": {"$ref": "#/$defs/level"},
            "odds": {"type": "array", "items": {"type": "integer", "exclusiveMinimum": 0}},
        },
        "required": ["age", "level", "odds"],
        "$defs": {"level": {"type": "integer", "minimum": 1, "exclusiveMaximum": 4}},
    }
    pattern = re.compile(json_regex(json_spec(schema)))
    assert pattern.fullmatch('{"age":120,"level":3,"odds":[1, 7]}')
    assert not pattern.fullmatch('{"age":121,"level":3,"odds":[1]}')
    assert not pattern.fullmatch('{"age":1,"level":4,"odds":[1]}')
    assert not pattern.fullmatch('{"age":1,"level":1,"odds":[0]}')


def test_json_regex_applies_the_whitespace_pattern() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    spec = spec_from_request_fields(guided_json=schema, guided_whitespace_pattern=r"\n?")
    assert spec is not None
    pattern = re.compile(json_regex(spec))
    assert pattern.fullmatch('{\n"a":\n1\n}')
    assert not pattern.fullmatch('{ "a": 1 }')


def test_json_regex_of_an_empty_range_is_a_400() -> None:
    with pytest.raises(InvalidRequestError, match=r"integer range \[5, 1\] is empty"):
        json_regex(json_spec({"type": "integer", "minimum": 5, "maximum": 1}))


def test_choice_regex_escapes_metacharacters() -> None:
    choices = ["a.b", "(x|y)", "1+1=2?", "[z]", "plain text", "back\\slash", "$5^"]
    spec = spec_from_request_fields(guided_choice=choices)
    assert spec is not None
    pattern = re.compile(choice_regex(spec))
    for choice in choices:
        assert pattern.fullmatch(choice)
    for other in ["axb", "x", "11=2", "z", "plain"]:
        assert not pattern.fullmatch(other)
    assert regex_escape("a b-c") == "a b-c"  # only metacharacters: Rust's regex rejects more


def test_ebnf_literal_escapes() -> None:
    assert ebnf_literal('say "hi"\n') == '"say \\"hi\\"\\n"'
    assert ebnf_literal("a\\b\x01") == '"a\\\\b\\x01"'
    assert ebnf_literal("très") == '"très"'


@pytest.mark.parametrize(
    ("regex", "stripped"),
    [("^abc$", "abc"), ("abc", "abc"), (r"a\$", r"a\$"), (r"a\\$", r"a\\"), ("[^a]", "[^a]")],
)
def test_strip_anchors(regex: str, stripped: str) -> None:
    assert strip_anchors(regex) == stripped


def test_grammar_dialect_detection() -> None:
    assert is_ebnf('root ::= "a" | b\nb ::= [0-9]')
    assert is_ebnf('  expr-list ::= "x"')
    assert not is_ebnf('start: "a" b\nb: /[0-9]/')
    assert not is_ebnf("?start: expr\n%import common.NUMBER")
    assert json.loads(json_spec({"type": "object"}).value) == {"type": "object"}
