"""GGUF files of every architecture, written the way llama.cpp's converter writes them, load
as their transformers twin: the same config, the same weights, the same greedy tokens and
logits (float32); Q8_0 files keep their blocks in transformers' row order."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests.model.gguf_writing import hf_weights, write_llama_cpp_gguf
from tokenmill import LLM, SamplingParams
from tokenmill.engine.request import Request
from tokenmill.kernels import quant_matmul
from tokenmill.layers.linear import GGUFLinear
from tokenmill.layers.moe import PackedExperts
from tokenmill.layers.vocab import GGUFEmbedding
from tokenmill.model.config import FULL, SLIDING, ArchConfig
from tokenmill.model.gguf_layout import weight_plan
from tokenmill.model.gguf_loader import gguf_hf_config
from tokenmill.model.gguf_reader import GGUFFile
from tokenmill.model.loader import load_model_source
from tokenmill.model.registry import model_class

# tiny_hf_model_dir configs; prompts stay shorter than the sliding windows (256)
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma2": (
        "gemma2",
        {
            "tie_word_embeddings": True,  # llama.cpp drops Gemma's lm_head
            "sliding_window": 256,
            "query_pre_attn_scalar": 16,  # head_dim: what llama.cpp uses (no metadata for it)
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 30.0,
        },
    ),
    "gemma3": (
        "gemma3_text",
        {
            "tie_word_embeddings": True,
            "num_hidden_layers": 6,  # llama.cpp's fixed pattern: the 6th layer global
            "sliding_window": 256,
            "query_pre_attn_scalar": 16,
            "final_logit_softcapping": 30.0,
        },
    ),
    "phi3": ("phi3", {"sliding_window": 256}),
    "granite": (
        "granite",
        {
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.0078125,
            "logits_scaling": 8.0,
        },
    ),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # llama.cpp's qwen2moe never renormalises the top k; the shared expert is gated
    "qwen2-moe": (
        "qwen2_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "shared_expert_intermediate_size": 96,
            "norm_topk_prob": False,
        },
    ),
    # llama.cpp's qwen3moe has no dense layers and always renormalises the top k
    "qwen3-moe": (
        "qwen3_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "norm_topk_prob": True,
        },
    ),
}
PROMPT = "The weather today is sunny with a chance of rain later in the evening, so"
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(autouse=True, scope="module")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The GGUF tokenizers are converted into a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        yield


def twin_weights(directory: Path, hf_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The transformers checkpoint's weights as a GGUF yields them: Phi-3's fused q|k|v and
    gate|up as their parts (the model loads either), the lm_head absent when tied."""
    q, kv = (
        hf_config[k] * hf_config["head_dim"] for k in ("num_attention_heads", "num_key_value_heads")
    )
    weights = {}
    for name, array in hf_weights(directory).items():
        tensor = torch.from_numpy(array)
        if name.endswith("qkv_proj.weight"):
            parts = zip(("q_proj", "k_proj", "v_proj"), tensor.split([q, kv, kv]), strict=True)
            weights |= {name.replace("qkv_proj", p): t for p, t in parts}
        elif name.endswith("gate_up_proj.weight"):
            parts = zip(("gate_proj", "up_proj"), tensor.chunk(2), strict=True)
            weights |= {name.replace("gate_up_proj", p): t for p, t in parts}
        elif not (name == "lm_head.weight" and hf_config["tie_word_embeddings"]):
            weights[name] = tensor
    return weights


def arch_fields(hf_config: dict[str, Any]) -> dict[str, Any]:
    """What the model reads from its config, as its class reads it (Gemma 3 reads its two
    rope bases elsewhere; layer types as each layer's window)."""
    with torch.device("meta"):
        config: ArchConfig = model_class(hf_config)(hf_config).config
    fields = dataclasses.asdict(config)
    fields["layer_types"] = [config.layer_window(i) for i in range(config.num_layers)]
    if hf_config["model_type"] == "gemma3_text":
        del fields["rope_theta"], fields["rope_scaling"]
    return fields


