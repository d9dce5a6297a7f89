"""Structured outputs through the real server: every output satisfies its constraint.

Each test sends its cases at once (the server batches them) on both endpoints, streaming and
not, with greedy decoding unless it says otherwise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import jsonschema
import pytest

from tests.e2e.test_server import MODEL, client

if TYPE_CHECKING:
    from tests.e2e.conftest import Server

MODES = [("completions", False), ("completions", True), ("chat", False), ("chat", True)]

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "role", "address"],
}
# "SELECT name, age FROM users WHERE age > 30"
SQL_GBNF = r"""
root    ::= "SELECT " columns " FROM " ident where?
columns ::= "*" | ident (", " ident){0,3}
where   ::= " WHERE " ident " " [=<>] " " [0-9]{1,3}
ident   ::= [a-z_] [a-z0-9_]{0,9}
"""
SQL_REGEX = r"SELECT (\*|[a-z_][a-z0-9_]{0,9}(, [a-z_][a-z0-9_]{0,9}){0,3}) FROM [a-z_][a-z0-9_]{0,9}( WHERE [a-z_][a-z0-9_]{0,9} [=<>] [0-9]{1,3})?"
ARITHMETIC_LARK = r"""
?start: expr
?expr: term | term ADD term | term ADD term ADD term
?term: factor | factor MUL factor
?factor: NUMBER | "(" expr ")"
ADD: "+" | "-"
MUL: "*" | "/"
NUMBER: /[0-9]{1,2}/
"""
ARITHMETIC_GBNF = r"""
root   ::= expr
expr   ::= term ([-+] term){0,2}
term   ::= factor ([*/] factor)?
factor ::= [0-9]{1,2} | "(" expr ")"
"""


@dataclass
class Case:
    """One request: a prompt, the constraint fields, and where and how to send it."""

    prompt: str
    body: dict[str, Any]
    endpoint: str = "completions"
    stream: bool = False
    max_tokens: int = 16
    texts: list[str] = field(default_factory=list)  # one per choice, once run
    finish_reasons: list[str | None] = field(default_factory=list)


def run_all(server: Server, cases: list[Case]) -> list[Case]:
    """Send every case at once (so the server batches them); fill in texts and reasons."""
    with ThreadPoolExecutor(len(cases)) as pool:
        list(pool.map(lambda case: _run(server, case), cases))
    return cases


def _run(server: Server, case: Case) -> None:
    body = {"temperature": 0, **case.body}
    extra = {k: body.pop(k) for k in list(body) if k not in _OPENAI_FIELDS}
    c = client(server)
    common = dict(model=MODEL, max_tokens=case.max_tokens, extra_body=extra, **body)
    if case.endpoint == "chat":
        messages = [{"role": "user", "content": case.prompt}]
        response = c.chat.completions.create(messages=messages, stream=case.stream, **common)
    else:
        response = c.completions.create(prompt=case.prompt, stream=case.stream, **common)
    choices = [response] if not case.stream else list(response)
    texts: dict[int, str] = {}
    reasons: dict[int, str | None] = {}
    for chunk in choices:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (_text(choice) or "")
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    case.texts = [texts[i] for i in sorted(texts)]
    case.finish_reasons = [reasons[i] for i in sorted(reasons)]


_OPENAI_FIELDS = {"temperature", "n", "seed", "stop", "top_p", "logprobs", "top_logprobs"}


def _text(choice: Any) -> str | None:
    if hasattr(choice, "message"):
        return str(choice.message.content)
    if hasattr(choice, "delta"):
        return choice.delta.content
    return str(choice.text)


def in_every_mode(prompt: str, body: dict[str, Any], max_tokens: int = 16) -> list[Case]:
    return [Case(prompt, body, endpoint, stream, max_tokens) for endpoint, stream in MODES]


def check_all(cases: list[Case], check: Callable[[str], Any]) -> None:
    for case in cases:
        for text, reason in zip(case.texts, case.finish_reasons, strict=True):
            assert reason == "stop", (case, text)
            check(text)


def full_match(pattern: str) -> Callable[[str], None]:
    def check(text: str) -> None:
        assert re.fullmatch(pattern, text), (pattern, text)

    return check


def valid_json(schema: dict[str, Any]) -> Callable[[str], None]:
    def check(text: str) -> None:
        jsonschema.validate(json.loads(text), schema)

    return check


def parse_arithmetic(text: str) -> None:
    """Recursive descent: expr = term (op term)*, term = factor (op factor)*, factor = N | (expr)."""
    tokens = re.findall(r"[0-9]+|[-+*/()]", text)
    assert "".join(tokens) == text.replace(" ", ""), text
    position = 0

    def take(allowed: str) -> bool:
        nonlocal position
        if position < len(tokens) and tokens[position] in allowed:
            position += 1
            return True
        return False

    def factor() -> None:
        nonlocal position
        if take("("):
            expr()
            assert take(")"), text
        else:
            assert position < len(tokens) and tokens[position].isdigit(), text
            position += 1

    def term() -> None:
        factor()
        while take("*/"):
            factor()

    def expr() -> None:
        term()
        while take("+-"):
            term()

    expr()
    assert position == len(tokens), text


# --- each kind, both endpoints, streaming and not ----------------------------------------


def test_guided_choice(server: Server) -> None:
    choices = ["positive", "negative", "neutral"]
    cases = in_every_mode("Review: I loved it! Sentiment:", {"guided_choice": choices})
    cases += in_every_mode("Pick a color.", {"guided_choice": ["red", "green blue", "não"]})
    check_all(run_all(server, cases), lambda text: None)
    for case in cases:
        assert case.texts[0] in case.body["guided_choice"], case


@pytest.mark.parametrize(
    ("prompt", "pattern"),
    [
        ("The year the war ended:", r"\d{4}"),
        ("Contact email:", r"[a-z]{1,8}@[a-z]{1,8}\.(com|org)"),
        ("My favourite pet is a", r"(cat|dog|bird)s?"),
    ],
)
def test_guided_regex(server: Server, prompt: str, pattern: str) -> None:
    cases = in_every_mode(prompt, {"guided_regex": pattern}, max_tokens=24)
    check_all(run_all(server, cases), full_match(pattern))


def test_guided_json(server: Server) -> None:
    prompt = "Describe a user as JSON with name, age, role, tags and address."
    cases = in_every_mode(prompt, {"guided_json": PERSON_SCHEMA}, max_tokens=96)
    check_all(run_all(server, cases), valid_json(PERSON_SCHEMA))


def test_guided_grammar_gbnf_and_lark(server: Server) -> None:
    sql = in_every_mode("An SQL query listing the users:", {"guided_grammar": SQL_GBNF}, 32)
    lark = in_every_mode("A sum: ", {"guided_grammar": ARITHMETIC_LARK}, 32)
    gbnf = in_every_mode("A product: ", {"guided_grammar": ARITHMETIC_GBNF}, 32)[::3]
    run_all(server, sql + lark + gbnf)
    check_all(sql, full_match(SQL_REGEX))
    check_all(lark + gbnf, parse_arithmetic)


def test_response_format_and_structured_outputs_spellings(server: Server) -> None:
    schema_format = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON_SCHEMA}}
    object_format = {"type": "json_object"}
    prompt = "Describe a user as JSON."
    schema = in_every_mode(prompt, {"response_format": schema_format}, 96)[1:3]
    # (a prompt the bundled model answers with a short object: on "Describe a user as JSON."
    # its greedy chat reply under int8 activations counts digits past any max_tokens)
    short = "Write a JSON object with a name and an age."
    anything = in_every_mode(short, {"response_format": object_format}, 96)[2:]
    current = [
        Case("Yes or no?", {"structured_outputs": {"choice": ["yes", "no"]}}, "chat"),
        Case("Digits:", {"structured_outputs": {"regex": "[0-9]{3}"}}, "completions", True),
    ]
    run_all(server, schema + anything + current)
    check_all(schema, valid_json(PERSON_SCHEMA))
    check_all(anything, lambda text: isinstance(json.loads(text), dict) or pytest.fail(text))
    assert current[0].texts[0] in ("yes", "no") and re.fullmatch("[0-9]{3}", current[1].texts[0])


# --- backends -------------------------------------------------------------------------------


def test_outlines_backend_on_each_kind_it_supports(server: Server) -> None:
    backend = {"guided_decoding_backend": "outlines"}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    cases = [
        Case("JSON:", {**backend, "guided_json": schema}, "chat", max_tokens=24),
        Case("Digits:", {**backend, "guided_regex": r"\d{2,3}"}, "completions", True),
        Case("Sentiment:", {**backend, "guided_choice": ["good", "bad"]}, "chat", True),
    ]
    run_all(server, cases)
    valid_json(schema)(cases[0].texts[0])
    assert re.fullmatch(r"\d{2,3}", cases[1].texts[0]) and cases[2].texts[0] in ("good", "bad")


def test_lm_format_enforcer_backend(server: Server) -> None:
    body = {"guided_decoding_backend": "lm-format-enforcer", "guided_regex": "(yes|no)"}
    (case,) = run_all(server, [Case("Is water wet?", body, "chat", max_tokens=4)])
    assert case.texts[0] in ("yes", "no") and case.finish_reasons == ["stop"]


# --- with other features ----------------------------------------------------------------


def test_n_seed_stop_and_logprobs_with_a_constraint(server: Server) -> None:
    pattern = r"[a-z]{2,6}( [a-z]{2,6}){2}"
    sampled = {"guided_regex": pattern, "temperature": 1.0, "n": 3, "seed": 7}
    stop = {"guided_regex": r"(cat|dog), (cat|dog)", "stop": [","]}
    cases = [
        Case("Three words:", sampled, "completions", max_tokens=24),
        Case("Three words:", sampled, "chat", True, max_tokens=24),
        Case("Three words:", sampled, "completions", max_tokens=24),
        Case("Pets:", stop, "chat"),
    ]
    run_all(server, cases)
    check_all(cases[:3], full_match(pattern))
    assert len(cases[0].texts) == 3 and cases[0].texts == cases[2].texts  # seeded
    assert cases[3].texts[0] in ("cat", "dog") and cases[3].finish_reasons == ["stop"]
    logprobs = client(server).completions.create(
        model=MODEL, prompt="Digits:", max_tokens=5, temperature=0, logprobs=2,
        extra_body={"guided_regex": "[0-9]{3}"},
    ).choices[0]  # fmt: skip
    assert re.fullmatch("[0-9]{3}", logprobs.text)
    tokens, values = logprobs.logprobs.tokens, logprobs.logprobs.token_logprobs
    assert "".join(tokens[:3]) == logprobs.text and len(tokens) == 4  # 3 digits, then EOS
    assert all(v <= 0 for v in values) and len(values) == 4


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"guided_json": {"type": "nope"}}, "guided_json", "invalid JSON schema"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
        ({"guided_grammar": 'root ::= foo'}, "guided_grammar", "grammar"),
        ({"guided_choice": ["a"], "guided_decoding_backend": "nope"}, "guided_decoding_backend",
         "unknown"),
        ({"guided_grammar": 'root ::= "a"', "guided_decoding_backend": "outlines"},
         "guided_grammar", "outlines"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "response_format",
         "only one"),
        ({"structured_outputs": {"choice": ["a"], "bogus": 1}}, "structured_outputs.bogus",
         "bogus"),
        ({"guided_choice": ["a", "b"], "use_beam_search": True, "n": 2}, "guided_choice",
         "beam search"),
    ],
)  # fmt: skip
def test_invalid_constraints_are_400_and_the_server_keeps_serving(
    server: Server, body: dict[str, Any], param: str, fragment: str
) -> None:
    for path, prompt in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}]
    })):  # fmt: skip
        for stream in (False, True):
            payload = {"model": MODEL, "max_tokens": 2, "stream": stream, **prompt, **body}
            r = httpx.post(f"{server.url}{path}", json=payload, timeout=60)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == param and fragment in error["message"], error
    ok = client(server).completions.create(
        model=MODEL, prompt="x", max_tokens=4, extra_body={"guided_choice": ["ok", "fine"]}
    )
    assert ok.choices[0].text in ("ok", "fine")
