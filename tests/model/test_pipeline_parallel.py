"""Pipeline parallelism (--pipeline-parallel-size): each rank holds a run of the decoder
layers and passes its hidden states on; the leader holds the final norm and head.

No sum is reordered, so a pipeline computes exactly what one process does: on the bundled
GGUF's default path (int8 activations) the tokens and logprobs are bit-identical, and the
exact float32 path equals transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.errors import ModelLoadError
from tokenmill.model.weights import stage_layers

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "List three colors:",
]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)


def entries(output) -> list[dict[int, float]]:
    return [{t: p.logprob for t, p in step.items()} for step in output.outputs[0].logprobs]


def test_stages_split_the_layers_evenly() -> None:
    assert [stage_layers(30, s, 2) for s in range(2)] == [range(0, 15), range(15, 30)]
    assert [len(stage_layers(10, s, 4)) for s in range(4)] == [2, 3, 2, 3]
    with pytest.raises(ModelLoadError, match="do not split"):
        stage_layers(2, 0, 3)


def test_two_stages_of_the_gguf_default_path_are_bit_identical(bundled_gguf_path):
    kwargs = dict(kv_cache_memory=64 << 20)
    whole = LLM(bundled_gguf_path, **kwargs)
    stages = LLM(bundled_gguf_path, pipeline_parallel_size=2, **kwargs)
    info = stages.engine.core.info
    assert (info.pipeline_parallel_size, info.tensor_parallel_size) == (2, 1)
    leader = stages.engine.core.executor.worker
    assert (leader.model.first_layer, len(leader.kv_caches)) == (0, 15)
    expected = whole.generate(PROMPTS, GREEDY)
    together = stages.generate(PROMPTS, GREEDY)
    for got, want in zip(together, expected, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert entries(got) == entries(want)
    alone = stages.generate([PROMPTS[2]], GREEDY)[0]
    assert entries(alone) == entries(expected[2])
    # prompt logprobs and embeddings come from the leader's norm and head
    scored = SamplingParams(max_tokens=1, prompt_logprobs=2)
    a, b = (llm.generate([PROMPTS[1]], scored)[0].prompt_logprobs for llm in (whole, stages))
    assert [e and {t: p.logprob for t, p in e.items()} for e in a] == [
        e and {t: p.logprob for t, p in e.items()} for e in b
    ]
    assert torch.equal(
        torch.tensor(stages.embed(["a cat"])[0].outputs.embedding),
        torch.tensor(whole.embed(["a cat"])[0].outputs.embedding),
    )
    stages.engine.core.shutdown()


@pytest.mark.parametrize("case", ["llama", "qwen3_moe"])
def test_two_stages_match_transformers(tiny_hf_model_dir, case):
    config = (
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48,
         "norm_topk_prob": False}
        if case == "qwen3_moe" else {}
    )  # fmt: skip
    directory = str(tiny_hf_model_dir(case, **config))
    llm = LLM(directory, dtype="float32", device="cpu", kv_cache_memory=16 << 20,
              pipeline_parallel_size=2)  # fmt: skip
    ids = llm.tokenizer.encode("The weather today is sunny with a chance of rain, so")
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    tokens = llm.generate([ids], params)[0].outputs[0].token_ids
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :]
    assert tokens == expected.argmax(-1).tolist()
    llm.engine.core.shutdown()


def test_tensor_and_pipeline_together_are_refused(tiny_hf_model_dir):
    with pytest.raises(ModelLoadError, match="together"):
        LLM(str(tiny_hf_model_dir("llama")), tensor_parallel_size=2, pipeline_parallel_size=2)


def test_data_parallel_offline_is_refused_with_the_server_flag(tiny_hf_model_dir):
    with pytest.raises(ModelLoadError, match="--data-parallel-size"):
        LLM(str(tiny_hf_model_dir("llama")), data_parallel_size=2)
