"""Tensor parallelism on CPU (gloo, follower processes on this machine): the sharded model
computes what the whole one does.

Tolerances: on the exact float32 path (safetensors, no packing) logits equal transformers'
within 1e-4, as one process's do (tests/model/test_hf_models.py); the ranks' partial sums
only change the order of additions. The bundled GGUF over three ranks: with float32
activations, the same greedy tokens and logits within GGUF_FLOAT_TP_ATOL (measured 6e-5);
with int8 activations (the default) the reordered sums flip int8 roundings downstream, so
the bound is int8's own quality bound against float32 (measured: max logit difference
0.8), and a batch equals each prompt alone bit for bit.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.distributed.group import PeerError
from tokenmill.engine.request import Request
from tokenmill.errors import ModelLoadError

PROMPT = "The weather today is sunny with a chance of rain later in the evening, so"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "List three colors:",
]
CASES = {
    "llama": ("llama", {}),
    # one key/value head for two ranks: each holds a copy; tied embedding and head
    "llama-one-kv-head-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "qwen3": ("qwen3", {}),
    "qwen3-moe": (
        "qwen3_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "norm_topk_prob": False,
            "mlp_only_layers": [0],
        },
    ),  # fmt: skip
}
GGUF_FLOAT_TP_ATOL = 1e-3
# int8 activations: the bound test_quantized.py holds int8 to against float32
INT8_LOGITS_ATOL, INT8_ARGMAX_AGREEMENT, INT8_LOGPROB_ATOL = 3.0, 0.95, 0.02
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def logits_of(llm: LLM, ids: list[int]) -> torch.Tensor:
    """The logits of the last position of a fresh prefill of `ids`."""
    core = llm.engine.core
    core.add_request(
        Request("probe", ids, SamplingParams(max_tokens=1), frozenset(), core.max_model_len)
    )
    logits = core.logits_for(core.scheduler.schedule())[0]
    core.finish("probe", "abort")
    return logits


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_match_one_process_and_transformers(tiny_hf_model_dir, case):
    model_type, config = CASES[case]
    directory = str(tiny_hf_model_dir(model_type, **config))
    kwargs = dict(dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    whole = LLM(directory, **kwargs)
    split = LLM(directory, tensor_parallel_size=2, **kwargs)
    assert split.engine.core.info.tensor_parallel_size == 2
    ids = split.tokenizer.encode(PROMPT)
    tokens = split.generate([ids], GREEDY)[0].outputs[0].token_ids
    assert tokens == whole.generate([ids], GREEDY)[0].outputs[0].token_ids
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :]
    assert tokens == expected.argmax(-1).tolist()
    got = logits_of(split, ids + tokens[:-1])
    assert torch.allclose(got, expected[-1], atol=1e-4, rtol=1e-4)
    split.engine.core.shutdown()


def test_torch_backend_prompt_logprobs_and_batching_under_two_ranks(tiny_hf_model_dir):
    """The plain-torch layers (no native rope-and-cache) shard too; prompt logprobs take
    several logits gathers a step; a batch equals each prompt alone."""
    directory = str(tiny_hf_model_dir("llama"))
    kwargs = dict(dtype="float32", device="cpu", kv_cache_memory=16 << 20, backend="torch")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=2,
                            logprobs=2)  # fmt: skip
    whole = LLM(directory, **kwargs)
    split = LLM(directory, tensor_parallel_size=2, **kwargs)
    batched = split.generate(PROMPTS, params)
    alone = [split.generate([p], params)[0] for p in PROMPTS]
    reference = whole.generate(PROMPTS, params)
    for b, a, r in zip(batched, alone, reference, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids == r.outputs[0].token_ids
        for got, want in zip(b.prompt_logprobs[1:], r.prompt_logprobs[1:], strict=True):
            assert got.keys() == want.keys()
            for token in got:
                assert got[token].logprob == pytest.approx(want[token].logprob, abs=1e-4)
    split.engine.core.shutdown()


def all_logits(llm: LLM, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] of one prefill of `ids`, every position (prompt logprob rows)."""
    core = llm.engine.core
    core.add_request(Request("probe", ids, SamplingParams(max_tokens=1), frozenset(), 4096))
    out = core.scheduler.schedule()
    runner = core.executor.worker.runner
    with torch.inference_mode():
        batch = runner.prepare(core.model_input(out))
        logits = runner._logits(runner.forward(batch), torch.arange(len(ids)))
    core.finish("probe", "abort")
    return logits


def three_ranks_and_one(path: str, quantization: str) -> tuple[LLM, LLM]:
    kwargs = dict(kv_cache_memory=64 << 20, enable_prefix_caching=False, quantization=quantization)
    return LLM(path, **kwargs), LLM(path, tensor_parallel_size=3, **kwargs)


