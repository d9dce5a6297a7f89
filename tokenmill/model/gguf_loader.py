"""GGUF checkpoints: HF config from metadata, HF tensor names, and llama.cpp's layout undone."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from tokenmill.errors import ModelLoadError
from tokenmill.model.gguf_reader import GGUFFile, GGUFFormatError, GGUFTensorInfo
from tokenmill.model.gguf_tokenizer import load_gguf_tokenizer, token_count
from tokenmill.model.source import ModelSource

# general.architecture -> HF architecture. Mistral GGUFs say "llama".
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
_SUPPORTED = "llama (and mistral, written as llama), qwen2, qwen3"

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # llama3 rope scaling, as per-frequency divisors
_REQUIRED = object()


def load_gguf(path: str, name: str) -> ModelSource:
    """A ModelSource over a .gguf file; raises ModelLoadError naming what is wrong with it."""
    try:
        gguf_file = GGUFFile(path)
    except (GGUFFormatError, OSError) as exc:
        raise ModelLoadError(f"cannot read GGUF file {path}: {exc}") from exc
    try:
        hf_config = gguf_hf_config(gguf_file)
    except (TypeError, ValueError, ZeroDivisionError) as exc:  # a number stored as a string...
        raise ModelLoadError(f"GGUF file {path} has malformed metadata: {exc}") from exc
    plan = _weight_plan(gguf_file, hf_config)
    tokenizer = load_gguf_tokenizer(gguf_file)

    def read_weights() -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name, info, num_heads in plan:
            tensor = gguf_file.read_tensor(info)
            yield hf_name, _unpermute_rotary(tensor, num_heads) if num_heads else tensor

    by_name = {hf_name: (info, num_heads) for hf_name, info, num_heads in plan}

    def read_blocks(hf_name: str) -> tuple[int, torch.Tensor] | None:
        if hf_name not in by_name or len(by_name[hf_name][0].shape) != 2:
            return None
        info, num_heads = by_name[hf_name]
        rows = gguf_file.read_blocks(info)  # quantized rows are independent: permute whole rows
        return info.ggml_type, _unpermute_rotary(rows, num_heads) if num_heads else rows

    return ModelSource(
        name=name,
        path=path,
        file_format="gguf",
        hf_config=hf_config,
        tokenizer=tokenizer,
        num_weights=len(plan),
        read_weights=read_weights,
        read_blocks=read_blocks,
    )


def gguf_hf_config(gguf_file: GGUFFile) -> dict[str, Any]:
    """The config.json transformers would build for this file (plus llama3 rope scaling)."""
    meta = gguf_file.metadata
    arch = meta.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {gguf_file.path} has architecture '{arch}'; supported: {_SUPPORTED}"
        )

    def get(key: str, default: Any = _REQUIRED) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is _REQUIRED:
            raise ModelLoadError(f"GGUF file {gguf_file.path} lacks metadata '{arch}.{key}'")
        return _single(value, f"{arch}.{key}", gguf_file.path)

    hidden_size, num_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden_size // num_heads))
    rope_theta = float(get("rope.freq_base", 10000.0))
    tensors = gguf_file.tensors
    embed = tensors.get("token_embd.weight")
    vocab_size = (
        get("vocab_size", None) or token_count(gguf_file) or (embed.shape[0] if embed else 0)
    )
    return {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden_size,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(gguf_file, get, rope_theta, head_dim),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": any(n.endswith(".attn_q.bias") for n in tensors),
        "torch_dtype": "float32",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }


def _single(value: Any, key: str, path: str) -> Any:
    """A per-layer array whose entries all agree is that one value; otherwise unsupported."""
    if not isinstance(value, np.ndarray):
        return value
    if value.size == 0 or (value != value.flat[0]).any():
        raise ModelLoadError(f"GGUF file {path}: per-layer '{key}' values are not supported")
    return value.flat[0].item()


def _rope_scaling(
    gguf_file: GGUFFile, get: Callable[..., Any], rope_theta: float, head_dim: int
) -> dict[str, Any] | None:
    if _ROPE_FREQS in gguf_file.tensors:
        freqs = gguf_file.read_tensor(gguf_file.tensors[_ROPE_FREQS])
        return llama3_rope_scaling(freqs, rope_theta, head_dim, gguf_file.path)
    kind = get("rope.scaling.type", None)
    factor = get("rope.scaling.factor", None) or get("rope.scale_linear", None)
    if kind in (None, "none") and factor is None:
        return None
    if kind in (None, "linear"):
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        original = get("rope.scaling.original_context_length", None) or get("context_length")
        return {
            "rope_type": "yarn",
            "factor": float(factor),
            "original_max_position_embeddings": int(original),
        }
    raise ModelLoadError(f"GGUF file {gguf_file.path}: rope scaling type '{kind}' is not supported")


def llama3_rope_factors(
    wavelen: torch.Tensor, factor: float, low: float, high: float, original: int
) -> torch.Tensor:
    """llama.cpp's rope_freqs for a llama3 rope_scaling: 1 for short waves, `factor` for long."""
    smooth = (original / wavelen - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    long_waves = torch.where(wavelen > original / low, torch.full_like(wavelen, factor), blended)
    return torch.where(wavelen < original / high, torch.ones_like(wavelen), long_waves)


def llama3_rope_scaling(
    freqs: torch.Tensor, rope_theta: float, head_dim: int, path: str
) -> dict[str, Any]:
    """Recover HF's llama3 rope_scaling dict from the divisors llama.cpp stores instead.

    Only the ratios original/low and original/high matter, so original is pinned to Llama 3's
    8192 and low/high are fitted from the blended band (1 < divisor < factor), where
    smooth = original / (high - low) / wavelen - low / (high - low) is linear in 1 / wavelen.
    """
    freqs = freqs.double()
    inv_freq = rope_theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    factor, original = float(str(np.float32(freqs.max().item()))), 8192
    candidates = [(1.0, 4.0)]  # every Llama 3.x release
    blended = (freqs > 1 + 1e-6) & (freqs < factor - 1e-6)
    if factor > 1 and int(blended.sum()) >= 2:
        smooth = (1 / freqs[blended] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit((1 / wavelen[blended]).numpy(), smooth.numpy(), 1)
        candidates.append((-intercept * original / slope, (1 - intercept) * original / slope))
    for low, high in candidates:
        expected = llama3_rope_factors(wavelen, factor, low, high, original)
        if len(expected) == len(freqs) and torch.allclose(expected, freqs, rtol=1e-4):
            return {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": round(float(low), 4),
                "high_freq_factor": round(float(high), 4),
                "original_max_position_embeddings": original,
            }
    raise ModelLoadError(f"GGUF file {path}: cannot interpret rope_freqs.weight as llama3 scaling")


def hf_tensor_name(gguf_name: str) -> str | None:
    """transformers' name for a GGUF tensor ("blk.3.attn_q.weight" -> "model.layers.3....")."""
    if match := _LAYER_TENSOR.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}" if part in _LAYER_NAMES else None
    base, _, kind = gguf_name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def _weight_plan(
    gguf_file: GGUFFile, hf_config: dict[str, Any]
) -> list[tuple[str, GGUFTensorInfo, int]]:
    """(HF name, tensor, heads to un-interleave or 0) for every weight, checked before reading."""
    # llama.cpp interleaves q/k rows for its rotary kernel only when converting "llama" models
    permute = hf_config["model_type"] == "llama"
    heads = {"q_proj": hf_config["num_attention_heads"], "k_proj": hf_config["num_key_value_heads"]}
    plan = []
    for info in gguf_file.tensors.values():
        if info.name == _ROPE_FREQS:
            continue
        hf_name = hf_tensor_name(info.name)
        if hf_name is None:
            raise ModelLoadError(
                f"GGUF file {gguf_file.path}: tensor '{info.name}' has no equivalent in a "
                f"{hf_config['architectures'][0]} (mixture-of-experts and vision GGUFs are not supported)"
            )
        if not info.is_dequantizable:
            raise ModelLoadError(
                f"GGUF file {gguf_file.path}: tensor '{info.name}' is stored as {info.type_name}, "
                "which gguf cannot dequantize"
            )
        projection = hf_name.split(".")[-2]
        num_heads = heads.get(projection, 0) if permute else 0
        plan.append((hf_name, info, num_heads))
    return plan


def _unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row interleave, as transformers' GGUF loader does.

    convert_hf_to_gguf.py writes w.reshape(H, 2, D // 2, ...).swapaxes(1, 2): per head, row
    pairs (i, i + D/2) become adjacent. Reading them back: reshape(H, D // 2, 2, ...).swapaxes(1, 2).
    """
    head_dim = weight.shape[0] // num_heads
    split = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # [H, D/2, 2, ...]
    return split.transpose(1, 2).reshape(weight.shape)
