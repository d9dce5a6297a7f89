"""Small random Qwen2-MoE directories (routed experts beside a gated shared expert, dense
layers where the config says): tokenmill's logits match transformers'."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from tokenmill import LLM, SamplingParams
from tokenmill.engine.request import Request
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.model.llama import LlamaMLP
from tokenmill.model.qwen2_moe import Qwen2MoeForCausalLM

MOE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 48,
    "shared_expert_intermediate_size": 96,
}
CASES = {
    # layer 0 dense through mlp_only_layers; the top 2's router weights as they are
    "qwen2-moe": {**MOE, "norm_topk_prob": False, "mlp_only_layers": [0]},
    # layer 0 dense through decoder_sparse_step (sparse: 1, 3, ...); the top 2 renormalised
    "qwen2-moe-norm-topk": {**MOE, "norm_topk_prob": True, "decoder_sparse_step": 2},
}
PROMPT = "The weather today is sunny with a chance of rain later in the evening, so"
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_logits_and_greedy_tokens_match(tiny_hf_model_dir, case):
    directory = tiny_hf_model_dir("qwen2_moe", **CASES[case])
    llm = LLM(str(directory), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    model = llm.engine.core.executor.worker.model
    layers = [layer.mlp for layer in model.model.layers]
    assert isinstance(layers[0], LlamaMLP) and isinstance(layers[1], SparseMoeBlock)
    reference = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    ids = llm.tokenizer.encode(PROMPT)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    generated = out.outputs[0].token_ids
    with torch.no_grad():
        expected_logits = reference(torch.tensor([ids + generated[:-1]])).logits[0, len(ids) - 1 :]
    assert generated == expected_logits.argmax(-1).tolist()
    # our logits for the last position, from a fresh prefill of prompt + generated tokens
    core = llm.engine.core
    full = ids + generated[:-1]
    core.add_request(
        Request("probe", full, SamplingParams(max_tokens=1), frozenset(), core.max_model_len)
    )
    last = core.logits_for(core.scheduler.schedule())[0]
    assert torch.allclose(last, expected_logits[-1], atol=1e-4, rtol=1e-4)
    core.finish("probe", "abort")


@pytest.mark.parametrize("case", list(CASES))
def test_the_torch_reference_and_batching_agree(tiny_hf_model_dir, case):
    """The same greedy tokens from the CPU backend alone, batched with other prompts (the
    experts see a different mix of tokens each step), and from the torch reference."""
    directory = tiny_hf_model_dir("qwen2_moe", **CASES[case])
    prompts = [PROMPT, "Once upon a time", "1, 2, 3, 4,", PROMPT + " and then"]
    llm = LLM(str(directory), dtype="float32", device="cpu", kv_cache_memory=16 << 20)
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts]
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == alone
    del llm
    reference = LLM(str(directory), dtype="float32", kv_cache_memory=16 << 20, backend="torch")
    assert [o.outputs[0].token_ids for o in reference.generate(prompts, GREEDY)] == alone


def test_prefix_cache_hits_and_preemption_do_not_change_greedy_output(tiny_hf_model_dir):
    """8 KV blocks of 16 tokens for 4 sequences of ~5 blocks each (2 of them a shared
    prefix): the batch is preempted and recomputed, and its prompts' shared blocks come from
    the prefix cache the runs alone filled; every sequence's tokens stay those it got alone."""
    directory = tiny_hf_model_dir("qwen2_moe", **CASES["qwen2-moe"])
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


TINY = {
    "architectures": ["Qwen2MoeForCausalLM"],
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 6,
    "num_attention_heads": 2,
    **MOE,
}


def test_silent_config_keys_take_transformers_qwen2_moe_defaults():
    """norm_topk_prob False and q/k/v biases where the config is silent (ArchConfig's own
    defaults are Qwen3-MoE's and Llama's); qkv_bias False drops them."""
    model = Qwen2MoeForCausalLM(TINY)
    assert not model.config.norm_topk_prob and model.config.attention_bias
    attention = model.model.layers[0].self_attn
    assert attention.qkv_proj.bias is not None and attention.o_proj.bias is None
    assert Qwen2MoeForCausalLM(TINY | {"qkv_bias": False}).config.attention_bias is False
    assert Qwen2MoeForCausalLM(TINY | {"norm_topk_prob": True}).config.norm_topk_prob


@pytest.mark.parametrize(
    "layout",
    [
        {},
        {"mlp_only_layers": [0, 4]},
        {"decoder_sparse_step": 2},
        {"decoder_sparse_step": 3, "mlp_only_layers": [5]},
        {"num_experts": 0},
    ],
)
def test_sparse_layers_are_those_transformers_builds(layout):
    """The layers with experts: (i + 1) % decoder_sparse_step == 0 and i not in
    mlp_only_layers, none without experts; the dense ones keep intermediate_size."""
    config = TINY | layout
    model = Qwen2MoeForCausalLM(config)
    reference = Qwen2MoeConfig(**{k: v for k, v in config.items() if k != "architectures"})
    expected = [
        reference.num_experts > 0
        and i not in reference.mlp_only_layers
        and (i + 1) % reference.decoder_sparse_step == 0
        for i in range(reference.num_hidden_layers)
    ]
    mlps = [layer.mlp for layer in model.model.layers]
    assert [isinstance(m, SparseMoeBlock) for m in mlps] == expected
    for mlp in mlps:
        if isinstance(mlp, SparseMoeBlock):
            assert isinstance(mlp.shared_expert, LlamaMLP)
            assert mlp.shared_expert.down_proj.in_features == 96
            assert mlp.experts.w2.shape == (4, 8, 48)
        else:
            assert mlp.down_proj.in_features == 12


@pytest.mark.parametrize("max_window_layers", [0, 3, 6])
def test_sliding_layers_follow_transformers_rule_where_the_config_names_none(max_window_layers):
    """Qwen2-MoE's rule (every other layer below max_window_layers slides) is not Qwen2's
    (the layers from max_window_layers on)."""
    window = {
        "use_sliding_window": True,
        "sliding_window": 32,
        "max_window_layers": max_window_layers,
    }
    model = Qwen2MoeForCausalLM(TINY | window)
    reference = Qwen2MoeConfig(**{k: v for k, v in (TINY | window).items() if k != "architectures"})
    assert model.config.layer_types == reference.layer_types
    assert [model.config.layer_window(i) for i in range(6)] == [
        32 if kind == "sliding_attention" else None for kind in reference.layer_types
    ]
    assert Qwen2MoeForCausalLM(TINY | {"sliding_window": 32}).config.sliding_window is None
