"""Speculative decoding on the bundled model (the CPU default: GGUF blocks through the native
kernels): the output is the same as without it - greedy bit for bit with logprobs, seeded
sampling token for token - batched or alone, under preemption, prefix-cache hits, stop
strings and structured outputs. Each test also checks that guesses were made and kept,
so none passes with speculation silently off."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.sampling_params import RequestOutputKind
from tokenmill.spec_decode.speculator import Speculator

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
        "prompt_lookup_max": 3}  # fmt: skip
PASSAGE = (
    "The keeper rose before dawn to trim the wick and polish the great lens, which was "
    "taller than he was and made of more than a hundred pieces of curved glass set in brass."
)
PROMPTS = [
    f"Copy this sentence exactly.\nSentence: {PASSAGE}\nCopy: {PASSAGE[:40]}",
    "one two three four five one two three four five one two three",
    "def add(a, b):\n    return a + b\n\n\ndef add_three(a, b, c):\n    return",
    "The capital of France is",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
WITH_LOGPROBS = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2)


def tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def with_logprobs(outputs) -> list[tuple[list[int], list[dict[int, float]]]]:
    return [
        (o.outputs[0].token_ids, [{t: p.logprob for t, p in d.items()} for d in o.outputs[0].logprobs])
        for o in outputs
    ]  # fmt: skip


@pytest.fixture(scope="module")
def plain(default_llm):
    return default_llm


@pytest.fixture(scope="module")
def spec(bundled_gguf_path):
    return LLM(bundled_gguf_path, kv_cache_memory=64 << 20, speculative_config=SPEC)


@pytest.fixture(scope="module")
def alone(plain):
    return [with_logprobs(plain.generate([p], WITH_LOGPROBS))[0] for p in PROMPTS]


class Accepted:
    """Guesses kept by an engine while the block runs."""

    def __init__(self, llm: LLM):
        self.speculator = llm.engine.core.speculator
        assert self.speculator is not None

    def __enter__(self) -> Accepted:
        self.before = self.speculator.counts.num_accepted_tokens
        return self

    def __exit__(self, *exc: object) -> None:
        self.count = self.speculator.counts.num_accepted_tokens - self.before


def assert_all_blocks_free(llm: LLM) -> None:
    pool = llm.engine.core.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_greedy_output_and_logprobs_are_identical_bit_for_bit(spec, alone):
    with Accepted(spec) as accepted:
        ours = [with_logprobs(spec.generate([p], WITH_LOGPROBS))[0] for p in PROMPTS]
    assert ours == alone
    assert accepted.count > 20
    with Accepted(spec) as accepted:  # no logprobs: every row's argmax at once
        fast = [tokens(spec.generate([p], GREEDY))[0] for p in PROMPTS]
    assert fast == [a[0] for a in alone]
    assert accepted.count > 20
    assert_all_blocks_free(spec)


def test_batched_equals_alone(spec, alone):
    with Accepted(spec) as accepted:
        assert with_logprobs(spec.generate(PROMPTS, WITH_LOGPROBS)) == alone
    assert accepted.count > 20
    assert_all_blocks_free(spec)


def test_preemption_with_speculation(bundled_gguf_path, alone):
    # 4 x (up to ~80 tokens) need ~20 blocks; 8 blocks of 16 force preemption
    itemsize = 2  # the float16 cache of the GGUF default
    small = LLM(bundled_gguf_path, kv_cache_memory=8 * 16 * 2 * 30 * 3 * 64 * itemsize,
                max_model_len=128, speculative_config=SPEC)  # fmt: skip
    assert small.engine.core.info.num_blocks == 8
    with Accepted(small) as accepted:
        assert with_logprobs(small.generate(PROMPTS, WITH_LOGPROBS)) == alone
    assert small.engine.core.scheduler.num_preemptions > 0
    assert accepted.count > 20
    assert_all_blocks_free(small)


def test_prefix_cache_hits_with_speculation(spec, plain):
    prefix = f"Read this and answer.\n{PASSAGE}\n{PASSAGE}\n"
    prompts = [prefix + "What did the keeper polish?", prefix + "Copy the text again:"]
    expected = tokens(plain.generate(prompts, GREEDY))
    spec.generate(prompts[:1], GREEDY)  # caches the prefix (guessed tokens' blocks too)
    with Accepted(spec) as accepted:
        warm = spec.generate(prompts, GREEDY)
    assert all(o.num_cached_tokens >= 32 for o in warm)
    assert tokens(warm) == expected
    assert accepted.count > 0
    assert_all_blocks_free(spec)


def assert_seeded_sampling_unchanged(llm: LLM, plain: LLM) -> None:
    """Seeded sampling with a penalty draws the same tokens and logprobs, guesses kept."""
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=11, max_tokens=40, ignore_eos=True,
                            frequency_penalty=0.2, logprobs=1)  # fmt: skip
    expected = with_logprobs(plain.generate(PROMPTS[:2], params))
    with Accepted(llm) as accepted:
        assert with_logprobs(llm.generate(PROMPTS[:2], params)) == expected
    assert accepted.count > 0


def test_seeded_sampling_with_penalties_is_the_same_with_speculation(spec, plain):
    assert_seeded_sampling_unchanged(spec, plain)


def test_stop_strings_cut_accepted_guesses_as_without_them(spec, plain):
    params = SamplingParams(temperature=0.0, max_tokens=40, stop=[" three five one"], logprobs=1)
    expected = plain.generate(PROMPTS[1:2], params)[0].outputs[0]
    with Accepted(spec) as accepted:
        ours = spec.generate(PROMPTS[1:2], params)[0].outputs[0]
    assert accepted.count > 0
    assert (ours.text, ours.token_ids, ours.finish_reason, ours.stop_reason) == (
        expected.text, expected.token_ids, "stop", " three five one",
    )  # fmt: skip
    assert len(ours.logprobs) == len(ours.token_ids)
    assert ours.cumulative_logprob == pytest.approx(expected.cumulative_logprob, abs=1e-6)
    # max_tokens ending the request on a token after the stop string's, in the same step
    for max_tokens in range(6, 12):  # (8-11 end it on length within the stop string's step)
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, stop=[" two three five one two"]
        )
        want = plain.generate(PROMPTS[1:2], params)[0].outputs[0]
        got = spec.generate(PROMPTS[1:2], params)[0].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
            want.text, want.token_ids, want.finish_reason, want.stop_reason,
        )  # fmt: skip
    assert_all_blocks_free(spec)


def test_structured_output_with_speculation(spec, plain):
    schema = {
        "type": "array", "minItems": 4, "maxItems": 4,
        "items": {"type": "object", "properties": {"name": {"type": "string"},
                  "color": {"type": "string"}}, "required": ["name", "color"]},
    }  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=120, structured_outputs={"json": schema})
    prompt = "Four fruits and their colors as a JSON array of objects with name and color:"
    expected = plain.generate([prompt], params)[0].outputs[0]
    with Accepted(spec) as accepted:
        ours = spec.generate([prompt], params)[0].outputs[0]
    assert accepted.count > 0
    assert ours.token_ids == expected.token_ids
    assert len(json.loads(ours.text)) == 4
    assert_all_blocks_free(spec)


def test_the_speculative_benchmark_reports_the_same_tokens_with_and_without(bundled_gguf_path):
    from tokenmill.bench import speculative

    report = speculative.run(bundled_gguf_path, SPEC, runs=1, max_tokens=24)
    assert set(report["workloads"]) == set(speculative.workloads())
    for figures in report["workloads"].values():
        assert figures["same_tokens"] and figures["output_tokens"] > 0
        assert figures["plain_tok_s"] > 0 and figures["speculative_tok_s"] > 0
    assert 0 < report["acceptance"]["accepted_tokens"] <= report["acceptance"]["draft_tokens"]


def test_host_overhead_runs_the_engine_around_a_stubbed_model(plain):
    from tokenmill.bench import host_overhead

    llm = LLM(plain.engine.config.model.model, kv_cache_memory=64 << 20)
    host_overhead.stub_model(llm, 42)
    for kind in RequestOutputKind:
        result = host_overhead.measure(llm, 4, 5, kind)
        assert result["batch"] == 4 and result["step_ms"] > 0
        assert set(result["phases_ms"]) >= {"schedule", "scheduler update"}
        assert not llm.engine.has_unfinished
        assert_all_blocks_free(llm)


# -- a draft model ---------------------------------------------------------------------------
# The bundled model drafting for itself: its guesses are the model's own greedy tokens, so
# nearly all hold - a draft cache that fell out of step with the target's would show as
# rejected guesses, while the output stays the model's own either way.


def drafting(path: str, draft: str, k: int = 3, **kwargs) -> LLM:
    return LLM(path, speculative_config={"model": draft, "num_speculative_tokens": k}, **kwargs)


@pytest.fixture(scope="module")
def drafted(bundled_gguf_path):
    return drafting(bundled_gguf_path, bundled_gguf_path, kv_cache_memory=64 << 20)


def acceptance(llm: LLM) -> float:
    counts = llm.engine.core.speculator.counts
    return counts.num_accepted_tokens / counts.num_draft_tokens


def test_a_draft_models_greedy_output_is_the_models_own_bit_for_bit(drafted, alone):
    with Accepted(drafted) as accepted:
        ours = [with_logprobs(drafted.generate([p], WITH_LOGPROBS))[0] for p in PROMPTS]
        assert ours == alone
        assert with_logprobs(drafted.generate(PROMPTS, WITH_LOGPROBS)) == alone  # batched
    assert accepted.count > 100
    assert acceptance(drafted) > 0.9
    assert_all_blocks_free(drafted)


def test_a_draft_model_under_chunking_preemption_and_prefix_cache_hits(
    bundled_gguf_path, alone, plain
):
    # the draft's cache has as many blocks as the target's: 8 blocks of both force preemption
    per_block = 16 * 2 * 30 * 3 * 64 * 2  # (the float16 cache of the GGUF default)
    # (and 24 tokens a step: long prompts come in chunks, which the draft mirrors too)
    small = drafting(bundled_gguf_path, bundled_gguf_path, kv_cache_memory=8 * 2 * per_block,
                     max_model_len=128, max_num_batched_tokens=24)  # fmt: skip
    assert small.engine.core.info.num_blocks == 8
    with Accepted(small) as accepted:
        assert with_logprobs(small.generate(PROMPTS, WITH_LOGPROBS)) == alone
    assert small.engine.core.scheduler.num_preemptions > 0
    assert accepted.count > 20 and acceptance(small) > 0.9
    assert_all_blocks_free(small)
    prefix = f"Read this and answer.\n{PASSAGE}\n"
    prompts = [prefix + "What did the keeper polish?", prefix + "Copy the text again:"]
    expected = tokens(plain.generate(prompts, GREEDY))
    small.generate(prompts[:1], GREEDY)  # caches the prefix (the draft computes it again)
    counts = small.engine.core.speculator.counts
    warm = small.generate(prompts, GREEDY)
    assert all(o.num_cached_tokens >= 32 for o in warm)
    assert tokens(warm) == expected
    now = small.engine.core.speculator.counts  # the draft's K/V over the hit is right:
    accepted = now.num_accepted_tokens - counts.num_accepted_tokens
    assert accepted > 0.9 * (now.num_draft_tokens - counts.num_draft_tokens)


def test_seeded_sampling_and_structured_output_are_the_same_with_a_draft_model(drafted, plain):
    assert_seeded_sampling_unchanged(drafted, plain)
    schema = {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "string"}}
    params = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs={"json": schema})
    prompt = "Three fruits as a JSON array of strings:"
    expected_text = plain.generate([prompt], params)[0].outputs[0].text
    with Accepted(drafted) as accepted:
        ours = drafted.generate([prompt], params)[0].outputs[0].text
    assert ours == expected_text and len(json.loads(ours)) == 3
    assert accepted.count > 0
    assert_all_blocks_free(drafted)


TINY_KV = {"kv_cache_memory": 16 << 20}


@pytest.fixture(scope="module")
def tiny_pair(tiny_hf_model_dir) -> tuple[str, str]:
    """A tiny random target and a draft of another shape: one layer, one KV head of 32
    dims (a cache of another shape on the same blocks)."""
    target = tiny_hf_model_dir("llama", num_hidden_layers=3)
    draft = tiny_hf_model_dir("qwen2", num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=32)  # fmt: skip
    return str(target), str(draft)


def test_a_draft_of_another_shape_keeps_greedy_output(tiny_pair):
    target, draft = tiny_pair
    prompts = ["one two three four", "The capital of France is", "a b a b a b"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    expected = with_logprobs(LLM(target, **TINY_KV).generate(prompts, params))
    llm = drafting(target, draft, k=2, **TINY_KV)
    assert with_logprobs(llm.generate(prompts, params)) == expected
    assert llm.engine.core.speculator.counts.num_draft_tokens > 0
    assert_all_blocks_free(llm)


@pytest.mark.parametrize("kv_blocks", [None, 6])  # 6 blocks of 16: preemptions
def test_a_draft_models_guesses_are_its_own_greedy_continuation(tiny_pair, kv_blocks, monkeypatch):
    """Whatever the draft's cache kept (guesses that held, a request that paused and caught
    up, a preempted one starting over), its guesses are what the draft model itself would
    generate greedily after the request's tokens."""
    target, draft = tiny_pair
    # bytes per block: the target's 3 layers x 2 heads x 16 dims, the draft's 1 x 1 x 32, float32
    per_block = 2 * 16 * (3 * 2 * 16 + 1 * 32) * 4
    memory = TINY_KV if kv_blocks is None else {"kv_cache_memory": kv_blocks * per_block}
    llm = drafting(target, draft, k=3, **memory)
    offers: list[tuple[Any, int, list[int]]] = []
    requests = llm.engine.core.requests
    offer = Speculator.offer

    def recording(self: Speculator, guesses: dict[str, tuple[int, list[int]]]) -> None:
        offers.extend((requests[rid], count, tokens) for rid, (count, tokens) in guesses.items())
        offer(self, guesses)

    monkeypatch.setattr(Speculator, "offer", recording)
    prompts = ["one two three four", "The capital of France is", "a b a b a b", "Once upon a"]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm.generate(prompts, params)
    if kv_blocks is not None:
        assert llm.engine.core.scheduler.num_preemptions > 0
    assert len(offers) > 20
    contexts = [list(request.token_ids[:count]) for request, count, _ in offers]
    greedy = LLM(draft, **TINY_KV).generate(
        [{"prompt_token_ids": c} for c in contexts],
        [SamplingParams(temperature=0.0, max_tokens=len(g), ignore_eos=True)
         for _, _, g in offers],
    )  # fmt: skip
    assert [o.outputs[0].token_ids for o in greedy] == [g for _, _, g in offers]


