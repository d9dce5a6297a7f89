"""Small random Llama / Qwen2 / Qwen3 directories: tokenmill's logits match transformers'."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams

CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama3-rope": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "mistral": ("mistral", {"sliding_window": 256}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
}
PROMPT = "The weather today is sunny with a chance of rain later in the evening, so"


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_and_greedy_tokens_match(tiny_hf_model_dir, case):
    model_type, config = CASES[case]
    directory = tiny_hf_model_dir(model_type, **config)
    llm = LLM(str(directory), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    reference = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(PROMPT)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    generated = out.outputs[0].token_ids
    with torch.no_grad():
        expected_logits = reference(torch.tensor([ids + generated[:-1]])).logits[0, len(ids) - 1 :]
    assert generated == expected_logits.argmax(-1).tolist()
    # our logits for the same positions, from a fresh prefill of prompt + generated tokens
    core = llm.engine.core
    scheduler = core.scheduler
    from tokenmill.engine.request import Request

    full = ids + generated[:-1]
    core.add_request(
        Request("probe", full, SamplingParams(max_tokens=1), frozenset(), core.max_model_len)
    )
    out_step = scheduler.schedule()
    tables = {s.request.request_id: core.kv_cache.block_ids(s.request) for s in out_step.scheduled}
    last = core.runner.logits_for(out_step, tables)[0]
    assert torch.allclose(last, expected_logits[-1], atol=1e-4, rtol=1e-4)
    core.finish("probe", "abort")
    if model_type == "mistral":
        assert core.max_model_len == 256  # capped at the sliding window
