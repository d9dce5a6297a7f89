"""A vLLM offline script runs unchanged: LLM(...)'s vLLM options work, warn or are refused
with a reason; vLLM's method arguments, SamplingParams forms and result attributes."""

from __future__ import annotations

import logging

import pytest
import torch

from tokenmill import (
    LLM,
    GuidedDecodingParams,
    PoolingParams,
    SamplingParams,
    StructuredOutputsParams,
    TokensPrompt,
)
from tokenmill.errors import InvalidRequestError
from tokenmill.vllm_options import VLLM_FLAGS, RefusedOption, check_vllm_options, option_name

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def test_vllm_options_work_warn_or_are_refused_by_the_servers_table() -> None:
    kwargs = {"trust_remote_code": True, "swap_space": 4, "enable_chunked_prefill": True,
              "disable_log_stats": True, "task": "embed", "cpu_offload_gb": 0,
              "enable_lora": False, "load_format": "auto", "max_model_len": 64}  # fmt: skip
    warnings = check_vllm_options("m.gguf", kwargs)
    assert kwargs == {"max_model_len": 64}  # tokenmill's own options stay for EngineConfig
    assert [w.split(" has no effect")[0] for w in warnings] == [
        "trust_remote_code=True",
        "swap_space=4",
    ]
    (warning,) = check_vllm_options(None, {"enable_chunked_prefill": False})
    assert warning.startswith("enable_chunked_prefill=False has no effect here")
    aliased = {"kv_cache_memory_bytes": 1 << 30}
    assert check_vllm_options(None, aliased) == [] and aliased == {"kv_cache_memory": 1 << 30}
    with pytest.raises(RefusedOption, match="enable_lora=True: LoRA adapters"):
        check_vllm_options(None, {"enable_lora": True})
    with pytest.raises(RefusedOption, match="hf_overrides="):
        check_vllm_options(None, {"hf_overrides": {"a": 1}})
    with pytest.raises(RefusedOption, match="tokenizer='other'"):
        check_vllm_options("model-dir", {"tokenizer": "other"})
    assert check_vllm_options("model-dir", {"tokenizer": "./model-dir"}) == []
    (warning,) = check_vllm_options("x.gguf", {"tokenizer": "org/base"})
    assert "the GGUF file's own tokenizer" in warning


def test_no_vllm_option_shadows_an_engine_option() -> None:
    from dataclasses import fields

    from tokenmill.config import EngineConfig

    config = EngineConfig()
    engine = {f.name for s in (config.model, config.cache, config.scheduler,
              config.structured_outputs, config.parallel, config.speculative)
              for f in fields(s)}  # fmt: skip
    assert not engine & {option_name(flag) for flag in VLLM_FLAGS}


def test_a_vllm_script_runs(bundled_gguf_path: str, caplog, capsys) -> None:
    with caplog.at_level(logging.WARNING, logger="tokenmill.llm"):
        llm = LLM(bundled_gguf_path, tokenizer="HuggingFaceTB/SmolLM2-135M-Instruct",
                  trust_remote_code=True, dtype="half", seed=None, max_model_len=256,
                  kv_cache_memory=32 << 20, enable_chunked_prefill=True)  # fmt: skip
    assert "trust_remote_code=True has no effect here" in caplog.text
    assert llm.llm_engine is llm.engine and llm.engine.config.model.dtype == "float16"
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert isinstance(text, str) and tokenizer.eos_token_id is not None
    out = llm.generate([TokensPrompt(prompt_token_ids=[1, 2, 3])], GREEDY, lora_request=None)
    assert out[0].metrics is None and out[0].lora_request is None
    assert out[0].outputs[0].finished() and len(out[0].outputs[0].token_ids) == 4
    assert "Generating" in capsys.readouterr().err  # vLLM's progress bar, by default
    with pytest.raises(ValueError, match="LoRA"):
        llm.generate("x", GREEDY, lora_request=object())
    # text parts joined for a text-only template, developer as system: what the server does
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}]  # fmt: skip
    plain = [{"role": "system", "content": "Be brief."},
             {"role": "user", "content": "What is 2+2?"}]  # fmt: skip
    got = llm.chat(parts, GREEDY)[0]
    assert got.outputs[0].token_ids == llm.chat(plain, GREEDY)[0].outputs[0].token_ids
    assert got.prompt == llm.chat(plain, GREEDY, None, None, None, "string")[0].prompt
    with pytest.raises(ValueError, match="chat_template_content_format"):
        llm.chat(plain, GREEDY, chat_template_content_format="jinja")
    with pytest.raises(ValueError, match="embeddings only"):
        llm.encode("x", pooling_task="classify")
    cut = llm.embed("one two three four five six", truncate_prompt_tokens=2)[0]
    assert len(cut.prompt_token_ids) == 2
    # the exported PoolingParams is the engine's: normalize=False reaches the pooler
    raw = llm.embed("one two", PoolingParams(normalize=False))[0].outputs.data
    unit = llm.embed("one two", PoolingParams(normalize=True))[0].outputs.data
    assert torch.allclose(raw / raw.norm(), unit) and abs(float(raw.norm()) - 1.0) > 1e-3


