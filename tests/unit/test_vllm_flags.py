"""`vllm serve` flags: each works, is ignored with a warning, or stops with what tokenmill
does instead; an unknown flag's error names the closest known one; --config YAML."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import httpx
import pytest

from tests.unit.fake_engine import client_for, make_app
from tokenmill.server.cli import (
    StartupError,
    _engine_config,
    _server_settings,
    build_parser,
    with_config_file,
)
from tokenmill.server.settings import ServerSettings
from tokenmill.server.vllm_flags import VLLM_FLAGS, RefusedFlag, check_vllm_flags

# a command line as vLLM users write it; every flag here starts the server
WORKS = [
    "--model", "some-model", "--disable-log-stats", "--enable-chunked-prefill",
    "--tensor-parallel-size", "1", "--pipeline-parallel-size", "1", "-dp", "1",
    "--distributed-executor-backend", "mp",
    "--scheduling-policy", "priority", "--load-format", "auto", "--tokenizer-mode", "auto",
    "--response-role", "assistant", "--chat-template-content-format", "auto",
    "--enable-log-requests", "--cpu-offload-gb", "0",
    "--structured-outputs-config.backend", "outlines", "--return-tokens-as-token-ids",
    "--kv-cache-dtype", "fp8_e5m2", "--enforce-eager", "--cuda-graph-sizes", "1", "4", "16",
    "--max-seq-len-to-capture", "4k", "--kv-cache-memory-bytes", "1GiB",
    "--prefix-caching-hash-algo", "sha256", "--model-impl", "auto", "--api-server-count", "1",
    "--logprobs-mode", "raw_logprobs", "--mm-processor-cache-gb", "0",
    "--enable-force-include-usage", "--disable-uvicorn-access-log",
    "--enable-server-load-tracking", "--default-chat-template-kwargs", '{"enable_thinking": false}',
]  # fmt: skip
IGNORED = [
    "--trust-remote-code", "--swap-space", "4", "--download-dir", "/tmp/x",
    "--compilation-config", "3",
    "--no-enable-chunked-prefill", "--disable-frontend-multiprocessing",
    "--max-num-partial-prefills", "2", "--hf-token", "hf_x", "--max-log-len", "100",
    "--preemption-mode", "swap", "--chat-template-content-format", "openai",
    "--async-scheduling", "--enable-log-outputs", "--log-config-file", "log.json",
    "--model-impl", "transformers", "--api-server-count", "4",
    "--enable-expert-parallel", "--data-parallel-size-local", "2",
    "--prefix-caching-hash-algo", "builtin", "--mm-processor-cache-gb", "4",
]  # fmt: skip
REFUSED = [
    ("--enable-lora", "merge_and_unload"),
    ("--lora-modules a=b", "LoRA"),
    ("--revision main", "downloads nothing"),
    ("--tokenizer other/dir", "tokenizer in the model's directory"),
    ("--kv-transfer-config {}", "disaggregated"),
    ("--calculate-kv-scales", "scale of 1"),
    ("--max-cpu-loras 4", "LoRA"),
    ("--enable-sleep-mode", "stop the server"),
    ("--logits-processor-pattern .*", "no logits processors"),
    ("--tool-parser-plugin p.py", "--tool-call-parser"),
    ("--logprobs-mode processed_logprobs", "raw logits"),
]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_flags_that_work_start_quietly_and_map_onto_tokenmills() -> None:
    args = parse(*WORKS)
    assert check_vllm_flags(args) == []
    settings = _server_settings(args)
    assert isinstance(settings, ServerSettings)
    assert args.model == "some-model" and args.guided_decoding_backend == "outlines"
    assert args.scheduling_policy == "priority" and settings.return_tokens_as_token_ids
    assert settings.force_include_usage
    assert settings.default_chat_template_kwargs == {"enable_thinking": False}
    assert args.disable_uvicorn_access_log
    assert settings.log_stats_interval_s is None  # --disable-log-stats: no stats line
    config = _engine_config(args)
    assert config.cache.kv_cache_dtype == "fp8_e5m2" and config.cache.kv_cache_memory == 1 << 30
    assert config.model.enforce_eager and config.model.cuda_graph_sizes == [1, 4, 16]
    assert config.model.max_seq_len_to_capture == 4096
    defaults = _engine_config(parse()).model
    assert not defaults.enforce_eager and defaults.cuda_graph_sizes is None
    assert defaults.max_seq_len_to_capture == 8192
    for name in ("fp8", "fp8_e4m3", "bfloat16"):  # vLLM's other names (e4m3: scale 1)
        assert _engine_config(parse("--kv-cache-dtype", name)).cache.kv_cache_dtype == name


def test_stats_line_interval_is_read_only_where_the_line_is_on(monkeypatch) -> None:
    monkeypatch.delenv("VLLM_LOG_STATS_INTERVAL", raising=False)
    assert _server_settings(parse()).log_stats_interval_s == 10.0  # vLLM's default
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "soon")
    assert _server_settings(parse("--disable-log-stats")).log_stats_interval_s is None
    with pytest.raises(StartupError, match="VLLM_LOG_STATS_INTERVAL"):
        _server_settings(parse())
    monkeypatch.setenv("VLLM_LOG_STATS_INTERVAL", "0.5")
    assert _server_settings(parse()).log_stats_interval_s == 0.5


def test_scheduling_policy_and_token_ids_defaults_and_bad_values(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse()
    assert args.scheduling_policy == "fcfs"
    assert _server_settings(args).return_tokens_as_token_ids is False
    with pytest.raises(SystemExit):
        parse("--scheduling-policy", "lifo")
    assert "invalid choice: 'lifo'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--cuda-graph-sizes", "8", "0")
    assert "not a positive whole number: '0'" in capsys.readouterr().err


def test_flags_with_no_effect_here_each_get_one_warning() -> None:
    args = parse(*IGNORED)
    warnings = check_vllm_flags(args)
    assert len(warnings) == 20, warnings
    assert any(w.startswith("--compilation-config 3 has no effect here") for w in warnings)
    assert any(w.startswith("--no-enable-chunked-prefill has no effect") for w in warnings)
    assert any(w.startswith("--trust-remote-code has no effect here: ") for w in warnings)
    assert any(w.startswith("--swap-space 4 has no effect here: ") for w in warnings)
    assert any("--chat-template-content-format openai" in w for w in warnings)


@pytest.mark.parametrize(("flag", "says"), REFUSED)
def test_flags_that_cannot_work_stop_with_what_to_do_instead(flag: str, says: str) -> None:
    args = parse(*flag.split())
    with pytest.raises(RefusedFlag, match=says):
        check_vllm_flags(args)
    with pytest.raises(StartupError, match=says):
        _server_settings(parse(*flag.split()))


def test_tokenizer_works_naming_the_model_and_beside_a_gguf_file(tmp_path: Path) -> None:
    assert check_vllm_flags(parse("./model-dir", "--tokenizer", "model-dir")) == []
    warnings = check_vllm_flags(parse("m.gguf", "--tokenizer", "TinyLlama/TinyLlama-1.1B"))
    assert warnings == [
        "--tokenizer TinyLlama/TinyLlama-1.1B has no effect here: the GGUF file's own "
        "tokenizer is used"
    ]
    with pytest.raises(RefusedFlag, match="tokenizer in the model's directory"):
        check_vllm_flags(parse("model-dir", "--tokenizer", "other-dir"))


def test_structured_outputs_backend_auto_is_the_default_and_guidance_is_named() -> None:
    for argv in (
        ["--structured-outputs-config.backend", "auto"],
        ["--structured-outputs-config", '{"backend": "auto"}'],
        ["--guided-decoding-backend", "auto"],
    ):
        args = parse(*argv)
        _server_settings(args)
        assert args.guided_decoding_backend == "xgrammar", argv
    args = parse("--guided-decoding-backend", "lm_format_enforcer")
    _server_settings(args)
    assert args.guided_decoding_backend == "lm-format-enforcer"
    with pytest.raises(StartupError, match="'guidance' \\(llguidance\\) is not part of"):
        _server_settings(parse("--structured-outputs-config.backend", "guidance"))


def test_default_chat_template_kwargs_may_not_set_the_renderers_variables() -> None:
    with pytest.raises(StartupError, match="may not set add_generation_prompt, tools"):
        _server_settings(
            parse("--default-chat-template-kwargs", '{"tools": [], "add_generation_prompt": 1}')
        )


def test_every_flag_of_the_table_is_documented() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "server.md").read_text()
    for flag in VLLM_FLAGS:
        assert f"`{flag.names[0]}`" in doc, flag.names[0]


def test_an_unknown_flag_names_the_closest_known_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--max-num-seq", "4", "--tensor-paralel-size", "1")
    err = capsys.readouterr().err
    assert "--tensor-paralel-size: did you mean --tensor-parallel-size?" in err
    assert "unrecognized arguments" in err


def test_structured_outputs_config_json_and_bad_backends() -> None:
    args = parse("--structured-outputs-config", '{"backend": "lm-format-enforcer"}')
    check_vllm_flags(args)
    assert args.guided_decoding_backend == "lm-format-enforcer"
    with pytest.raises(RefusedFlag, match="only 'backend'"):
        check_vllm_flags(parse("--structured-outputs-config", '{"backend": "x", "y": 1}'))
    with pytest.raises(StartupError, match="unknown structured outputs backend 'nope'"):
        _server_settings(parse("--structured-outputs-config.backend", "nope"))


def test_config_yaml_gives_flags_the_command_line_overrides(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "model: some-model\nport: 9001\nmax_num_seqs: 8\nenable-prefix-caching: false\n"
        "served-model-name: [a, b]\ntrust-remote-code: true\n"
        "enable_request_id_headers: false\nenable-chunked-prefill: false\n"
    )
    argv = with_config_file(["serve", "--config", str(config), "--port", "9002"])
    args = build_parser().parse_args(argv)
    assert (args.model_flag, args.port, args.max_num_seqs) == ("some-model", 9002, 8)
    assert args.enable_prefix_caching is False and args.served_model_name == ["a", "b"]
    # a switch without a --no- form, off: its default; with one: that form
    assert args.enable_request_id_headers is False and args.vllm_enable_chunked_prefill is False
    assert check_vllm_flags(args)  # trust-remote-code: its warning
    with pytest.raises(StartupError, match="cannot read --config"):
        with_config_file(["serve", "--config", str(tmp_path / "missing.yaml")])


def test_several_api_keys_each_open_the_api() -> None:
    args = parse("--api-key", "k1", "k2", "--api-key", "k3")
    settings = _server_settings(args)
    assert settings.api_keys == ("k1", "k2", "k3")


async def _get(app: object, path: str, **headers: str) -> httpx.Response:
    async with client_for(app) as client:
        return await client.get(path, headers=headers)


@pytest.mark.anyio
async def test_keys_request_ids_and_docs_on_a_running_app() -> None:
    app = make_app(api_key=["k1", "k2"], request_id_headers=True, docs=False)
    for key in ("k1", "k2"):
        assert (await _get(app, "/v1/models", authorization=f"Bearer {key}")).status_code == 200
    assert (await _get(app, "/v1/models", authorization="Bearer k3")).status_code == 401
    echoed = await _get(app, "/health", **{"x-request-id": "abc-1"})
    assert echoed.headers["x-request-id"] == "abc-1"
    assert len((await _get(app, "/health")).headers["x-request-id"]) == 32
    assert (await _get(app, "/docs")).status_code == 404
    assert (await _get(app, "/openapi.json")).status_code == 404
    plain = make_app()
    assert (await _get(plain, "/openapi.json")).status_code == 200
    assert "x-request-id" not in (await _get(plain, "/health")).headers


_UNHONOURED = [
    ({"vllm_xargs": {"a": 1}}, "vllm_xargs"),
    ({"kv_transfer_params": {"a": 1}}, "kv_transfer_params"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(("fields", "param"), _UNHONOURED)
async def test_vllm_request_fields_not_honoured_yet_are_400_naming_them(
    fields: dict[str, object], param: str
) -> None:
    """vLLM's newer request fields are never silently ignored: at their default they pass,
    used they are a 400 naming the field, on completions and chat alike."""
    from tests.unit.fake_engine import assert_error

    async with client_for(make_app()) as client:
        completion = {"prompt": "hi", "max_tokens": 2, **fields}
        assert_error(await client.post("/v1/completions", json=completion), 400, param)
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
        assert_error(await client.post("/v1/chat/completions", json=chat), 400, param)
        effort = {**chat, "reasoning_effort": "low"}
        effort.pop(next(iter(fields)))
        assert_error(
            await client.post("/v1/chat/completions", json=effort), 400, "reasoning_effort"
        )
        defaults = {"prompt": "hi", "max_tokens": 2, "priority": 0, "bad_words": [],
                    "return_token_ids": False, "stream_options": None}  # fmt: skip
        assert (await client.post("/v1/completions", json=defaults)).status_code == 200


@pytest.mark.anyio
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_continuous_usage_stats_put_usage_in_every_chunk(path: str) -> None:
    from tests.unit.fake_engine import sse_events

    body = {"max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    body |= (
        {"prompt": "hi"}
        if "chat" not in path
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    async with client_for(make_app()) as client:
        events = sse_events((await client.post(path, json=body)).text)
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    assert all(c["usage"] is not None for c in chunks)
    completion = [c["usage"]["completion_tokens"] for c in chunks]
    assert completion == sorted(completion) and completion[-1] == 3
    assert "prompt_tokens_details" not in chunks[-1]["usage"]  # only with the flag


@pytest.mark.anyio
async def test_return_token_ids_gives_the_prompts_and_each_choices_ids() -> None:
    """As vLLM: the prompt's ids and each choice's output ids; streamed, the prompt's in the
    first chunk and the new ids in each, adding up to the non-streamed ones."""
    from tests.unit.fake_engine import sse_events

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with client_for(make_app()) as client:
        for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 3}),
                           ("/v1/chat/completions", chat)):  # fmt: skip
            body = {**body, "return_token_ids": True, "temperature": 0}
            whole = (await client.post(path, json=body)).json()
            choice = whole["choices"][0]
            prompt_ids = choice.get("prompt_token_ids") or whole.get("prompt_token_ids")
            assert prompt_ids and len(prompt_ids) == whole["usage"]["prompt_tokens"]
            assert len(choice["token_ids"]) == whole["usage"]["completion_tokens"] == 3
            events = sse_events((await client.post(path, json={**body, "stream": True})).text)
            chunks = [json.loads(e) for e in events if e != "[DONE]"]
            streamed = [i for c in chunks for ch in c["choices"] for i in ch.get("token_ids", [])]
            assert streamed == choice["token_ids"]
            first = chunks[0].get("prompt_token_ids") or chunks[0]["choices"][0]["prompt_token_ids"]
            assert first == prompt_ids
            plain = (await client.post(path, json={**body, "return_token_ids": False})).json()
            assert "token_ids" not in plain["choices"][0]


@pytest.mark.anyio
async def test_truncate_prompt_tokens_on_chat_keeps_the_rendered_prompts_last_tokens() -> None:
    from tests.unit.fake_engine import FakeAsyncEngine

    messages = [{"role": "user", "content": "hello there friend"}]
    engine = FakeAsyncEngine()
    async with client_for(make_app(engine)) as client:
        whole = await client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 1}
        )
        full_ids = engine.requests[-1][0]
        body = {"messages": messages, "max_tokens": 1, "truncate_prompt_tokens": 3}
        cut = (await client.post("/v1/chat/completions", json=body)).json()
    assert whole.json()["usage"]["prompt_tokens"] == len(full_ids) > 3
    assert engine.requests[-1][0] == full_ids[-3:]
    assert cut["usage"]["prompt_tokens"] == 3


@pytest.mark.anyio
async def test_truncate_prompt_tokens_minus_one_keeps_what_fits_in_the_context() -> None:
    """vLLM's -1: the prompt's last max_model_len tokens (an embedding of a long text);
    0 and below -1 are 400s naming the field."""
    from tests.unit.fake_engine import FakeAsyncEngine

    engine = FakeAsyncEngine()  # max_model_len 64; a byte per token
    text = "x" * 100
    async with client_for(make_app(engine)) as client:
        too_long = await client.post("/v1/embeddings", json={"input": text})
        assert too_long.status_code == 400
        kept = await client.post(
            "/v1/embeddings", json={"input": text, "truncate_prompt_tokens": -1}
        )
        assert kept.status_code == 200, kept.text
        assert kept.json()["usage"]["prompt_tokens"] == engine.max_model_len
        for bad in (0, -2):
            response = await client.post(
                "/v1/embeddings", json={"input": text, "truncate_prompt_tokens": bad}
            )
            assert response.status_code == 400
            assert "truncate_prompt_tokens" in response.json()["error"]["message"]
