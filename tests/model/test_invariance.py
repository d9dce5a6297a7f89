"""Greedy output never depends on batching, chunking, preemption or prefix-cache hits.

Checked for exact float32 weights (PyTorch's matmuls: the same tokens) and for the CPU
default on a GGUF file: its blocks through the native kernels, where every row's
computation depends on that row alone (batch-invariant matmuls; attention computes a
prefill token exactly as its decode), so the logprobs are bit-identical too. That
exactness matters there: with int8 activations a last-bit difference can flip an
activation's rounding, and so a near-tie token.
"""

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.layers.linear import GGUFLinear

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
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=2)
BIT_EXACT = False  # whether the llm under test is batch-invariant bit for bit (its fixture)


def token_ids(outputs):
    """Each output's tokens and, where the computation is bit-exact, their logprobs."""
    if not BIT_EXACT:
        return [o.outputs[0].token_ids for o in outputs]
    return [
        (o.outputs[0].token_ids, [{t: p.logprob for t, p in d.items()} for d in o.outputs[0].logprobs])
        for o in outputs
    ]  # fmt: skip


@pytest.fixture(scope="module", params=["float32", "gguf"])
def llm(request):
    global BIT_EXACT
    if request.param == "float32":
        yield request.getfixturevalue("bundled_llm")
        return
    gguf = request.getfixturevalue("default_llm")  # the CPU default: gguf blocks
    worker = gguf.engine.core.executor.worker
    BIT_EXACT = worker.backend.native and any(
        isinstance(m, GGUFLinear) for m in worker.model.modules()
    )
    yield gguf
    BIT_EXACT = False


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


def test_small_kv_cache_forces_preemption(bundled_gguf_path, llm, alone):
    # 8 x (up to ~45 tokens) need ~24 blocks; 10 blocks of 16 force preemption.
    itemsize = llm.engine.core.info.kv_cache_dtype.itemsize  # float16 for the gguf default
    small = LLM(
        bundled_gguf_path,
        dtype=llm.engine.config.model.dtype,
        kv_cache_memory=10 * 16 * 2 * 30 * 3 * 64 * itemsize,
        max_model_len=160,
    )
    assert small.engine.core.info.num_blocks == 10
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


def test_torch_reference_backend_equals_native_kernels(llm, alone, bundled_gguf_path):
    worker = llm.engine.core.executor.worker
    if not worker.backend.native:
        pytest.skip("the native kernels are not available here (no C compiler)")
    if any(isinstance(m, GGUFLinear) for m in worker.model.modules()):
        pytest.skip("gguf blocks need the native kernels: no torch reference runs with them")
    config = llm.engine.config
    reference = LLM(
        bundled_gguf_path,
        dtype=config.model.dtype,
        kv_cache_memory=config.cache.kv_cache_memory,
        backend="torch",
    )
    # SDPA for prefills: the same tokens, logprobs within float rounding
    tokens = [o.outputs[0].token_ids for o in reference.generate(PROMPTS, GREEDY)]
    assert tokens == [a[0] if BIT_EXACT else a for a in alone]


NARROW_PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def float32_cache_tokens(bundled_llm):
    """The float32 cache's greedy tokens, for each narrow cache to compare with."""
    return [o.outputs[0].token_ids for o in bundled_llm.generate(PROMPTS, NARROW_PARAMS)]


@pytest.mark.parametrize("cache_dtype", ["float16", "bfloat16", "fp8_e5m2", "fp8"])
def test_narrow_caches_read_the_same_in_the_kernel_and_the_torch_fallback(
    bundled_gguf_path, bundled_llm, float32_cache_tokens, cache_dtype
):
    """--kv-cache-dtype float16 (the GGUF default's cache), bfloat16, fp8_e5m2 or fp8 (e4m3)
    on exact float32 weights: the native kernels and the torch fallback (SDPA over the
    cache converted back) attend over the same rounded keys and values, so greedy tokens
    agree (but for float16: until two tokens are within 0.1 nats, since the paths' keys
    differ by float rounding before the cache rounds them, and a value on a boundary of a
    coarse format's steps lands either side). A float16 cache (11 significant bits) stays
    close to the float32 cache's tokens; the others (8, 4 or 3 bits) drift sooner, but
    still start every answer alike, an fp8 one in half float16's bytes."""
    memory = bundled_llm.engine.config.cache.kv_cache_memory  # the float32 cache's bytes
    narrow = LLM(
        bundled_gguf_path, dtype="float32", kv_cache_dtype=cache_dtype, kv_cache_memory=memory
    )
    if not narrow.engine.core.executor.worker.backend.native:
        pytest.skip("the native kernels (with F16C) are not available here")
    slots = [llm.engine.core.executor.worker.num_blocks for llm in (bundled_llm, narrow)]
    assert slots[1] == slots[0] * (2 if cache_dtype in ("float16", "bfloat16") else 4)
    native_outputs = [o.outputs[0] for o in narrow.generate(PROMPTS, NARROW_PARAMS)]
    native = [o.token_ids for o in native_outputs]
    del narrow
    narrow_torch = LLM(
        bundled_gguf_path,
        dtype="float32",
        kv_cache_dtype=cache_dtype,
        kv_cache_memory=memory,
        backend="torch",
    )
    fallback_outputs = [o.outputs[0] for o in narrow_torch.generate(PROMPTS, NARROW_PARAMS)]
    fallback = [o.token_ids for o in fallback_outputs]
    if cache_dtype == "float16":
        assert fallback == native
    for a, b in zip(native_outputs, fallback_outputs, strict=True):
        i = next(
            (i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y),
            None,
        )
        if i is not None:  # a near tie in both paths
            for one, other in ((a, b), (b, a)):
                chosen, rival = one.logprobs[i], other.token_ids[i]
                assert rival in chosen, (i, a.token_ids, b.token_ids)
                gap = chosen[one.token_ids[i]].logprob - chosen[rival].logprob
                assert gap < 0.1, (i, gap, a.token_ids, b.token_ids)
    exact = float32_cache_tokens
    if cache_dtype == "float16":
        same = sum(a == b for a, b in zip(exact, native, strict=True))
        assert same >= len(PROMPTS) - 1, (exact, native)
    else:
        assert [a[:2] for a in exact] == [b[:2] for b in native], (exact, native)