def greedy_and_logits(llm: LLM, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """The greedy continuation of `ids`, and the logits of a fresh prefill of it (all but the
    last token) at its last position."""
    tokens = llm.generate([ids], GREEDY)[0].outputs[0].token_ids
    core = llm.engine.core
    full = ids + tokens[:-1]
    core.add_request(Request("probe", full, SamplingParams(max_tokens=1), frozenset(), 4096))
    logits = core.logits_for(core.scheduler.schedule())[0]
    core.finish("probe", "abort")
    return tokens, logits


def engine(path: Path, **kwargs: Any) -> LLM:
    return LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=16 << 20, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_float32_gguf_is_its_transformers_twin(tiny_hf_model_dir, tmp_path: Path, case: str):
    model_type, config = CASES[case]
    directory = tiny_hf_model_dir(model_type, **config)
    path = write_llama_cpp_gguf(directory, tmp_path / f"{case}.gguf")
    twin_config = json.loads((directory / "config.json").read_text())
    source = load_model_source(str(path))

    assert source.hf_config["architectures"] == twin_config["architectures"]
    assert arch_fields(source.hf_config) == arch_fields(twin_config)
    expected, weights = twin_weights(directory, twin_config), dict(source.iter_weights())
    assert set(weights) == set(expected) and len(weights) == source.num_weights
    for name, tensor in weights.items():  # Gemma's norms went through 1 + w in float32
        atol = 1e-6 if model_type.startswith("gemma") and name.endswith("norm.weight") else 0
        assert torch.allclose(tensor, expected[name], rtol=0, atol=atol), name

    hf_llm = engine(directory)
    ids = hf_llm.tokenizer.encode(PROMPT)
    tokens, logits = greedy_and_logits(hf_llm, ids)
    del hf_llm
    gguf_tokens, gguf_logits = greedy_and_logits(engine(path), ids)
    assert gguf_tokens == tokens
    assert torch.allclose(gguf_logits, logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["phi3", "mixtral"])
def test_q8_0_gguf_weights_and_blocks_in_transformers_order(
    tiny_hf_model_dir, tmp_path: Path, case: str
):
    """Q8_0 rows quantize independently, so the file's values are the twin's rows, each
    quantized: Phi-3's split q|k|v and gate|up, Mixtral's un-interleaved q/k and per-expert
    slices of the stacked experts, dequantized and as blocks."""
    model_type, config = CASES[case]
    directory = tiny_hf_model_dir(model_type, **config)
    path = write_llama_cpp_gguf(directory, tmp_path / f"{case}.gguf", Q.Q8_0)
    source = load_model_source(str(path))
    assert source.read_blocks is not None
    weights = dict(source.iter_weights())
    twin_config = json.loads((directory / "config.json").read_text())
    num_blocks = 0
    for name, expected in twin_weights(directory, twin_config).items():
        w = expected.numpy()
        quantized = w.ndim == 2 and not name.endswith("block_sparse_moe.gate.weight")
        if quantized:
            w = gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0)
        assert weights[name].numpy().tobytes() == w.tobytes(), name
        blocks = source.read_blocks(name)
        if quantized:
            assert blocks is not None and blocks[0] == Q.Q8_0, name
            assert np.array_equal(gguf.quants.dequantize(blocks[1].numpy(), Q.Q8_0), w), name
            num_blocks += 1
    assert num_blocks >= 7 * 2  # every projection of both layers, experts included
    if case == "phi3" and quant_matmul.available():
        assert_split_projections_run_on_their_blocks(path)


def assert_split_projections_run_on_their_blocks(path: Path) -> None:
    """Phi-3's q|k|v and gate|up, split at load, are joined again as one GGUFLinear each,
    with the dequantized model's greedy tokens."""
    blocks_llm = engine(path, quantization="gguf-float32")
    layer = blocks_llm.engine.core.executor.worker.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, GGUFLinear)
    assert isinstance(layer.mlp.gate_up_proj, GGUFLinear)
    ids = blocks_llm.tokenizer.encode(PROMPT)
    tokens, logits = greedy_and_logits(blocks_llm, ids)
    exact_tokens, exact_logits = greedy_and_logits(engine(path), ids)
    assert tokens == exact_tokens
    assert torch.allclose(logits, exact_logits, atol=2e-3)


