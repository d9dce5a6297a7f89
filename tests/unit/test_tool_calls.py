"""Tool calls: the parser splits content from calls the same way for every chunking of a stream;
the request's tools are checked; formats come from chat templates; the constraint compiles."""

from __future__ import annotations

import json
import random

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.tools.formats import (
    FORMATS,
    GENERIC,
    HERMES,
    LLAMA3_JSON,
    MISTRAL,
    PYTHONIC,
    detect_format,
)
from tokenmill.tools.parser import ToolCallStream, parse
from tokenmill.tools.request import tool_use

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
ARGS = ['{"city": "Pa\\"ris {x}", "days": [1, {"a": "]"}]}', "{}", '{"q": "<tool_call>"}']


def _output(fmt, prefix: str, calls: list[tuple[str, str]], between: str = "\n") -> str:
    return prefix + between.join(fmt.call_text(name, args) for name, args in calls)


def _stream(fmt, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """Feed the snapshots text[:cut] for each cut, then the whole text as final."""
    stream = ToolCallStream(fmt)
    content, calls, ids = "", {}, {}
    for cut in [*cuts, len(text)]:
        piece, deltas = stream.update(text[:cut], final=cut == len(text))
        content += piece
        for delta in deltas:
            entry = calls.setdefault(delta.index, ["", ""])
            if delta.id is not None:
                assert delta.index not in ids and delta.name is not None
                ids[delta.index] = delta.id
                entry[0] = delta.name
            entry[1] += delta.arguments
    return content, [tuple(v) for v in calls.values()], list(ids.values())


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON, MISTRAL], ids=lambda f: f.name)
def test_stream_equals_the_whole_parse_for_every_chunking(fmt):
    rng = random.Random(0)
    text = _output(
        fmt, "Let me look that up.\n", [("get_weather", ARGS[0]), ("f", ARGS[1]), ("g", ARGS[2])]
    )
    whole = parse(text, fmt, final=True)
    assert [(c.name, c.arguments) for c in whole.calls] == [
        ("get_weather", ARGS[0]), ("f", ARGS[1]), ("g", ARGS[2])
    ]  # fmt: skip
    for args in ARGS:
        json.loads(args)  # the arguments are exactly the model's JSON text
    expected = (whole.message_content(True), [(c.name, c.arguments) for c in whole.calls])
    assert expected[0] == "Let me look that up."
    cuttings = [list(range(1, len(text)))]  # every character boundary
    cuttings += [
        sorted(rng.sample(range(1, len(text)), k)) for k in (1, 3, 10, 40) for _ in range(20)
    ]
    for cuts in cuttings:
        content, calls, ids = _stream(fmt, text, cuts)
        assert (content, calls) == expected, cuts
        assert len(set(ids)) == len(calls) and all(i.startswith("call_") for i in ids)


def test_text_without_calls_keeps_its_whitespace_and_partial_markers():
    for text in ["Hello there.\n", "a < b and <tool", 'Weather: {"name": 1}']:
        whole = parse(text, HERMES, final=True)
        assert whole.calls == [] and whole.message_content(True) == text
        content, calls, _ = _stream(HERMES, text, list(range(1, len(text))))
        assert content == text and calls == []


def test_a_cut_off_call_keeps_what_was_written():
    text = HERMES.call_text("get_weather", ARGS[0])[:-20]
    whole = parse(text, HERMES, final=True)
    assert whole.calls[0].name == "get_weather"
    assert ARGS[0].startswith(whole.calls[0].arguments)
    assert _stream(HERMES, text, list(range(1, len(text))))[1] == [
        (c.name, c.arguments) for c in whole.calls
    ]


def test_text_that_only_looks_like_a_trigger_stays_content():
    text = "<tool_call> is how I would call one, but not now."
    assert parse(text, HERMES, final=True).message_content(True) == text
    assert _stream(HERMES, text, list(range(1, len(text))))[0] == text


