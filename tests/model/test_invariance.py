"""Greedy output never depends on batching, chunking, preemption or prefix-cache hits."""

import pytest

from tokenmill import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "List three colors:",
    "def add(a, b):",
    "Translate to French: good morning",
    "Write a short poem about autumn leaves falling",
    "Q: What is 12 times 7?\nA:",
    "The quick brown fox",
    "In 1969, the first humans",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def llm(bundled_llm):
    return bundled_llm


@pytest.fixture(scope="module")
def alone(llm):
    return [token_ids(llm.generate([p], GREEDY))[0] for p in PROMPTS]


def assert_all_blocks_free(llm):
    pool = llm.engine.core.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_batched_equals_alone(llm, alone):
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == alone
    assert_all_blocks_free(llm)


def test_tiny_token_budget_forces_chunked_prefill(llm, alone):
    config = llm.engine.core.scheduler.config
    saved = config.max_num_batched_tokens
    config.max_num_batched_tokens = 5
    try:
        assert token_ids(llm.generate(PROMPTS, GREEDY)) == alone
    finally:
        config.max_num_batched_tokens = saved
    assert_all_blocks_free(llm)


def test_small_kv_cache_forces_preemption(bundled_gguf_path, alone):
    # 8 x (up to ~45 tokens) need ~24 blocks; 10 blocks of 16 force preemption.
    small = LLM(
        bundled_gguf_path,
        dtype="float32",
        kv_cache_memory=10 * 16 * 2 * 30 * 3 * 64 * 4,
        max_model_len=160,
    )
    assert small.engine.core.runner.num_blocks == 10
    assert token_ids(small.generate(PROMPTS, GREEDY)) == alone
    assert small.engine.core.scheduler.num_preemptions > 0
    assert_all_blocks_free(small)


def test_prefix_cache_hits_do_not_change_output(llm):
    prefix = "You are a careful assistant. Answer in one sentence. " * 8
    prompts = [prefix + "What is the sun?", prefix + "What is the moon?"]
    pool = llm.engine.core.kv_cache.pool
    pool.enable_caching = False
    try:
        cold = [token_ids(llm.generate([p], GREEDY))[0] for p in prompts]
        assert llm.generate(prompts[:1], GREEDY)[0].num_cached_tokens == 0
    finally:
        pool.enable_caching = True
    llm.generate(prompts[:1], GREEDY)  # caches the prefix
    warm = llm.generate(prompts, GREEDY)
    assert all(o.num_cached_tokens >= 64 for o in warm)
    assert token_ids(warm) == cold
    assert_all_blocks_free(llm)


def test_abort_returns_every_block(llm):
    engine = llm.engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"abort-{i}", llm.tokenizer.encode(prompt), GREEDY)
    engine.step()
    engine.step()
    for i in range(len(PROMPTS)):
        engine.abort(f"abort-{i}")
    assert not engine.has_unfinished
    assert_all_blocks_free(llm)


def test_torch_fallback_equals_native_kernels(llm, alone):
    runner = llm.engine.core.runner
    if not runner.native_kernels:
        pytest.skip("the native kernels are not available here (no C compiler)")
    runner.native_kernels = False
    try:
        assert token_ids(llm.generate(PROMPTS, GREEDY)) == alone
    finally:
        runner.native_kernels = True