def test_gguf_blocks_over_three_ranks_float_activations(bundled_gguf_path):
    """The bundled model's 9 heads and 3 key/value heads in three; each rank keeps its rows
    or columns of the Q4_1 blocks; float32 activations: the same tokens, logits within
    GGUF_FLOAT_TP_ATOL."""
    whole, split = three_ranks_and_one(bundled_gguf_path, "gguf-float32")
    model = split.engine.core.executor.worker.model
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "GGUFLinear"
    assert model.model.layers[1].mlp.down_proj.in_features == 1536 // 3
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    expected = whole.generate(PROMPTS, greedy)
    for got, want in zip(split.generate(PROMPTS, greedy), expected, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
    ids = split.tokenizer.encode(PROMPTS[1]) + expected[1].outputs[0].token_ids
    diff = (all_logits(split, ids) - all_logits(whole, ids)).abs().max().item()
    assert diff <= GGUF_FLOAT_TP_ATOL
    split.engine.core.shutdown()


@pytest.fixture(scope="module")
def gguf_three_ranks(bundled_gguf_path: str) -> Iterator[tuple[LLM, LLM]]:
    """The bundled model on the GGUF default path (int8 activations), whole and in three."""
    whole, split = three_ranks_and_one(bundled_gguf_path, "gguf")
    yield whole, split
    split.engine.core.shutdown()


def test_gguf_default_path_over_three_ranks(gguf_three_ranks: tuple[LLM, LLM]) -> None:
    """int8 activations amplify the ranks' reordered sums as they amplify any rounding
    (layer 1 differs by 1e-3, the last by ~1%): held to the bound tests/model/
    test_quantized.py holds int8 to against float32, along the whole model's greedy
    continuations; the mean logprob to twice it, as both runs are int8 runs, each within
    the bound of float32, possibly on either side of it (an AMD EPYC measured split - whole
    -0.028 where whole - float32 was +0.021 and split - float32 -0.008). Within three
    ranks, a batch equals each prompt alone bit for bit."""
    whole, split = gguf_three_ranks
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=3)
    expected = whole.generate(PROMPTS, greedy)
    same_argmax = positions = 0
    for prompt, out in zip(PROMPTS, expected, strict=True):
        continuation = out.outputs[0].token_ids
        ids = split.tokenizer.encode(prompt) + continuation
        ours, reference = all_logits(split, ids), all_logits(whole, ids)
        assert (ours - reference).abs().max().item() < INT8_LOGITS_ATOL
        same_argmax += int((ours.argmax(-1) == reference.argmax(-1)).sum())
        positions += len(ids)
        n, target = len(continuation), torch.tensor(continuation)[:, None]
        ours_lp, reference_lp = (
            torch.log_softmax(logits[-n - 1 : -1], -1).gather(1, target).mean().item()
            for logits in (ours, reference)
        )
        assert abs(ours_lp - reference_lp) < 2 * INT8_LOGPROB_ATOL, prompt
    assert same_argmax / positions >= INT8_ARGMAX_AGREEMENT
    batched = split.generate(PROMPTS, greedy)
    for prompt, together in list(zip(PROMPTS, batched, strict=True))[1::2]:
        alone = split.generate([prompt], greedy)[0].outputs[0]
        assert alone.token_ids == together.outputs[0].token_ids
        for x, y in zip(alone.logprobs, together.outputs[0].logprobs, strict=True):
            assert {t: p.logprob for t, p in x.items()} == {t: p.logprob for t, p in y.items()}


def test_speculative_decoding_over_three_ranks_changes_no_bit(
    bundled_gguf_path: str, gguf_three_ranks: tuple[LLM, LLM]
) -> None:
    """Guessed tokens are decode rows in the step every rank runs: the same tokens and
    logprobs as the same three ranks without speculation."""
    kwargs = dict(kv_cache_memory=64 << 20, enable_prefix_caching=False, quantization="gguf")
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
            "prompt_lookup_max": 3}  # fmt: skip
    prompts = ["one two three four five one two three four five one two three", PROMPTS[1]]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)

    def run(llm: LLM) -> list[tuple[list[int], list[dict[int, float]]]]:
        outputs = [o.outputs[0] for o in llm.generate(prompts, greedy)]
        return [
            (o.token_ids, [{t: p.logprob for t, p in d.items()} for d in o.logprobs])
            for o in outputs
        ]

    expected = run(gguf_three_ranks[1])  # the same three ranks, without speculation
    guessing = LLM(bundled_gguf_path, tensor_parallel_size=3, speculative_config=spec, **kwargs)
    speculator = guessing.engine.core.speculator
    got = run(guessing)
    guessing.engine.core.shutdown()
    assert got == expected
    assert speculator is not None and speculator.counts.num_accepted_tokens > 10


def test_heads_that_do_not_split_are_a_load_error(bundled_gguf_path):
    with pytest.raises(ModelLoadError, match="9 attention heads do not split"):
        LLM(bundled_gguf_path, tensor_parallel_size=2, kv_cache_memory=16 << 20)


def test_a_follower_that_dies_fails_the_next_step_and_stays_failed(tiny_hf_model_dir):
    directory = str(tiny_hf_model_dir("llama"))
    llm = LLM(directory, dtype="float32", device="cpu", kv_cache_memory=16 << 20,
              tensor_parallel_size=2)  # fmt: skip
    executor = llm.engine.core.executor
    assert llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    follower = executor.followers.processes[0]
    os.kill(follower.pid, signal.SIGKILL)
    follower.wait()
    with pytest.raises(PeerError, match="tensor-parallel"):
        llm.generate([PROMPT], GREEDY)
    with pytest.raises(PeerError):
        llm.engine.core.check_health()
    executor.shutdown()