def test_format_detection_from_templates():
    assert detect_format(None) is GENERIC
    assert detect_format("{{ messages }}") is GENERIC
    assert detect_format("{% if tools %}<tool_call>{% endif %}") is HERMES
    assert detect_format("{% if tools %}[AVAILABLE_TOOLS][TOOL_CALLS]{% endif %}") is MISTRAL
    assert detect_format("{% if tools %}<|python_tag|>{% endif %}") is LLAMA3_JSON
    assert detect_format("{% for t in tools %}{{ t | tojson }}{% endfor %}") is HERMES
    assert (
        detect_format("{% if tools %}[func_name1(params_name1=params_value1)]{% endif %}")
        is PYTHONIC
    )
    assert set(FORMATS) == {"hermes", "llama3_json", "mistral", "pythonic", "generic"}


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (None, "auto", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "sometimes", "tool_choice"),
        ([{"type": "code_interpreter"}], "auto", "tools.0"),
        ([{"type": "function", "function": {"name": "bad name"}}], "auto", "tools.0.function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "auto",
         "tools.0.function.parameters"),
        ([{"type": "function", "function": {"name": "f", "oops": 1}}], "auto", "tools.0.function"),
        ([WEATHER, WEATHER], "auto", "tools"),
        ([WEATHER] * 3, "auto", "tools"),  # over the limit of 2 here
    ],
)  # fmt: skip
def test_bad_tools_are_a_400_naming_the_field(tools, choice, param):
    with pytest.raises(InvalidRequestError) as info:
        tool_use(tools, choice, None, HERMES, max_tools=2)
    assert info.value.param == param


def test_tool_choice_modes():
    assert tool_use(None, "none", None, HERMES, 8) is None
    assert tool_use([WEATHER], None, None, HERMES, 8).mode == "auto"
    assert tool_use([WEATHER], "none", None, HERMES, 8).constraint() is None
    named = tool_use(
        [WEATHER], {"type": "function", "function": {"name": "get_weather"}}, False, HERMES, 8
    )
    assert named.mode == "named" and not named.parallel
    tag = json.loads(named.constraint().value)
    assert tag["format"]["begin"] == '<tool_call>\n{"name": "get_weather", "arguments": '


def test_generic_templates_get_the_tools_in_a_system_message_and_calls_as_text():
    use = tool_use([WEATHER], "auto", None, GENERIC, 8)
    assert use.template_tools() is None
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    rendered = use.template_messages(messages)
    assert rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]
    assert rendered[2]["content"] == GENERIC.call_text("get_weather", '{"city": "Paris"}')
    with_tools = tool_use([WEATHER], "auto", None, HERMES, 8).template_messages(messages)
    assert with_tools[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_pythonic_calls_stream_as_they_parse_whole():
    """[name(k=v, ...), ...]: each call's arguments (Python literals) arrive as JSON once the
    call is complete; content around the list is text, brackets in text stay text."""
    text = 'Sure. [get_weather(city="Pa\\"ris", days=[1, 2], ok=True, x=None), f()] Done [1].'
    whole = parse(text, PYTHONIC, final=True)
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [
        ("get_weather", {"city": 'Pa"ris', "days": [1, 2], "ok": True, "x": None}),
        ("f", {}),
    ]
    assert whole.message_content(True) == "Sure.  Done [1]."
    expected = (whole.message_content(True), [(c.name, c.arguments) for c in whole.calls])
    rng = random.Random(1)
    for cuts in [list(range(1, len(text)))] + [
        sorted(rng.sample(range(1, len(text)), k)) for k in (1, 4, 12) for _ in range(20)
    ]:
        content, calls, _ = _stream(PYTHONIC, text, cuts)
        assert (content, calls) == expected, cuts
    call = PYTHONIC.call_text("get_weather", '{"city": "Paris", "days": [1], "ok": false}')
    assert call == '[get_weather(city="Paris", days=[1], ok=False)]'
