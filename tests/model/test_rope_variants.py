"""Phi-3 LongRoPE and partial rotary embeddings (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini):
tiny random checkpoints whose logits and greedy tokens match transformers'."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.engine.request import Request
from tokenmill.errors import ModelLoadError


def _longrope(rotary_dim: int) -> dict:
    """Distinct short and long factors, switching at position 64 of the tiny dir's 512
    (head_dim 16): tokens past 64 turn differently than they would with the short factors."""
    half = rotary_dim // 2
    return {
        "rope_scaling": {
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [2.0 + 3.0 * i for i in range(half)],
        },
        "original_max_position_embeddings": 64,
    }


CASES = {
    "phi3-longrope": _longrope(16),  # Phi-3-mini-128k, Phi-3.5-mini
    "phi3-partial": {"partial_rotary_factor": 0.75},  # 12 of 16 dims turn
    "phi4-mini": {**_longrope(12), "partial_rotary_factor": 0.75},  # both
}
PROMPT = "The weather today is sunny with a chance of rain later in the evening, so"  # < 64 tokens
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _llm(directory, max_model_len: int | None = None) -> LLM:
    return LLM(
        str(directory),
        dtype="float32",
        device="cpu",
        kv_cache_memory=16 << 20,
        max_model_len=max_model_len,
    )


def _reference(directory):
    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_phi3_rope_variants_match_transformers(tiny_hf_model_dir, case):
    """Served within original_max_position_embeddings (the short factors, as transformers
    turns a short sequence): the same greedy tokens, and a fresh prefill's last logits within
    1e-4 of transformers'."""
    directory = tiny_hf_model_dir("phi3", **CASES[case])
    llm, reference = _llm(directory, max_model_len=64), _reference(directory)
    ids = llm.tokenizer.encode(PROMPT)
    generated = llm.generate([ids], GREEDY)[0].outputs[0].token_ids
    full = ids + generated[:-1]
    assert len(full) < 64
    with torch.no_grad():
        expected = reference(torch.tensor([full])).logits[0, len(ids) - 1 :]
    assert generated == expected.argmax(-1).tolist()
    core = llm.engine.core
    core.add_request(
        Request("probe", full, SamplingParams(max_tokens=1), frozenset(), core.max_model_len)
    )
    last = core.logits_for(core.scheduler.schedule())[0]
    assert torch.allclose(last, expected[-1], atol=1e-4, rtol=1e-4)
    core.finish("probe", "abort")


@pytest.mark.parametrize("case", ["phi3-longrope", "phi4-mini"])
def test_longrope_past_the_original_context_turns_every_position_with_the_long_factors(
    tiny_hf_model_dir, case
):
    """Served to 512 tokens (the default), every position turns with the long factors: a
    90-token prompt and 30 more tokens are what transformers generates for a sequence past
    the original context (64), and its prefill logits within 1e-4."""
    directory = tiny_hf_model_dir("phi3", **CASES[case])
    llm, reference = _llm(directory), _reference(directory)
    ids = llm.tokenizer.encode(PROMPT * 6)[:90]
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    out = llm.generate([ids], greedy)[0].outputs[0].token_ids
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([ids]), max_new_tokens=30, min_new_tokens=30, do_sample=False
        )[0, 90:].tolist()
        logits = reference(torch.tensor([ids])).logits[0, -1]
    assert out == expected
    core = llm.engine.core
    core.add_request(
        Request("probe", ids, SamplingParams(max_tokens=1), frozenset(), core.max_model_len)
    )
    last = core.logits_for(core.scheduler.schedule())[0]
    assert torch.allclose(last, logits, atol=1e-4, rtol=1e-4)
    core.finish("probe", "abort")


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_output_does_not_depend_on_the_batch_or_the_backend(tiny_hf_model_dir, case):
    """Prompts of 6 to 90 tokens (some past position 64, some not, one crossing it while
    decoding), alone and batched, and from the torch reference backend: every sequence gets
    the tokens it got alone."""
    directory = tiny_hf_model_dir("phi3", **CASES[case])
    llm = _llm(directory)
    words = llm.tokenizer.encode(PROMPT * 6)
    prompts = [words[:6], words[:50], words[:70], words[:90]]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == alone
    del llm
    reference = LLM(str(directory), dtype="float32", kv_cache_memory=16 << 20, backend="torch")
    assert [o.outputs[0].token_ids for o in reference.generate(prompts, greedy)] == alone


@pytest.mark.parametrize("missing", ["short_factor", "long_factor"])
def test_a_longrope_config_without_its_factors_is_refused(tiny_hf_model_dir, missing):
    directory = tiny_hf_model_dir("phi3", **CASES["phi3-longrope"])
    path = directory / "config.json"
    config = json.loads(path.read_text())
    rope = config.get("rope_parameters") or config["rope_scaling"]
    del rope[missing]
    path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=missing):
        _llm(directory)
