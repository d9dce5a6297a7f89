"""Chat templates: HF-compatible rendering, the sandbox, continue_final_message, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.tokenizer.chat_template import (
    RESERVED_VARIABLES,
    render_chat,
    render_chat_template,
    resolve_chat_template,
)
from tokenmill.tokenizer.template_sandbox import RenderBudget
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


@pytest.mark.parametrize("name", sorted(RESERVED_VARIABLES))
def test_kwargs_cannot_override_reserved_names(name: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        render_chat_template("{{ messages }}", CHAT, template_kwargs={name: []})
    assert info.value.param == "chat_template_kwargs" and info.value.status_code == 400
    assert name in info.value.message


def test_reserved_names_cover_what_the_renderer_and_hf_set() -> None:
    for name in ("messages", "tools", "documents", "add_generation_prompt", "bos_token",
                 "eos_token", "raise_exception", "strftime_now", "range", "namespace",
                 "tokenize"):  # fmt: skip
        assert name in RESERVED_VARIABLES


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


@pytest.mark.parametrize(
    "template",
    [
        "{{ cycler.__init__.__globals__.os }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ self._TemplateReference__context }}",  # would render as '' in a plain sandbox
        "{{ joiner.__init__.__globals__ }}",
        "{{ messages.__class__ }}",
        "{{ (range|attr('__init__')) }}",
    ],
)
def test_sandbox_blocks_reaching_python_internals(template: str) -> None:
    with pytest.raises(InvalidRequestError, match="unsafe") as info:
        render_chat_template(template, CHAT)
    assert info.value.param == "chat_template"


def test_a_gguf_with_a_malicious_template_loads_and_chat_is_a_400() -> None:
    # load_gguf_tokenizer keeps `tokenizer.chat_template` as text; nothing runs at load
    evil = "{{ cycler.__init__.__globals__.os.popen('id').read() }}"
    tokenizer = Tokenizer(
        hf=None, eos_token_ids=[2], chat_template=evil, bos_token="<s>", eos_token="</s>"
    )
    with pytest.raises(InvalidRequestError, match="unsafe") as info:
        render_chat(tokenizer, CHAT)
    assert info.value.status_code == 400
    assert render_chat(tokenizer, CHAT, chat_template="{{ bos_token }}ok") == "<s>ok"


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


SHORT = RenderBudget(max_seconds=1.0)


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        # loops with no output: only the time budget stops them
        ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
         "took over 1 s"),
        ("{% for i in range(10**9) %}{% endfor %}", "Range too big"),
        # exponential recursion (each call returns), and recursion without end
        ("{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(64) }}",
         "took over 1 s"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
        # output explosion, in many pieces or one
        ("{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}", "output over"),
        ("{{ 'x' * 10**9 }}", "chat template error"),
        ("{{ 'x'|center(999999999) }}", "chat template error"),
        ("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
         "{% endfor %}{{ ns.s|length }}", "chat template error"),
        # one C call whose output is exponential in what the template wrote
        ("{% set a = range(100000)|list %}{% set b = [a] * 100000 %}{{ b }}",
         "chat template error"),
    ],
)  # fmt: skip
def test_runaway_templates_are_stopped_quickly(template: str, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        render_chat_template(template, CHAT, budget=SHORT)
    assert info.value.param == "chat_template"
    assert render_chat_template("{{ messages[1].content }}", CHAT) == "Hi"  # a fresh renderer


def test_memory_budget() -> None:
    template = "{% set n = 400 * 1000 * 1000 %}{{ ('x' * n)|length }}"
    with pytest.raises(InvalidRequestError, match="over 200 MiB of memory"):
        render_chat_template(template, CHAT, budget=RenderBudget(max_memory_mib=200))
    assert render_chat_template(template, CHAT) == "400000000"  # under the default 1 GiB


def test_output_budget() -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert render_chat_template(template, CHAT, budget=RenderBudget(max_chars=8)) == "SHiHello"
    with pytest.raises(InvalidRequestError, match="output over 7 characters"):
        render_chat_template(template, CHAT, budget=RenderBudget(max_chars=7))
