"""Embeddings (LLM.embed, the engine's prefill-only requests) equal transformers' last hidden
states pooled the same way, however the prompt is chunked, batched or cached, and beside
generation in the same engine."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from tokenmill import LLM, SamplingParams
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import InvalidRequestError
from tokenmill.pooling_params import PoolingParams

TEXTS = [
    "The weather today is sunny with a chance of rain later in the evening, so",
    "A short one.",
    "Paged attention keeps the keys and values of every sequence in fixed-size blocks " * 3,
]
ATOL = 1e-4  # float32 on both sides; unit-length vectors


def _reference(directory, token_ids: list[int], pooling: str, normalize: bool) -> torch.Tensor:
    model = AutoModel.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model(torch.tensor([token_ids])).last_hidden_state[0]
    vector = {"LAST": hidden[-1], "MEAN": hidden.mean(0), "CLS": hidden[0]}[pooling]
    return F.normalize(vector, dim=-1) if normalize else vector


def _llm(directory, **kwargs) -> LLM:
    return LLM(str(directory), dtype="float32", device="cpu", kv_cache_memory=16 << 20, **kwargs)


def _write_sentence_transformers(directory, pooling: str, normalize: bool) -> None:
    """modules.json with a Pooling module (and a Normalize one), as sentence-transformers saves."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(exist_ok=True)
    config = {
        "word_embedding_dimension": 64,
        "pooling_mode_cls_token": pooling == "CLS",
        "pooling_mode_mean_tokens": pooling == "MEAN",
        "pooling_mode_max_tokens": False,
        "pooling_mode_lasttoken": pooling == "LAST",
    }
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text"])
def test_default_pooling_is_the_normalised_last_token_as_transformers(
    tiny_hf_model_dir, model_type
):
    directory = tiny_hf_model_dir(model_type)
    llm = _llm(directory)
    outputs = llm.embed(TEXTS)
    for text, output in zip(TEXTS, outputs, strict=True):
        ids = llm.tokenizer.encode(text)
        assert output.prompt_token_ids == ids
        expected = _reference(directory, ids, "LAST", normalize=True)
        torch.testing.assert_close(output.outputs.data, expected, atol=ATOL, rtol=0)
        assert output.outputs.embedding == output.outputs.data.tolist()


@pytest.mark.parametrize(("pooling", "normalize"), [("MEAN", False), ("CLS", True)])
def test_sentence_transformers_config_picks_the_pooling(tiny_hf_model_dir, pooling, normalize):
    directory = tiny_hf_model_dir("llama")
    _write_sentence_transformers(directory, pooling, normalize)
    # chunks of 8 tokens: the mean adds up parts from several steps
    llm = _llm(directory, max_num_batched_tokens=8)
    assert llm.engine.pooler.pooling_type == pooling
    for text, output in zip(TEXTS, llm.embed(TEXTS), strict=True):
        expected = _reference(directory, llm.tokenizer.encode(text), pooling, normalize)
        torch.testing.assert_close(output.outputs.data, expected, atol=ATOL, rtol=1e-5)


