"""The tool-call constraint on the real tokenizer (xgrammar structural tags): text is free until
a call starts; from then on only a valid call of a given tool can follow, then text again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tokenmill.model.loader import load_model_source
from tokenmill.structured import StructuredOutputManager
from tokenmill.tokenizer.tokenizer import Tokenizer
from tokenmill.tools.formats import FORMATS
from tokenmill.tools.request import tool_use

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CALL = '{"city": "Paris"}'


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_model_source(None).tokenizer


@pytest.fixture(scope="module")
def manager(tokenizer: Tokenizer) -> Iterator[StructuredOutputManager]:
    manager = StructuredOutputManager(tokenizer, tokenizer.vocab_size + 64, max_workers=1)
    yield manager
    manager.close()


def _accepts(manager, tokenizer, choice, parallel, text: str, fmt_name: str = "hermes") -> bool:
    use = tool_use([WEATHER], choice, parallel, FORMATS[fmt_name], 8)
    matcher = manager.compile(use.constraint()).new_matcher()
    return all(matcher.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("fmt_name", ["hermes", "llama3_json", "mistral"])
def test_auto_lets_text_through_and_holds_calls_to_the_schema(manager, tokenizer, fmt_name):
    fmt = FORMATS[fmt_name]
    good = "Let me check. " + fmt.call_text("get_weather", CALL) + " Done."
    assert _accepts(manager, tokenizer, "auto", None, good, fmt_name)
    assert _accepts(manager, tokenizer, "auto", None, "Just text, no call.", fmt_name)
    for bad in (
        fmt.call_text("get_time", CALL),  # not a given tool
        fmt.call_text("get_weather", '{"town": "Paris"}'),  # not its schema
        fmt.trigger + " and then something else",  # a call started must be a call
    ):
        assert not _accepts(manager, tokenizer, "auto", None, "Hi " + bad, fmt_name), bad


def test_required_and_named_allow_calls_only(manager, tokenizer):
    call = FORMATS["hermes"].call_text("get_weather", CALL)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice in ("required", named):
        assert _accepts(manager, tokenizer, choice, False, call)
        assert not _accepts(manager, tokenizer, choice, False, "Sure! " + call)
    assert _accepts(manager, tokenizer, "required", True, call + "\n" + call)
    assert not _accepts(manager, tokenizer, "required", False, call + "\n" + call)
    # parallel_tool_calls false in auto: text, then at most one call, which ends the output
    one = "x " + call
    assert _accepts(manager, tokenizer, "auto", False, one)
    assert not _accepts(manager, tokenizer, "auto", False, one + " ok")
    assert _accepts(manager, tokenizer, "auto", True, one + " ok " + call)


def test_whitespace_inside_a_call_is_capped(manager, tokenizer):
    fmt = FORMATS["hermes"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    padded = fmt.call_text("get_weather", '{"city":' + " " * 16 + '"Paris"}')
    assert _accepts(manager, tokenizer, named, False, padded)
    too_long = fmt.call_text("get_weather", '{"city":' + " " * 17 + '"Paris"}')
    assert not _accepts(manager, tokenizer, named, False, too_long)


def test_pythonic_calls_follow_the_schema(manager, tokenizer):
    schema_tool = {
        "type": "function",
        "function": {
            "name": "book",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "nights": {"type": "integer"},
                    "tier": {"enum": ["basic", "suite"]},
                    "tags": {"type": "array", "items": {"type": "string"}},
                    "late": {"type": "boolean"},
                },
                "required": ["city", "nights"],
            },
        },
    }

    def accepts(choice, text, parallel=True):
        use = tool_use([schema_tool, WEATHER], choice, parallel, FORMATS["pythonic"], 8)
        matcher = manager.compile(use.constraint()).new_matcher()
        return all(
            matcher.accept_token(t) for t in tokenizer.encode(text, add_special_tokens=False)
        )

    good = '[book(city="Rome", nights=2, tier="suite", tags=["a", "b"], late=False)]'
    assert accepts("required", good)
    assert accepts("required", '[book(city="Rome", nights=2), get_weather(city="Paris")]')
    assert accepts("auto", "Let me book. " + good + " Done.")
    assert accepts("auto", "A list: [1, 2] and [x] are text.")
    for bad in (
        '[book(nights=2, city="Rome")]',  # keyword order is the schema's
        '[book(city="Rome")]',  # nights is required
        '[book(city="Rome", nights="two")]',
        '[book(city="Rome", nights=2, tier="palace")]',
        "[other(x=1)]",
    ):
        assert not accepts("required", bad), bad
    assert not accepts("auto", "ok " + '[book(city="Rome", nights=two)]')
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert accepts(named, '[get_weather(city="Paris")]')
    assert not accepts(named, good)