def test_fewer_guesses_offered_than_the_draft_made(tiny_pair, monkeypatch, caplog):
    """The speculator may offer fewer guesses than the draft made (its guess count follows
    the measured cost of a row). The target as its own draft: a greedy request's guesses
    all hold, so the token after the offered one is the draft's next guess, whose K/V the
    draft wrote; the newest token still has to run, for its row's guess (a step batched
    with a request whose guess failed once read row -1 for it)."""
    target, _ = tiny_pair
    llm = drafting(target, target, k=3, **TINY_KV)
    propose = Speculator.propose

    def one_guess(self: Speculator, request: Any, limit: int) -> list[int]:
        return propose(self, request, limit)[:1]

    monkeypatch.setattr(Speculator, "propose", one_guess)
    monkeypatch.setattr(Speculator, "_best_k", lambda self, rate, limit: limit)  # the draft: 3
    prompts = ["one two three four", "The capital of France is", "a b a b a b"]
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=1)
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, logprobs=1)
    params = [greedy, sampled, greedy]  # the sampled one's guesses fail now and then
    expected = with_logprobs(LLM(target, **TINY_KV).generate(prompts, params))
    with caplog.at_level(logging.ERROR):
        assert with_logprobs(llm.generate(prompts, params)) == expected
    assert "engine step failed" not in caplog.text
    counts = llm.engine.core.speculator.counts
    assert counts.num_draft_tokens > counts.num_accepted_tokens > 20
    assert_all_blocks_free(llm)


def test_a_draft_model_it_cannot_run_is_refused_by_name(tiny_hf_model_dir, tiny_vision_model_dir):
    from transformers import AutoTokenizer

    from tokenmill.errors import ModelLoadError

    target = tiny_hf_model_dir("llama")
    other = tiny_hf_model_dir("llama")
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<not-in-the-target>"])
    tokenizer.save_pretrained(str(other))
    with pytest.raises(ModelLoadError, match="another vocabulary"):
        drafting(str(target), str(other))
    with pytest.raises(ModelLoadError, match="vision-language"):
        drafting(str(target), str(tiny_vision_model_dir("llava")))
    with pytest.raises(ModelLoadError, match="one worker"):
        drafting(str(target), str(target), tensor_parallel_size=2)
