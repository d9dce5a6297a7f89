"""--quantization rtn (vLLM's online round-to-nearest): a float checkpoint's linears rounded
to GGUF blocks at load (Q8_0; RTN_NUM_BITS=4: Q4_1; the head and the embedding Q8_0), run
as "gguf" runs a file's blocks.

- The blocks are llama.cpp's: equal byte for byte to gguf-py's reference quantizer.
- Placed right (every shard of a fused projection, the head and the embedding, tied or
  not): with float32 activations everywhere, a tiny safetensors checkpoint's logits equal transformers' on
  the same weights rounded and restored (gguf-py's dequantizer), up to summation order.
- Quality, on the bundled SmolLM2-135M (its Q4_1 GGUF dequantized, then rounded again to
  Q8_0), teacher-forced along float32's greedy continuations: measured 97.2% of positions
  with float32's argmax and per-prompt mean log-probabilities within 0.016 nats ("gguf" on
  the file's own blocks: 96.0%, 0.010).
- 4 bits of that dequantized file give back its own Q4_1 blocks byte for byte.
- Batch-invariant, and the decode step in one native call equals layer by layer.
- A mixture's experts are packed expert by expert, its routers never rounded.
"""

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from tests.model.test_quantized import (
    GREEDY,
    LOGPROBS,
    PROMPTS,
    all_logits,
    assert_same_tokens_and_logprobs,
    generate_fused_and_layered,
    no_prefix_cache_llm,
    quality,
    token_ids,
)
from tokenmill import LLM
from tokenmill.backends import formats, rtn
from tokenmill.errors import ModelLoadError
from tokenmill.kernels import gguf_rows, quant_matmul
from tokenmill.layers.linear import GGUFLinear, PackedLinear
from tokenmill.layers.moe import PackedExperts
from tokenmill.layers.vocab import GGUFEmbedding

pytestmark = pytest.mark.skipif(not quant_matmul.available(), reason="no C compiler")

# "gguf"'s bound (int8 activations over a file's blocks; test_quantized.py) with the
# log-probability gap widened from 0.02 to 0.03: rounding twice (the file's Q4_1, then Q8_0)
ARGMAX_AGREEMENT, LOGPROB_ATOL = 0.95, 0.03


@pytest.mark.parametrize("ggml_type", [quant_matmul.GGML_Q8_0, quant_matmul.GGML_Q4_1])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0])
def test_blocks_equal_gguf_pys_reference_quantizer(ggml_type, scale):
    torch.manual_seed(0)
    weight = torch.randn(48, 256) * scale
    weight[3, :32] = 0  # an all-zero block
    weight[5, 32:64] = 0.25  # a flat one (max == min)
    weight[7, 64:96] = torch.arange(32) - 15.5  # halves: rounded away from zero, as roundf
    reference = quants.quantize(weight.numpy(), gguf.GGMLQuantizationType(ggml_type))
    assert np.array_equal(rtn.quantize(weight, ggml_type).numpy(), reference)


def test_a_bad_rtn_num_bits_is_refused_before_a_weight_loads(tiny_hf_model_dir, monkeypatch):
    from tokenmill.backends.cpu import CpuBackend

    monkeypatch.setenv("RTN_NUM_BITS", "3")
    packed: list[str] = []
    monkeypatch.setattr(CpuBackend, "pack_loaded", lambda self, m, q, path: packed.append(path))
    with pytest.raises(ModelLoadError, match="RTN_NUM_BITS must be 4 or 8"):
        no_prefix_cache_llm(str(tiny_hf_model_dir("llama")), quantization="rtn")
    assert packed == []


def test_an_input_size_off_the_block_size_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        rtn.quantize(torch.ones(4, 48), quant_matmul.GGML_Q8_0)


def test_rtn_num_bits_picks_the_block_type(monkeypatch, caplog):
    monkeypatch.delenv("RTN_NUM_BITS", raising=False)
    assert rtn.weight_type() == quant_matmul.GGML_Q8_0
    monkeypatch.setenv("RTN_NUM_BITS", "4")
    assert rtn.weight_type() == quant_matmul.GGML_Q4_1
    monkeypatch.setenv("RTN_NUM_BITS", "3")
    with pytest.raises(ModelLoadError, match="RTN_NUM_BITS must be 4 or 8"):
        rtn.weight_type()
    monkeypatch.setenv("RTN_NUM_BITS", "8")
    monkeypatch.setenv("RTN_GROUP_SIZE", "128")
    with caplog.at_level("WARNING"):
        rtn.weight_type()
    assert "RTN_GROUP_SIZE=128 not used; GGUF blocks group 32" in caplog.text


