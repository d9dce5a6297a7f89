"""Parity with Hugging Face transformers on the bundled GGUF, both in float32."""

import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a land far away, there lived a",
]
NUM_DECODE_STEPS = 20
# float32 on both sides; differences come only from summation order (fused q/k/v,
# SDPA vs eager attention). Logits are O(10); 2e-3 absolute is far below any
# difference that could flip a greedy choice of this model in practice.
LOGITS_ATOL = 2e-3


@pytest.fixture(scope="module")
def core(bundled_gguf_path):
    return EngineCore(
        EngineConfig.from_kwargs(
            model=bundled_gguf_path, dtype="float32", device="cpu", kv_cache_memory=64 << 20
        )
    )


def run_greedy_with_logits(
    core: EngineCore, prompts_ids: list[list[int]]
) -> dict[str, list[torch.Tensor]]:
    """Drive the scheduler and runner by hand, batching all prompts, keeping each step's logits."""
    logits_by_request: dict[str, list[torch.Tensor]] = {}
    for i, ids in enumerate(prompts_ids):
        params = SamplingParams(temperature=0.0, max_tokens=NUM_DECODE_STEPS + 1, ignore_eos=True)
        core.add_request(Request(str(i), ids, params, frozenset(), core.max_model_len))
        logits_by_request[str(i)] = []
    scheduler = core.scheduler
    while scheduler.has_unfinished:
        out = scheduler.schedule()
        logits = core.logits_for(out)
        sampling = [s.request for s in out.scheduled if s.samples]
        sampled = {}
        for request, row in zip(sampling, logits, strict=True):
            logits_by_request[request.request_id].append(row)
            sampled[request.request_id] = [int(row.argmax())]
        scheduler.update(out, sampled)
    return logits_by_request


def test_logits_and_greedy_tokens_match_transformers(core, hf_reference):
    tokenizer = core.source.tokenizer
    prompts_ids = [tokenizer.encode(p) for p in PROMPTS]
    ours = run_greedy_with_logits(core, prompts_ids)
    for i, ids in enumerate(prompts_ids):
        steps = ours[str(i)]
        assert len(steps) == NUM_DECODE_STEPS + 1
        generated = [int(row.argmax()) for row in steps]
        with torch.no_grad():
            full = torch.tensor([ids + generated[:-1]])
            reference = hf_reference(full).logits[0, len(ids) - 1 :].float()
        ours_stacked = torch.stack(steps)
        max_diff = (ours_stacked - reference).abs().max().item()
        assert max_diff < LOGITS_ATOL, f"prompt {i}: max |logit diff| {max_diff}"
        assert generated == reference.argmax(-1).tolist()
    assert core.kv_cache.pool.num_free_blocks == core.kv_cache.pool.num_blocks


def test_greedy_generation_matches_transformers_generate(core, hf_reference):
    tokenizer = core.source.tokenizer
    ids = tokenizer.encode(PROMPTS[2])
    with torch.no_grad():
        expected = hf_reference.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[
            0, len(ids) :
        ]
    expected = expected.tolist()
    eos = set(tokenizer.eos_token_ids)
    if any(t in eos for t in expected):
        expected = expected[: next(i for i, t in enumerate(expected) if t in eos) + 1]
    params = SamplingParams(temperature=0.0, max_tokens=24)
    core.add_request(Request("gen", ids, params, frozenset(eos), core.max_model_len))
    request = core.requests["gen"]
    while core.has_unfinished:
        core.step()
    assert request.output_token_ids == expected