def test_llm_seed_none_varies_and_dtype_objects_are_names(bundled_gguf_path: str) -> None:
    seeds = []
    for _ in range(2):
        llm = LLM(bundled_gguf_path, seed=None, dtype=torch.float32, max_model_len=128,
                  kv_cache_memory=16 << 20)  # fmt: skip
        assert llm.engine.config.model.dtype == "float32"
        seeds.append(llm.engine.config.model.seed)
    assert seeds[0] != seeds[1]


def test_sampling_params_take_vllms_forms() -> None:
    params = SamplingParams(stop=None, stop_token_ids=None, logit_bias=None, seed=-1)
    assert (params.stop, params.stop_token_ids, params.logit_bias, params.seed) == (
        [],
        [],
        {},
        None,
    )
    spec = SamplingParams(structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))
    assert spec.structured_outputs is not None and spec.structured_outputs.kind == "choice"
    old = SamplingParams(guided_decoding=GuidedDecodingParams(regex=r"\d+"))
    assert old.structured_outputs is not None and old.structured_outputs.kind == "regex"
    assert old.guided_decoding is None
    as_dict = SamplingParams(structured_outputs={"json": {"type": "object"}})
    assert as_dict.structured_outputs is not None and as_dict.structured_outputs.kind == "json"
    copy = params.clone()
    assert copy == params and copy is not params
    assert SamplingParams(extra_args={"plugin": 1}, detokenize=True).extra_args == {"plugin": 1}
    with pytest.raises(InvalidRequestError, match="detokenize=False"):
        SamplingParams(detokenize=False, stop=["."])
    with pytest.raises(InvalidRequestError, match="detokenize=False"):
        SamplingParams(detokenize=False, use_beam_search=True, n=2)
    with pytest.raises(InvalidRequestError, match="logits_processors"):
        SamplingParams(logits_processors=[lambda ids, logits: logits])
    with pytest.raises(InvalidRequestError, match="not both"):
        SamplingParams(guided_decoding={"regex": "a"}, structured_outputs={"regex": "b"})


