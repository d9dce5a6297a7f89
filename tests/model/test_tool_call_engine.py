"""Every tool-call syntax on the bundled model: a named or required call generated under its
constraint parses (the same parser as the server's) into a call whose arguments validate."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tokenmill import SamplingParams
from tokenmill.tools.formats import FORMATS
from tokenmill.tools.parser import parse
from tokenmill.tools.request import tool_use

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}


@pytest.mark.parametrize("fmt_name", ["hermes", "llama3_json", "mistral", "pythonic"])
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_constrained_calls_parse_and_validate(default_llm, fmt_name, choice):
    fmt = FORMATS[fmt_name]
    use = tool_use([TOOL], choice, False, fmt, 8)
    assert use is not None
    params = SamplingParams(
        temperature=0.7, seed=5, max_tokens=120, structured_outputs=use.constraint()
    )
    prompt = "Question: what is the weather in Paris?\nAnswer with a call:\n"
    out = default_llm.generate([prompt], params)[0].outputs[0]
    assert out.finish_reason == "stop", out.text
    parsed = parse(out.text, fmt, final=True)
    assert [c.name for c in parsed.calls] == ["get_weather"], out.text
    jsonschema.validate(json.loads(parsed.calls[0].arguments), SCHEMA)


def test_offline_chat_gives_the_template_the_tools(default_llm):
    """LLM.chat(tools=...): the bundled template renders none, so a system message lists them."""
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    params = SamplingParams(temperature=0, max_tokens=1)
    out = default_llm.chat(messages, params, tools=[TOOL])[0]
    prompt = default_llm.tokenizer.decode(out.prompt_token_ids)
    assert "You can call the following functions" in prompt and '"get_weather"' in prompt
    plain = default_llm.chat(messages, params)[0]
    assert len(plain.prompt_token_ids) < len(out.prompt_token_ids)
