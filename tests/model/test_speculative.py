"""Speculative decoding on the bundled model (the CPU default: GGUF blocks through the native
kernels): the output is the same as without it - greedy bit for bit with logprobs, seeded
sampling token for token - batched or alone, under preemption, prefix-cache hits, stop
strings and structured outputs. Each test also checks that guesses were made and kept,
so none passes with speculation silently off."""

from __future__ import annotations

import json

import pytest

from tokenmill import LLM, SamplingParams

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
def plain(bundled_gguf_path):
    return LLM(bundled_gguf_path, kv_cache_memory=64 << 20)


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


def test_seeded_sampling_with_penalties_is_the_same_with_speculation(spec, plain):
    params = SamplingParams(temperature=0.7, top_p=0.95, seed=11, max_tokens=40, ignore_eos=True,
                            frequency_penalty=0.2, logprobs=1)  # fmt: skip
    expected = with_logprobs(plain.generate(PROMPTS[:2], params))
    with Accepted(spec) as accepted:
        assert with_logprobs(spec.generate(PROMPTS[:2], params)) == expected
    assert accepted.count > 0


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
    result = host_overhead.measure(llm, 4, 5)
    assert result["batch"] == 4 and result["step_ms"] > 0
    assert set(result["phases_ms"]) >= {"schedule", "scheduler update"}
    assert not llm.engine.has_unfinished
    assert_all_blocks_free(llm)