def test_detokenize_false_gives_the_same_tokens_without_text(default_llm) -> None:
    """vLLM's detokenize=False: the same token ids and logprobs, no text, no decoded tokens
    (the prompt's logprobs likewise); stop_token_ids still stop."""
    prompt = "The capital of France is"
    kwargs = dict(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    (text,) = default_llm.generate(prompt, SamplingParams(**kwargs), use_tqdm=False)
    (ids,) = default_llm.generate(prompt, SamplingParams(**kwargs, detokenize=False),
                                  use_tqdm=False)  # fmt: skip
    assert text.outputs[0].text and ids.outputs[0].text == ""
    assert ids.outputs[0].token_ids == text.outputs[0].token_ids
    for got, want in zip(ids.outputs[0].logprobs, text.outputs[0].logprobs, strict=True):
        assert {t: p.logprob for t, p in got.items()} == {t: p.logprob for t, p in want.items()}
        assert all(p.decoded_token is None for p in got.values())
        assert all(p.decoded_token for p in want.values())
    assert ids.prompt_logprobs is not None
    assert all(p.decoded_token is None for e in ids.prompt_logprobs[1:] for p in e.values())
    greedy = text.outputs[0].token_ids
    stop_at = greedy[3]
    (stopped,) = default_llm.generate(prompt, SamplingParams(
        temperature=0, max_tokens=8, stop_token_ids=[stop_at], detokenize=False),
        use_tqdm=False)  # fmt: skip
    assert stopped.outputs[0].token_ids == greedy[: greedy.index(stop_at) + 1]
    assert stopped.outputs[0].finish_reason == "stop"


def test_beam_search_is_vllms_entry_point_over_the_same_search(default_llm) -> None:
    from tokenmill import BeamSearchParams

    prompt = "The capital of France is"
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True)
    (out,) = default_llm.beam_search([{"prompt": prompt}], params)
    (alone,) = default_llm.beam_search(prompt, params)  # (one prompt, not its characters)
    assert alone == out
    want = default_llm.generate(
        prompt, SamplingParams(n=3, use_beam_search=True, max_tokens=5, ignore_eos=True)
    )[0]
    assert len(out.sequences) == 3
    for beam, expected in zip(out.sequences, want.outputs, strict=True):
        assert beam.tokens == want.prompt_token_ids + expected.token_ids
        assert beam.cum_logprob == expected.cumulative_logprob
        assert beam.text.endswith(expected.text) and prompt in beam.text
    scores = [b.cum_logprob for b in out.sequences]  # (equal lengths: by logprob)
    assert scores == sorted(scores, reverse=True)


def test_llm_score_is_the_cosine_of_the_embeddings(default_llm) -> None:
    """vLLM's LLM.score with an embedding model: one prompt against many, or pairwise; the
    cosine of embed()'s vectors; vLLM's output types importable from tokenmill."""
    from tokenmill import CompletionOutput, RequestOutput, ScoringRequestOutput

    texts = ["What is the capital of France?", "Paris is the capital of France.", "Cats purr."]
    vectors = [o.outputs.data for o in default_llm.embed(texts, use_tqdm=False)]
    cosines = [torch.nn.functional.cosine_similarity(vectors[0], v, dim=0).item()
               for v in vectors[1:]]  # fmt: skip
    one_to_many = default_llm.score(texts[0], texts[1:], use_tqdm=False)
    assert all(isinstance(o, ScoringRequestOutput) for o in one_to_many)
    assert [o.outputs.score for o in one_to_many] == pytest.approx(cosines, abs=1e-5)
    tokenizer = default_llm.get_tokenizer()
    pad = [] if tokenizer.pad_token_id is None else [tokenizer.pad_token_id]  # (as vLLM's)
    assert one_to_many[0].prompt_token_ids == (
        tokenizer.encode(texts[0]) + pad + tokenizer.encode(texts[1]))  # fmt: skip
    assert "_" in one_to_many[0].request_id
    pairwise = default_llm.score([texts[0], texts[2]], [texts[1], texts[2]], use_tqdm=False)
    assert [o.outputs.score for o in pairwise] == pytest.approx([cosines[0], 1.0], abs=1e-5)
    with pytest.raises(InvalidRequestError, match="1:1, 1:N or N:N"):
        default_llm.score(texts[:2], texts, use_tqdm=False)
    for method in (default_llm.classify, default_llm.reward):  # the reason, not AttributeError
        with pytest.raises(NotImplementedError, match="classification and reward models"):
            method(texts)
    (out,) = default_llm.generate("Hi", GREEDY, use_tqdm=False)
    assert isinstance(out, RequestOutput) and isinstance(out.outputs[0], CompletionOutput)