def rounded_reference(directory, ggml_type: int) -> torch.nn.Module:
    """transformers' model of `directory` with every linear's weight rounded to
    `ggml_type` blocks (the head and the embedding to Q8_0) and restored by gguf-py's
    dequantizer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Embedding):
                kind = ggml_type if path.startswith("model.layers.") else quant_matmul.GGML_Q8_0
                blocks = rtn.quantize(module.weight, kind).numpy()
                restored = quants.dequantize(blocks, gguf.GGMLQuantizationType(kind))
                module.weight.copy_(torch.from_numpy(restored))
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    ("bits", "ggml_type"),
    [("8", quant_matmul.GGML_Q8_0), ("4", quant_matmul.GGML_Q4_1)],
    ids=["Q8_0", "Q4_1"],
)
def test_a_safetensors_checkpoints_logits_equal_its_rounded_weights_in_transformers(
    tiny_hf_model_dir, monkeypatch, bits, ggml_type, tied
):
    directory = tiny_hf_model_dir("llama", tie_word_embeddings=tied)
    monkeypatch.setenv("RTN_NUM_BITS", bits)
    # float32 activations everywhere and a float32 cache: only the weights are rounded
    monkeypatch.setattr(formats, "FLOAT_ACTIVATION_LAYERS", ("",))
    llm = no_prefix_cache_llm(str(directory), quantization="rtn", kv_cache_dtype="float32")
    model = llm.engine.core.executor.worker.model
    blocks = {path: m for path, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert len(blocks) == 4 * model.config.num_layers + 1  # qkv, o, gate_up, down; the head
    assert {m.ggml_type for path, m in blocks.items() if path != "lm_head"} == {ggml_type}
    assert blocks["lm_head"].ggml_type == quant_matmul.GGML_Q8_0
    assert not any(isinstance(m, torch.nn.Linear | PackedLinear) for m in model.modules())
    assert isinstance(model.model.embed_tokens, GGUFEmbedding)
    assert model.model.embed_tokens.ggml_type == quant_matmul.GGML_Q8_0
    assert llm.engine.core.info.quantization == "rtn"

    reference = rounded_reference(directory, ggml_type)
    ids = llm.tokenizer.encode("The capital of France is")
    ours = all_logits(llm.engine.core, ids)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    scale = expected.abs().max().item()
    assert (ours - expected).abs().max().item() < 2e-4 * scale
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_fp16_keeps_the_embedding_as_float16_rows(tiny_hf_model_dir, monkeypatch, tied):
    """ "fp16" on a float checkpoint: the embedding's table too is float16 (half its float32
    memory), so the logits equal transformers' with every weight rounded to float16."""
    directory = tiny_hf_model_dir("llama", tie_word_embeddings=tied)
    monkeypatch.setattr(formats, "FLOAT_ACTIVATION_LAYERS", ("",))
    llm = no_prefix_cache_llm(str(directory), quantization="fp16", kv_cache_dtype="float32")
    model = llm.engine.core.executor.worker.model
    embedding = model.model.embed_tokens
    assert isinstance(embedding, GGUFEmbedding) and embedding.ggml_type == gguf_rows.GGML_F16
    assert embedding.blocks.numel() == 2 * embedding.num_embeddings * embedding.embedding_dim
    assert isinstance(model.lm_head, PackedLinear)
    reference = packed_reference(directory, "fp16")
    assert llm.engine.core.info.num_parameters == sum(p.numel() for p in reference.parameters())
    ids = llm.tokenizer.encode("The capital of France is")
    ours = all_logits(llm.engine.core, ids)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    assert (ours - expected).abs().max().item() < 2e-4 * expected.abs().max().item()
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))


@pytest.fixture(scope="module")
def fp32_llm(bundled_gguf_path):
    return no_prefix_cache_llm(bundled_gguf_path)


@pytest.fixture(scope="module")
def rtn_llm(bundled_gguf_path):
    return no_prefix_cache_llm(bundled_gguf_path, quantization="rtn")


