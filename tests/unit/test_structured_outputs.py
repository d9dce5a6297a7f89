"""Each backend on each kind it supports: decoding walks under the mask satisfy the constraint.

A walk stands in for a model: seeded noisy logits, biased toward short tokens, closing
characters and EOS (so walks end) and strongly toward special and padding tokens (so a mask
that ever lets one through fails), masked with the manager's batched apply, then argmax.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

import jsonschema
import pytest
import torch

from tokenmill.model.loader import load_model_source
from tokenmill.structured import StructuredOutputManager, spec_from_request_fields
from tokenmill.structured.bitmask import unpack_bitmask
from tokenmill.tokenizer.tokenizer import Tokenizer

PADDING = 64  # model vocab rows past the tokenizer's, as padded checkpoints have
MAX_TOKENS = 300
BACKENDS = ["xgrammar", "outlines", "lm-format-enforcer"]

PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "name": {"type": "string", "maxLength": 20},
        "active": {"type": "boolean"},
        "role": {"type": "string", "enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
        "scores": {
            "type": "array",
            "items": {"type": "integer", "minimum": -5, "maximum": 5},
            "minItems": 1,
            "maxItems": 4,
        },
    },
    "required": ["id", "name", "role", "address", "scores"],
}
PERSON = (
    '{"id": 42, "name": "Ada", "active": true, "role": "admin", "tags": ["x", "yz"], '
    '"address": {"city": "Paris", "zip": "75001"}, "scores": [3, -5]}'
)
CHOICES = ["positive", "negative", "neutral", "très bien", 'say "hi"\n']
REGEXES = [
    r"\d{1,6}",
    r"[a-z]{1,8}@[a-z]{1,8}\.(com|org|net)",
    r"(cat|dog|bird)s?",
    r"(yes|no), because [a-z ]{0,20}\.",
]

# arithmetic: not a regular language, so it is checked by recursive descent
ARITH_GBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9] | [1-9] [0-9]{1,3}
"""
ARITH_LARK = r"""
?start: expr
?expr: term (("+" | "-") term)*
?term: factor (("*" | "/") factor)*
?factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,4}/
%ignore " "
"""
SQL_GBNF = r"""
root ::= "SELECT " columns " FROM " ident where?
columns ::= "*" | ident (", " ident)*
where ::= " WHERE " cond (" AND " cond)*
cond ::= ident " " [=<>] " " value
value ::= [0-9]{1,5} | "'" [a-z]{0,8} "'"
ident ::= [a-z_] [a-z0-9_]{0,11}
"""
SQL_LARK = r"""
start: "SELECT " columns " FROM " IDENT where?
columns: "*" | IDENT (", " IDENT)*
where: " WHERE " cond (" AND " cond)*
cond: IDENT " " OP " " VALUE
OP: "=" | "<" | ">"
VALUE: /[0-9]{1,5}/ | /'[a-z]{0,8}'/
IDENT: /[a-z_][a-z0-9_]{0,11}/
"""
_IDENT = r"[a-z_][a-z0-9_]{0,11}"
_COND = rf"{_IDENT} [=<>] ([0-9]{{1,5}}|'[a-z]{{0,8}}')"
SQL_RE = rf"SELECT (\*|{_IDENT}(, {_IDENT})*) FROM {_IDENT}( WHERE {_COND}( AND {_COND})*)?"


def parses_as_arithmetic(text: str) -> bool:
    """expr := term (+|- term)*; term := factor (*|/ factor)*; factor := number | ( expr )."""
    tokens = re.findall(r"\d+|[-+*/()]|\S", text)
    if "".join(tokens) != text.replace(" ", ""):
        return False
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def expr() -> bool:
        nonlocal position
        if not term():
            return False
        while peek() in ("+", "-"):
            position += 1
            if not term():
                return False
        return True

    def term() -> bool:
        nonlocal position
        if not factor():
            return False
        while peek() in ("*", "/"):
            position += 1
            if not factor():
                return False
        return True

    def factor() -> bool:
        nonlocal position
        token = peek()
        if token is not None and token.isdigit():
            position += 1
            return True
        if token != "(":
            return False
        position += 1
        if not expr() or peek() != ")":
            return False
        position += 1
        return True

    return expr() and position == len(tokens)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Vocab-sized ops are tiny: extra threads only contend (10x slower on a busy 2-core box)."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_model_source(None).tokenizer


@pytest.fixture(scope="module")
def manager(tokenizer: Tokenizer) -> Iterator[StructuredOutputManager]:
    manager = StructuredOutputManager(tokenizer, tokenizer.vocab_size + PADDING)
    yield manager
    manager.close()


@pytest.fixture(scope="module")
def forbidden(tokenizer: Tokenizer, manager: StructuredOutputManager) -> torch.Tensor:
    """Ids never allowed: special tokens other than EOS, and the model's vocab padding."""
    ids = set(tokenizer.all_special_ids) - set(tokenizer.eos_token_ids)
    ids |= set(range(tokenizer.vocab_size, manager.vocab_size))
    return torch.tensor(sorted(ids))


@pytest.fixture(scope="module")
def prior(tokenizer: Tokenizer, manager: StructuredOutputManager, forbidden: torch.Tensor):
    """A fake model's logits: short ASCII tokens, closers, EOS; forbidden ids most of all."""
    texts = tokenizer.hf.batch_decode([[i] for i in range(tokenizer.vocab_size)])
    scores = [
        -0.5 * len(text) - 4.0 * (not text.isascii()) + 3.0 * any(c in text for c in '"}])')
        for text in texts
    ]
    logits = torch.full((manager.vocab_size,), 0.0)
    logits[: len(scores)] = torch.tensor(scores)
    logits[tokenizer.eos_token_ids] = 6.0
    logits[forbidden] = 50.0
    return logits


