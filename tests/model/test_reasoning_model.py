"""A tiny random Qwen3-shaped model whose tokenizer has <think> and </think> as tokens and whose
template (written here, in the style of Qwen3's and DeepSeek-R1's) thinks: the reasoning
parser is found from the template, the thought is free of the request's constraint, the
answer after it is held to it, and a thinking budget ends the thought on time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError

# DeepSeek-R1 style: earlier answers lose their thoughts, the prompt ends inside an open one
R1_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'].split('</think>')[-1] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["answer"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def thinking_model_dir(tmp_path_factory: pytest.TempPathFactory, bundled_gguf_path: str) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    gguf = Path(bundled_gguf_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # added tokens that are not special, as Qwen3's and DeepSeek-R1's tokenizers have them:
    # they stay in the decoded text, where the server splits the thought off
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=False)
    tokenizer.chat_template = R1_TEMPLATE
    directory = tmp_path_factory.mktemp("tiny-thinking")
    config = AutoConfig.for_model(
        "qwen3", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.5)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def _llm(directory: Path, **kwargs: Any) -> LLM:
    return LLM(str(directory), dtype="float32", device="cpu", kv_cache_memory=16 << 20, **kwargs)


def test_the_thought_is_free_the_answer_constrained_and_the_budget_kept(thinking_model_dir):
    llm = _llm(thinking_model_dir)
    markers = llm.engine.reasoning
    assert markers is not None and len(markers.end_ids) == 1  # found from the template
    end_id = markers.end_ids[0]
    messages = [{"role": "user", "content": "Pick a digit."}]
    free = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    free_ids = free[0].outputs[0].token_ids
    assert end_id not in free_ids  # this random model would think on

    budget = 4
    constrained = SamplingParams(
        temperature=0, max_tokens=60, thinking_token_budget=budget,
        structured_outputs={"json": SCHEMA, "whitespace_pattern": ""},
    )  # fmt: skip
    out = llm.chat(messages, constrained)[0].outputs[0]
    ids = out.token_ids
    assert ids[:budget] == free_ids[:budget]  # the thought: the model's own tokens, unmasked
    assert ids[budget] == end_id  # then the end marker, forced
    answer = llm.tokenizer.decode(ids[budget + 1 :], skip_special_tokens=True)
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(answer), SCHEMA)


def test_reasoning_parser_none_turns_it_off(thinking_model_dir):
    llm = _llm(thinking_model_dir, reasoning_parser="none")
    assert llm.engine.reasoning is None
    with pytest.raises(InvalidRequestError, match="thinking_token_budget"):  # never ignored
        llm.generate("x", SamplingParams(max_tokens=2, thinking_token_budget=3))
    params = SamplingParams(temperature=0, max_tokens=8, structured_outputs={"json": SCHEMA})
    ids = llm.chat([{"role": "user", "content": "x"}], params)[0].outputs[0].token_ids
    text = llm.tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("{")  # constrained from the first token


QWEN3_TEMPLATE = (  # Qwen3 style: the model opens its own thought; tools rendered Hermes-style
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}"
    "{% endfor %}</tools>\nCall one inside <tool_call></tool_call> tags.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'].split('</think>')[-1] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_thought_the_model_opens_then_a_tool_call(thinking_model_dir):
    """The first token may open a thought (here pushed by a logit bias on <think>); the
    budget closes it, and the answer is a valid call of the named tool."""
    from tokenmill.tools.formats import HERMES, detect_format
    from tokenmill.tools.parser import parse
    from tokenmill.tools.request import tool_use

    llm = _llm(thinking_model_dir, chat_template=QWEN3_TEMPLATE)
    markers = llm.engine.reasoning
    assert markers is not None and detect_format(QWEN3_TEMPLATE) is HERMES
    tool = {"type": "function", "function": {"name": "pick", "parameters": SCHEMA}}
    use = tool_use([tool], {"type": "function", "function": {"name": "pick"}}, False, HERMES, 8)
    assert use is not None
    start_id, end_id = markers.start_ids[0], markers.end_ids[0]
    params = SamplingParams(
        temperature=0, max_tokens=80, thinking_token_budget=3, logit_bias={start_id: 50.0},
        structured_outputs=use.constraint(),
    )  # fmt: skip
    messages = [{"role": "user", "content": "Pick a digit."}]
    out = llm.chat(messages, params, chat_template_kwargs=None)[0].outputs[0]
    ids = out.token_ids
    assert ids[0] == start_id and ids[4] == end_id  # opened, 3 thought tokens, closed
    answer = llm.tokenizer.decode(ids[5:], skip_special_tokens=False)
    parsed = parse(answer.replace("<|im_end|>", ""), HERMES, final=True)
    assert [c.name for c in parsed.calls] == ["pick"], answer
    jsonschema.validate(json.loads(parsed.calls[0].arguments), SCHEMA)


def test_the_server_streams_the_thought_and_the_answer_as_its_whole_response(
    thinking_model_dir,
):
    """Over HTTP on a real engine of this model: reasoning_content (a budget of 5), then a
    JSON answer; the streamed reasoning and content deltas add up to the whole response."""
    import asyncio

    from tests.unit.fake_engine import client_for, make_app, sse_events
    from tokenmill.engine.async_engine import AsyncEngine

    engine = AsyncEngine(_llm(thinking_model_dir).engine)
    body = {
        "messages": [{"role": "user", "content": "Pick a digit."}],
        "max_tokens": 60, "temperature": 0, "thinking_token_budget": 5,
        "guided_json": SCHEMA, "guided_whitespace_pattern": "",  # no whitespace loops
    }  # fmt: skip

    async def main() -> tuple[dict[str, Any], str]:
        await engine.start()
        try:
            async with client_for(make_app(engine)) as client:
                whole = (await client.post("/v1/chat/completions", json=body)).json()
                streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
                return whole, streamed.text
        finally:
            await engine.shutdown()

    whole, stream = asyncio.run(main())
    message = whole["choices"][0]["message"]
    assert message["reasoning_content"] and message["reasoning"] == message["reasoning_content"]
    assert whole["choices"][0]["finish_reason"] == "stop", whole
    jsonschema.validate(json.loads(message["content"]), SCHEMA)
    reasoning = content = ""
    for event in sse_events(stream)[:-1]:
        for choice in json.loads(event)["choices"]:
            reasoning += choice["delta"].get("reasoning_content") or ""
            content += choice["delta"].get("content") or ""
    assert (reasoning, content) == (message["reasoning_content"], message["content"])
