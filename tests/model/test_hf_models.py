"""Small random directories of every architecture: tokenmill's logits match transformers'.

Sliding windows (20 keys) are narrower than a prompt and its output here, so the layers
that slide are checked against transformers' own windowed attention."""

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
    "mistral": ("mistral", {"sliding_window": 20}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {"sliding_window": 20}),
    "gemma3": (
        "gemma3_text",
        {
            "layer_types": ["sliding_attention", "full_attention"],
            "sliding_window": 20,
            "query_pre_attn_scalar": 24,
            "final_logit_softcapping": 30.0,
        },
    ),
    "gemma2": (
        "gemma2",
        {
            "sliding_window": 20,
            "query_pre_attn_scalar": 24,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3-moe": (
        "qwen3_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "norm_topk_prob": False,
            "mlp_only_layers": [0],
        },
    ),
    "granite": (
        "granite",
        {
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.0078125,
            "logits_scaling": 8.0,
        },
    ),
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
    last = core.logits_for(out_step)[0]
    assert torch.allclose(last, expected_logits[-1], atol=1e-4, rtol=1e-4)
    core.finish("probe", "abort")
    assert core.max_model_len == 512  # a sliding window does not cap the context


@pytest.mark.parametrize("case", ["llama", "qwen2", "qwen3"])
def test_decode_steps_in_one_native_call_only_where_the_layers_allow(tiny_hf_model_dir, case):
    """fp16 Llama layers run a decode step in one native call (kernels/decode_step.c), with
    the layer-by-layer path's exact tokens; Qwen2's biases and Qwen3's q/k norms keep the
    layer-by-layer path."""
    from tokenmill.kernels import quant_matmul

    if not quant_matmul.vectorized():
        pytest.skip("fp16 runs on fbgemm here: no native panels to fuse")
    model_type, config = CASES[case]
    directory = tiny_hf_model_dir(model_type, **config)
    llm = LLM(str(directory), device="cpu", kv_cache_memory=16 << 20, quantization="fp16")
    backend = llm.engine.core.executor.worker.backend
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    fused = llm.generate([PROMPT], greedy)[0].outputs[0].token_ids
    assert (backend.fused_layers is not None) == (case == "llama")
    backend.fused_decode = False
    assert llm.generate([PROMPT], greedy)[0].outputs[0].token_ids == fused


def test_generation_config_json_sets_the_offline_defaults(tiny_hf_model_dir):
    """generate() without params uses the model's generation_config.json sampling fields;
    generation_config="vllm" ignores them."""
    import json

    directory = tiny_hf_model_dir("llama")
    settings = {"temperature": 0.0, "max_new_tokens": 5, "top_k": 3}
    (directory / "generation_config.json").write_text(json.dumps(settings))
    llm = LLM(str(directory), device="cpu", kv_cache_memory=16 << 20)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.max_tokens, defaults.top_k) == (0.0, 5, 3)
    got = llm.generate([PROMPT])[0].outputs[0].token_ids
    explicit = SamplingParams(temperature=0.0, max_tokens=5)
    assert got == llm.generate([PROMPT], explicit)[0].outputs[0].token_ids
    ignoring = LLM(str(directory), device="cpu", kv_cache_memory=16 << 20, generation_config="vllm")
    assert ignoring.get_default_sampling_params() == SamplingParams()


@pytest.mark.parametrize(
    "case", ["granite", "qwen3", "mistral", "gemma3", "gemma2", "mixtral", "qwen3-moe"]
)
def test_the_torch_reference_and_batching_agree(tiny_hf_model_dir, case):
    """The same greedy tokens from the CPU backend alone, batched with other prompts, and
    from the torch reference (SDPA with the model's own attention scale)."""
    model_type, config = CASES[case]
    directory = tiny_hf_model_dir(model_type, **config)
    prompts = [PROMPT, "Once upon a time", "1, 2, 3, 4,", PROMPT + " and then"]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    llm = LLM(str(directory), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == alone
    del llm
    reference = LLM(str(directory), dtype="float32", kv_cache_memory=16 << 20, backend="torch")
    assert [o.outputs[0].token_ids for o in reference.generate(prompts, greedy)] == alone


@pytest.mark.parametrize(
    "case", ["mistral", "phi3", "granite", "gemma2", "gemma3", "mixtral", "qwen3-moe"]
)
def test_prefix_cache_hits_and_preemption_do_not_change_greedy_output(tiny_hf_model_dir, case):
    """8 KV blocks of 16 tokens for 4 sequences of ~5 blocks each (2 of them a shared
    prefix): the batch is preempted and recomputed, and its prompts' shared blocks come from
    the prefix cache the runs alone filled; every sequence's tokens stay those it got alone."""
    model_type, config = CASES[case]
    directory = tiny_hf_model_dir(model_type, **config)
    block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # K and V, 2 layers, 16 tokens, 2 heads of 16, float32
    llm = LLM(str(directory), dtype="float32", kv_cache_memory=8 * block_bytes, max_model_len=128)
    assert llm.engine.core.info.num_blocks == 8
    prefix = "A shared opening, long enough to fill the first blocks of the cache, " * 3
    prompts = [prefix + tail for tail in ("one", "two two", "three three three", "four")]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    outputs = llm.generate(prompts, greedy)
    assert [o.outputs[0].token_ids for o in outputs] == alone
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert all(o.num_cached_tokens >= 16 for o in outputs)
    pool = llm.engine.core.kv_cache.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_gemma3_with_a_vision_tower_serves_text_with_its_language_model(tiny_hf_model_dir):
    """Gemma 3 4B/12B/27B checkpoints (Gemma3ForConditionalGeneration: text_config, the
    language model's weights under language_model.*, a vision tower and projector beside it):
    text prompts get transformers' greedy tokens and logits."""
    text = {
        "vocab_size": 49152,  # the bundled tokenizer's
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 20,
        "query_pre_attn_scalar": 16,
        "final_logit_softcapping": 30.0,  # which transformers' multimodal class ignores
    }
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 28, "patch_size": 14}  # fmt: skip
    directory = tiny_hf_model_dir(
        "gemma3", text_config=text, vision_config=vision, mm_tokens_per_image=4
    )
    import json

    config = json.loads((directory / "config.json").read_text())
    outer = {k: v for k, v in config.items() if k not in text or k == "tie_word_embeddings"}
    (directory / "config.json").write_text(json.dumps(outer))  # sizes in text_config only
    llm = LLM(str(directory), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    assert llm.engine.core.info.arch.vocab_size == 49152
    reference = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    assert type(reference).__name__ == "Gemma3ForConditionalGeneration"
    ids = llm.tokenizer.encode(PROMPT)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    generated = out[0].outputs[0].token_ids
    with torch.no_grad():
        expected = reference(torch.tensor([ids + generated[:-1]])).logits[0, len(ids) - 1 :]
    assert generated == expected.argmax(-1).tolist()
    core = llm.engine.core
    from tokenmill.engine.request import Request

    core.add_request(
        Request("probe", ids, SamplingParams(max_tokens=1), frozenset(), core.max_model_len)
    )
    last = core.logits_for(core.scheduler.schedule())[0]
    assert torch.allclose(last, expected[0], atol=1e-4, rtol=1e-4)
    core.finish("probe", "abort")