@pytest.fixture(scope="module")
def walk(
    tokenizer: Tokenizer,
    manager: StructuredOutputManager,
    prior: torch.Tensor,
    forbidden: torch.Tensor,
) -> Callable[..., str]:
    def run(fields: dict[str, Any], backend: str, seed: int) -> str:
        spec = spec_from_request_fields(guided_decoding_backend=backend, **fields)
        assert spec is not None
        matcher = manager.compile(spec).new_matcher()
        bitmask = manager.allocate_bitmask(2)  # walk row 1: the row index must be honoured
        generator = torch.Generator().manual_seed(seed)
        token_ids: list[int] = []
        for _ in range(MAX_TOKENS):
            matcher.fill_bitmask(bitmask, 1)
            assert not unpack_bitmask(bitmask[1:2], manager.vocab_size)[0, forbidden].any()
            noise = -torch.log(-torch.log(torch.rand(manager.vocab_size, generator=generator)))
            logits = torch.stack([prior, prior + 1.5 * noise])  # [2, V]
            manager.apply_bitmask(logits, bitmask, torch.tensor([1]))
            token_id = int(logits[1].argmax())
            assert matcher.accept_token(token_id), token_id
            if token_id in tokenizer.eos_token_ids:
                assert matcher.is_terminated()
                return tokenizer.decode(token_ids)
            token_ids.append(token_id)
        raise AssertionError(f"no EOS after {MAX_TOKENS} tokens: {tokenizer.decode(token_ids)!r}")

    return run


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("backend", BACKENDS)
def test_choice_walks_give_one_of_the_choices(walk: Callable[..., str], backend: str, seed: int):
    assert walk({"guided_choice": CHOICES}, backend, seed) in CHOICES


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("regex", REGEXES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_regex_walks_fully_match(walk: Callable[..., str], backend: str, regex: str, seed: int):
    text = walk({"guided_regex": regex}, backend, seed)
    assert re.fullmatch(regex, text), text


def validate_person(text: str, backend: str) -> None:
    """jsonschema validation; lm-format-enforcer ignores whitespace that opens a string (it
    counts neither toward maxLength nor pattern), a known limitation checked as such."""
    document = json.loads(text)
    if backend == "lm-format-enforcer":
        document = json.loads(text, object_hook=lambda obj: {k: _lstrip(v) for k, v in obj.items()})
    jsonschema.validate(document, PERSON_SCHEMA)


def _lstrip(value: Any) -> Any:
    if isinstance(value, list):
        return [_lstrip(item) for item in value]
    return value.lstrip(" \t\n\r") if isinstance(value, str) else value


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_json_schema_walks_validate(walk: Callable[..., str], backend: str, seed: int):
    validate_person(walk({"guided_json": PERSON_SCHEMA}, backend, seed), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_json_object_walks_give_an_object(walk: Callable[..., str], backend: str):
    text = walk({"response_format": {"type": "json_object"}}, backend, 0)
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize(
    ("backend", "pattern", "whitespace"),
    [
        ("xgrammar", "", set()),
        ("xgrammar", r"[ ]?", {" "}),
        ("outlines", "", set()),
        ("outlines", r"\n?", {"\n"}),
    ],
)
def test_json_whitespace_pattern_is_honoured(
    walk: Callable[..., str], backend: str, pattern: str, whitespace: set[str]
):
    fields = {"guided_json": PERSON_SCHEMA, "guided_whitespace_pattern": pattern}
    text = walk(fields, backend, 0)
    validate_person(text, backend)
    outside_strings = re.sub(r'"(\\.|[^"\\])*"', '""', text)
    assert set(re.findall(r"\s", outside_strings)) <= whitespace, text


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grammar", [ARITH_GBNF, ARITH_LARK], ids=["gbnf", "lark"])
def test_arithmetic_grammar_walks_parse(walk: Callable[..., str], grammar: str, seed: int):
    text = walk({"guided_grammar": grammar}, "xgrammar", seed)
    assert parses_as_arithmetic(text), text


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("grammar", [SQL_GBNF, SQL_LARK], ids=["gbnf", "lark"])
def test_sql_grammar_walks_parse(walk: Callable[..., str], grammar: str, seed: int):
    text = walk({"guided_grammar": grammar}, "xgrammar", seed)
    assert re.fullmatch(SQL_RE, text), text


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_valid_document_is_accepted_token_by_token_then_only_eos(
    tokenizer: Tokenizer, manager: StructuredOutputManager, backend: str
):
    spec = spec_from_request_fields(guided_json=PERSON_SCHEMA, guided_decoding_backend=backend)
    assert spec is not None
    matcher = manager.compile(spec).new_matcher()
    bitmask = manager.allocate_bitmask(1)
    for token_id in tokenizer.encode(PERSON, add_special_tokens=False):
        matcher.fill_bitmask(bitmask, 0)
        assert (int(bitmask[0, token_id // 32]) >> (token_id % 32)) & 1, token_id
        assert matcher.accept_token(token_id)
    matcher.fill_bitmask(bitmask, 0)
    allowed = unpack_bitmask(bitmask, manager.vocab_size)[0].nonzero().flatten().tolist()
    if backend == "lm-format-enforcer":  # it allows whitespace after the closing brace
        assert set(tokenizer.eos_token_ids) < set(allowed) and not matcher.is_terminated()
    else:  # the object is closed: nothing but EOS can follow
        assert allowed == tokenizer.eos_token_ids and matcher.is_terminated()
    assert matcher.accept_token(tokenizer.eos_token_ids[0])
    assert matcher.is_terminated()
    assert not matcher.accept_token(tokenizer.encode(" ", add_special_tokens=False)[0])
