"""Chat templates: HF-compatible rendering, the sandbox, continue_final_message, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.tokenizer.chat_template import (
    render_chat,
    render_chat_template,
    resolve_chat_template,
)
from tokenmill.tokenizer.tokenizer import Tokenizer

# SmolLM2-135M-Instruct's template, as stored in the bundled GGUF.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
]


def test_matches_transformers_on_a_real_template() -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    for add_generation_prompt in (True, False):
        for continue_final in (False, True):
            if add_generation_prompt and continue_final:
                continue
            ours = render_chat_template(
                SMOLLM2,
                CHAT,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final,
            )
            (theirs,), _ = render_jinja_template(
                [CHAT],
                chat_template=SMOLLM2,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final,
            )
            assert ours == theirs


def test_continue_final_message_cuts_the_end_of_turn() -> None:
    text = render_chat_template(
        SMOLLM2, CHAT, add_generation_prompt=False, continue_final_message=True
    )
    assert text.endswith("<|im_start|>assistant\nHello")


def test_hf_globals_filters_and_whitespace() -> None:
    template = (
        "{% if true %}\n  {{ messages | tojson }}\n{% endif %}"
        "{{ bos_token }}{{ eos_token }}{{ strftime_now('%Y')|length }}"
    )
    text = render_chat_template(
        template, [{"role": "user", "content": "é<b>"}], bos_token="<s>", eos_token="</s>"
    )
    # trim_blocks/lstrip_blocks drop the block lines' whitespace; tojson keeps é and <b> as is
    assert text == '  [{"role": "user", "content": "é<b>"}]\n<s></s>4'


def test_documents_tools_and_kwargs_reach_the_template() -> None:
    template = "{{ documents[0].title }}|{{ tools }}|{{ flavour }}|{{ add_generation_prompt }}"
    text = render_chat_template(
        template,
        CHAT,
        documents=[{"title": "T", "text": "x"}],
        template_kwargs={"flavour": "mint"},
    )
    assert text == "T|None|mint|True"


@pytest.mark.parametrize("name", ["messages", "add_generation_prompt"])
def test_kwargs_cannot_override_the_conversation(name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        render_chat_template("{{ messages }}", CHAT, template_kwargs={name: []})
    assert info.value.param == "chat_template_kwargs" and info.value.status_code == 400


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{% for %}", "syntax"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ messages.append(1) }}", "unsafe"),  # the environment is immutable
        ("{{ 'a' + 1 }}", "TypeError"),
    ],
)
def test_template_failures_are_400_with_the_reason(template: str, fragment: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        render_chat_template(template, CHAT)
    assert info.value.status_code == 400
    assert fragment in info.value.message


def test_sandbox_blocks_reaching_python_internals() -> None:
    template = "{{ cycler.__init__.__globals__.os }}"
    with pytest.raises(InvalidRequestError):
        render_chat_template(template, CHAT)


def test_continue_final_message_needs_text() -> None:
    with pytest.raises(InvalidRequestError):
        render_chat_template(SMOLLM2, [], continue_final_message=True)
    with pytest.raises(InvalidRequestError, match="drops the final message"):
        render_chat_template("nothing", CHAT, continue_final_message=True)


def test_render_chat_picks_the_template() -> None:
    tokenizer = Tokenizer(hf=None, eos_token_ids=[2], chat_template=None, bos_token="<s>")
    with pytest.raises(InvalidRequestError, match="no chat template; pass --chat-template"):
        render_chat(tokenizer, CHAT)
    assert render_chat(tokenizer, CHAT, chat_template="{{ bos_token }}!") == "<s>!"
    tokenizer.chat_template = "model's"
    assert render_chat(tokenizer, CHAT) == "model's"


def test_resolve_chat_template(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages }}\n")
    assert resolve_chat_template(str(path)) == "{{ messages }}\n"
    assert resolve_chat_template("{{ a }}\\n{{ b }}") == "{{ a }}\n{{ b }}"
    with pytest.raises(ValueError, match="looks like a file path"):
        resolve_chat_template(str(tmp_path / "missing.jinja"))


def test_runaway_templates_are_stopped() -> None:
    huge = (
        "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxx{% endfor %}{% endfor %}"
    )
    with pytest.raises(InvalidRequestError, match="characters or"):
        render_chat_template(huge, CHAT)