def test_mixtral_gguf_with_one_tensor_per_expert(tiny_hf_model_dir, tmp_path: Path):
    """Mixtral GGUFs written before llama.cpp stacked the experts load the same weights."""
    model_type, config = CASES["mixtral"]
    directory = tiny_hf_model_dir(model_type, **config)
    stacked = write_llama_cpp_gguf(directory, tmp_path / "stacked.gguf")
    per_expert = write_llama_cpp_gguf(directory, tmp_path / "old.gguf", stack_experts=False)
    assert "blk.1.ffn_down.3.weight" in GGUFFile(str(per_expert)).tensors
    expected = dict(load_model_source(str(stacked)).iter_weights())
    weights = dict(load_model_source(str(per_expert)).iter_weights())
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[name], expected[name]) for name in weights)


def metadata_gguf(path: Path, arch: str, meta: dict[str, Any], **tensors: np.ndarray) -> GGUFFile:
    """A GGUF with these `{arch}.*` keys and tensors (no tokenizer): for config checks."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if isinstance(value, list):
            writer.add_array(f"{arch}.{key}", value)
        elif isinstance(value, float):
            writer.add_float32(f"{arch}.{key}", value)
        else:
            writer.add_uint32(f"{arch}.{key}", value)
    for name, tensor in tensors.items():
        writer.add_tensor(f"{name}.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(str(path))


def gemma3_meta(**extra: Any) -> dict[str, Any]:
    # Gemma 3 27B's shape: 62 layers, 5376 wide, 32 heads of 128
    return {
        "block_count": 62,
        "embedding_length": 5376,
        "feed_forward_length": 21504,
        "attention.head_count": 32,
        "attention.head_count_kv": 16,
        "attention.key_length": 128,
        "attention.value_length": 128,
    } | extra


def test_gemma_attention_scale_and_layer_pattern_as_llama_cpp_runs_them(tmp_path: Path):
    """llama.cpp stores no query_pre_attn_scalar: the 27B models scale by hidden / heads
    (168, as Gemma 3 27B's config says), the others by head_dim; every 6th layer is global
    unless the file lists each layer's kind, and none slides without a window."""
    embd = np.zeros((4, 16), dtype=np.float32)
    config = gguf_hf_config(
        metadata_gguf(
            tmp_path / "a.gguf",
            "gemma3",
            gemma3_meta(**{"attention.sliding_window": 1024}),
            token_embd=embd,
        )
    )
    assert config["query_pre_attn_scalar"] == 168 and config["sliding_window"] == 1024
    assert config["layer_types"][:6] == [SLIDING] * 5 + [FULL]
    assert config["rope_theta"] == 1_000_000.0 and config["rope_local_base_freq"] == 10000.0
    assert config["final_logit_softcapping"] is None and config["tie_word_embeddings"] is True
    flags = [i % 2 == 0 for i in range(62)]
    pattern = gemma3_meta(
        **{"attention.sliding_window": 512, "attention.sliding_window_pattern": flags}
    )
    config = gguf_hf_config(metadata_gguf(tmp_path / "b.gguf", "gemma3", pattern, token_embd=embd))
    assert config["layer_types"][:3] == [SLIDING, FULL, SLIDING]
    no_window = gemma3_meta(block_count=26, **{"attention.key_length": 256})
    config = gguf_hf_config(
        metadata_gguf(tmp_path / "c.gguf", "gemma3", no_window, token_embd=embd)
    )
    assert config["query_pre_attn_scalar"] == 256 and config["sliding_window"] is None
    assert config["layer_types"] == [FULL] * 26


def test_phi3_longrope_factors_become_its_rope_scaling(tmp_path: Path):
    """Phi-3 128k's rope_factors_long/short tensors are config, not weights."""
    long, short = np.linspace(1, 40, 8, dtype=np.float32), np.linspace(1, 2, 8, dtype=np.float32)
    meta = {
        "block_count": 1,
        "context_length": 131072,
        "rope.scaling.original_context_length": 4096,
        "embedding_length": 64,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "rope.dimension_count": 16,
        "attention.sliding_window": 0,
    }
    gguf_file = metadata_gguf(
        tmp_path / "phi3.gguf",
        "phi3",
        meta,
        token_embd=np.zeros((4, 64), dtype=np.float32),
        rope_factors_long=long,
        rope_factors_short=short,
    )
    config = gguf_hf_config(gguf_file)
    assert config["rope_scaling"] == {
        "rope_type": "longrope",
        "long_factor": long.tolist(),
        "short_factor": short.tolist(),
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
    }
    assert config["sliding_window"] is None and config["partial_rotary_factor"] == 1.0
    assert [w.hf_name for w in weight_plan(gguf_file, config, "phi3")] == [
        "model.embed_tokens.weight"
    ]


def q8_0_blocks_watching_reads(
    case: str, tiny_hf_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, LLM, list[str]]:
    """CASES[case] written as a Q8_0 GGUF, loaded with quantization gguf-float32: (the
    file, the engine, the names of the tensors it read as floats)."""
    if not quant_matmul.available():
        pytest.skip("GGUF blocks need the native kernels")
    model_type, config = CASES[case]
    path = write_llama_cpp_gguf(
        tiny_hf_model_dir(model_type, **config), tmp_path / f"{case}.gguf", Q.Q8_0
    )
    read: list[str] = []
    read_tensor = GGUFFile.read_tensor
    with monkeypatch.context() as watch:
        watch.setattr(
            GGUFFile, "read_tensor", lambda f, info: read.append(info.name) or read_tensor(f, info)
        )
        return path, engine(path, quantization="gguf-float32"), read


def test_linears_kept_as_blocks_are_never_dequantized(
    tiny_hf_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The backend swaps its GGUFLinears and GGUFEmbedding in before the weights load: the
    tensors they hold are never read as floats (norms, biases and router are), and
    Qwen2-MoE's fused q|k|v keeps its bias, loaded through the projection's shards: the
    dequantized model's greedy tokens."""
    path, blocks_llm, read = q8_0_blocks_watching_reads(
        "qwen2-moe", tiny_hf_model_dir, tmp_path, monkeypatch
    )
    layer = blocks_llm.engine.core.executor.worker.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, GGUFLinear)
    assert layer.self_attn.qkv_proj.bias is not None
    linears = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight",
               "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")  # fmt: skip
    assert read and not [name for name in read if name.endswith(linears)], read
    assert {"blk.0.attn_q.bias", "blk.0.ffn_gate_inp.weight"} <= set(read)
    assert "token_embd.weight" not in read
    assert isinstance(
        blocks_llm.engine.core.executor.worker.model.model.embed_tokens, GGUFEmbedding
    )
    ids = blocks_llm.tokenizer.encode(PROMPT)
    tokens, logits = greedy_and_logits(blocks_llm, ids)
    exact_tokens, exact_logits = greedy_and_logits(engine(path), ids)
    assert tokens == exact_tokens
    # the blocks' float32 sums run in another order than torch's matmul, and Qwen2-MoE's
    # gates amplify that (measured 5e-3, the same before the blocks loaded first); its
    # experts (48 inputs: the converter writes them in float) are packed as float16, as
    # any layer a GGUF file stores in float (measured 2.0e-2 with those)
    assert torch.allclose(logits, exact_logits, atol=5e-2)


def test_experts_kept_as_blocks_are_never_dequantized(
    tiny_hf_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A mixture's stacked expert tensors (ffn_*_exps) stay in their blocks, expert by
    expert (PackedExperts of GGUFLinears): never read as floats, and the dequantized
    model's greedy tokens. (Experts whose down projection has 48 inputs, as the Qwen MoE
    cases', are written in float by llama.cpp's converter and load as floats.)"""
    path, blocks_llm, read = q8_0_blocks_watching_reads(
        "mixtral", tiny_hf_model_dir, tmp_path, monkeypatch
    )
    model = blocks_llm.engine.core.executor.worker.model
    experts = [m for m in model.modules() if isinstance(m, PackedExperts)]
    assert experts and all(
        isinstance(p, GGUFLinear) for e in experts for p in [*e.gate_up, *e.down]
    )
    assert read and not [name for name in read if "_exps" in name], read
    ids = blocks_llm.tokenizer.encode(PROMPT)
    tokens, logits = greedy_and_logits(blocks_llm, ids)
    exact_tokens, exact_logits = greedy_and_logits(engine(path), ids)
    assert tokens == exact_tokens
    assert torch.allclose(logits, exact_logits, atol=2e-2)