def test_pooler_config_flag_overrides_the_model_and_requests_override_normalisation(
    tiny_hf_model_dir,
):
    directory = tiny_hf_model_dir("llama")
    llm = _llm(directory, pooler_config={"pooling_type": "mean", "normalize": True})
    ids = llm.tokenizer.encode(TEXTS[0])
    normalised = llm.embed(TEXTS[0])[0].outputs.data
    raw = llm.embed(TEXTS[0], PoolingParams(normalize=False))[0].outputs.data
    torch.testing.assert_close(raw, _reference(directory, ids, "MEAN", False), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(normalised, F.normalize(raw, dim=-1), atol=1e-6, rtol=0)


def test_batched_equals_alone_and_the_prefix_cache_serves_last_pooling(tiny_hf_model_dir):
    directory = tiny_hf_model_dir("llama")
    llm = _llm(directory)
    together = llm.embed(TEXTS)
    alone = [llm.embed(text)[0] for text in TEXTS]
    for a, b in zip(together, alone, strict=True):
        torch.testing.assert_close(a.outputs.data, b.outputs.data, atol=1e-5, rtol=0)
    # alone, the long text's full blocks came from the cache the batch left: same vector
    assert alone[2].num_cached_tokens > 0


def test_embeddings_run_beside_generation_without_changing_either(tiny_hf_model_dir):
    directory = tiny_hf_model_dir("llama")
    llm = _llm(directory, max_num_batched_tokens=16)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompt = llm.tokenizer.encode(TEXTS[0])
    expected_tokens = llm.generate([prompt], greedy)[0].outputs[0].token_ids
    expected_vectors = [o.outputs.data for o in llm.embed(TEXTS)]

    engine: LLMEngine = llm.engine
    engine.add_request("gen", prompt, greedy)
    for i, text in enumerate(TEXTS):
        engine.add_pooling_request(f"emb{i}", llm.tokenizer.encode(text), PoolingParams())
    finished = {}
    while engine.has_unfinished:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert finished["gen"].outputs[0].token_ids == expected_tokens
    for i, expected in enumerate(expected_vectors):
        torch.testing.assert_close(finished[f"emb{i}"].outputs.data, expected, atol=1e-5, rtol=0)


def test_preempted_embedding_is_recomputed_from_the_start(tiny_hf_model_dir):
    """A cache of 4 blocks (64 tokens) cannot hold a growing generation (20 + 40 tokens) and
    a 40-token embedding: the embedding (the newest) is preempted between its chunks and recomputed;
    its mean is the whole prompt's, counted once, and the generation's tokens do not change."""
    directory = tiny_hf_model_dir("llama")
    _write_sentence_transformers(directory, "MEAN", normalize=False)
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K and V, layers, block, KV heads, head dim, fp32
    llm = LLM(
        str(directory),
        dtype="float32",
        device="cpu",
        kv_cache_memory=4 * block_bytes,
        max_num_batched_tokens=8,
        max_model_len=64,
    )
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompt = llm.tokenizer.encode(TEXTS[2])[:20]
    expected_tokens = llm.generate([prompt], greedy)[0].outputs[0].token_ids
    text_ids = llm.tokenizer.encode(TEXTS[0] * 3)[:40]
    engine: LLMEngine = llm.engine
    engine.add_request("gen", prompt, greedy)
    engine.add_pooling_request("emb", text_ids, PoolingParams())
    finished = {}
    while engine.has_unfinished:
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert engine.core.scheduler.num_preemptions > 0
    assert finished["gen"].outputs[0].token_ids == expected_tokens
    expected = _reference(directory, text_ids, "MEAN", False)
    torch.testing.assert_close(finished["emb"].outputs.data, expected, atol=ATOL, rtol=1e-5)


def test_dimensions_need_a_matryoshka_model(tiny_hf_model_dir):
    plain = _llm(tiny_hf_model_dir("llama"))
    with pytest.raises(InvalidRequestError, match="Matryoshka") as info:
        plain.embed("hi", PoolingParams(dimensions=8))
    assert info.value.param == "dimensions"

    directory = tiny_hf_model_dir("llama", matryoshka_dimensions=[16, 32, 64])
    llm = _llm(directory)
    ids = llm.tokenizer.encode(TEXTS[0])
    vector = llm.embed(TEXTS[0], PoolingParams(dimensions=16))[0].outputs.data
    assert vector.shape == (16,)
    hidden = _reference(directory, ids, "LAST", normalize=False)
    torch.testing.assert_close(vector, F.normalize(hidden[:16], dim=-1), atol=ATOL, rtol=0)
    with pytest.raises(InvalidRequestError, match="not one the model supports"):
        llm.embed("hi", PoolingParams(dimensions=20))


def test_prompt_checks(tiny_hf_model_dir):
    llm = _llm(tiny_hf_model_dir("llama"), max_model_len=32)
    with pytest.raises(InvalidRequestError, match="maximum context length is 32"):
        llm.embed([list(range(5, 38))])
    # the whole context may be embedded (nothing is generated), and truncation keeps the end
    full = llm.embed([list(range(5, 37))])[0]
    cut = llm.embed([list(range(1, 37))], PoolingParams(truncate_prompt_tokens=32))[0]
    assert cut.prompt_token_ids == list(range(5, 37))
    torch.testing.assert_close(cut.outputs.data, full.outputs.data, atol=1e-5, rtol=0)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.embed([[10**7]])