def test_every_linear_is_q8_0_blocks_with_int8_activations_but_the_first_layers(rtn_llm):
    model = rtn_llm.engine.core.executor.worker.model
    blocks = {path: m for path, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert len(blocks) == 4 * model.config.num_layers + 1  # the tied head too
    assert {m.ggml_type for m in blocks.values()} == {quant_matmul.GGML_Q8_0}
    float_activations = {path for path, m in blocks.items() if not m.int8_activations}
    assert float_activations == {p for p in blocks if p.startswith("model.layers.0.")}
    assert len(float_activations) == 4
    assert rtn_llm.engine.core.executor.worker.kv_cache_dtype == torch.float16  # as "gguf"


def test_q8_0_stays_within_ggufs_quality_bound(rtn_llm, fp32_llm):
    agreement, logprob_gap, _ = quality(rtn_llm, fp32_llm)
    assert agreement >= ARGMAX_AGREEMENT
    assert logprob_gap < LOGPROB_ATOL


def test_4_bits_of_the_bundled_q4_1_files_weights_give_back_the_files_own_blocks(
    bundled_gguf_path, rtn_llm, monkeypatch
):
    """The file's Q4_1 linears and Q8_0 embedding, dequantized and rounded again, are the
    same blocks byte for byte: rtn rounds as llama-quantize does."""
    monkeypatch.setenv("RTN_NUM_BITS", "4")
    rounded = LLM(bundled_gguf_path, quantization="rtn", kv_cache_memory=16 << 20)
    stored = LLM(bundled_gguf_path, quantization="gguf", kv_cache_memory=16 << 20)
    mine, theirs = (
        {path: m for path, m in llm.engine.core.executor.worker.model.named_modules()
         if isinstance(m, GGUFLinear)}
        for llm in (rounded, stored)
    )  # fmt: skip
    assert mine.keys() == theirs.keys()
    for path, linear in mine.items():
        assert linear.ggml_type == theirs[path].ggml_type, path
        assert torch.equal(linear.values, theirs[path].values), path
        assert torch.equal(linear.scales, theirs[path].scales), path


def test_batched_equals_alone(rtn_llm):
    alone = [token_ids(rtn_llm.generate([p], GREEDY))[0] for p in PROMPTS]
    assert token_ids(rtn_llm.generate(PROMPTS, GREEDY)) == alone


def test_the_decode_step_in_one_call_is_bit_identical_to_layer_by_layer(rtn_llm):
    fused, layered, calls = generate_fused_and_layered(rtn_llm, PROMPTS, LOGPROBS)
    assert calls >= LOGPROBS.max_tokens - 2  # decode-only steps took the native call
    assert_same_tokens_and_logprobs(fused, layered)


def test_refused_off_cpu_float32(bundled_gguf_path):
    with pytest.raises(ModelLoadError, match="CPU in float32 only"):
        LLM(bundled_gguf_path, dtype="bfloat16", kv_cache_memory=16 << 20, quantization="rtn")


def packed_reference(directory, quantization: str) -> torch.nn.Module:
    """transformers' model of `directory` with its weights as tokenmill packs them:
    under "rtn" rounded to Q8_0 where the input size allows, but the routers; else (and
    under "fp16" everywhere, the embedding too) rounded to float16."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2:
                continue
            router = name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
            inputs = param.shape[-1]
            if quantization == "rtn" and not router and inputs % 32 == 0:
                blocks = rtn.quantize(param.reshape(-1, inputs), quant_matmul.GGML_Q8_0).numpy()
                restored = quants.dequantize(blocks, gguf.GGMLQuantizationType.Q8_0)
                param.copy_(torch.from_numpy(restored).reshape(param.shape))
            else:
                param.copy_(param.half().float())
    return model


@pytest.mark.parametrize("quantization", ["rtn", "fp16"])
def test_a_mixtures_experts_are_packed_and_its_routers_keep_float16(
    tiny_hf_model_dir, monkeypatch, quantization
):
    """Each expert's projections are packed (rounded under rtn where 32 divides their
    input, the down projection's 48 not); the routers are never rounded (as vLLM: a small
    change in their logits sends a token to another expert). With float32 activations,
    the logits equal transformers' on the same weights."""
    from tests.model.test_qwen2_moe import CASES

    directory = tiny_hf_model_dir("qwen2_moe", **CASES["qwen2-moe"])
    monkeypatch.setattr(formats, "FLOAT_ACTIVATION_LAYERS", ("",))
    llm = no_prefix_cache_llm(str(directory), quantization=quantization, kv_cache_dtype="float32")
    moe = llm.engine.core.executor.worker.model.model.layers[1].mlp
    assert isinstance(moe.experts, PackedExperts) and moe.experts.num_experts == 4
    up = GGUFLinear if quantization == "rtn" else PackedLinear
    assert all(isinstance(m, up) for m in moe.experts.gate_up)
    assert all(isinstance(m, PackedLinear) for m in moe.experts.down)  # 48 inputs
    assert isinstance(moe.gate, PackedLinear) and isinstance(moe.shared_expert_gate, PackedLinear)

    ids = llm.tokenizer.encode("The capital of France is")
    ours = all_logits(llm.engine.core, ids)
    with torch.no_grad():
        expected = packed_reference(directory, quantization)(torch.tensor([ids])).logits[0]
    assert (ours - expected).abs().max().item() < 2e-4 * expected.abs().max().item()
    assert torch.equal(ours.argmax(-1), expected.argmax(-1))
