"""GGUF checkpoints: a ModelSource whose HF config comes from the metadata (per architecture)
and whose weights come through gguf_layout.py."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from tokenmill.errors import ModelLoadError
from tokenmill.model.config import FULL, SLIDING
from tokenmill.model.gguf_layout import weight_plan
from tokenmill.model.gguf_reader import GGUFFile, GGUFFormatError
from tokenmill.model.gguf_tokenizer import load_gguf_tokenizer, token_count
from tokenmill.model.source import ModelSource

# general.architecture -> (transformers' architecture, model_type). Mistral GGUFs say "llama",
# and so do Mixtral's (with experts: _MIXTRAL).
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "granite": ("GraniteForCausalLM", "granite"),
}
_MIXTRAL = ("MixtralForCausalLM", "mixtral")
_SUPPORTED = (
    "llama (and mistral and mixtral, written as llama), qwen2, qwen3, qwen2moe, qwen3moe, gemma2, "
    "gemma3, phi3, granite"
)
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
    plan = weight_plan(gguf_file, hf_config, gguf_file.metadata["general.architecture"])
    tokenizer = load_gguf_tokenizer(gguf_file)
    by_name = {weight.hf_name: weight for weight in plan}

    def read_weights(skip: frozenset[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for weight in plan:
            if weight.hf_name not in skip:
                yield weight.hf_name, weight.read(gguf_file)

    def read_blocks(hf_name: str) -> tuple[int, torch.Tensor] | None:
        return by_name[hf_name].read_blocks(gguf_file) if hf_name in by_name else None

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


class _Metadata:
    """One architecture's `{arch}.*` keys, per-layer arrays whose entries agree read as one."""

    def __init__(self, gguf_file: GGUFFile, arch: str):
        self.gguf_file, self.arch = gguf_file, arch

    def raw(self, key: str) -> Any:
        return self.gguf_file.metadata.get(f"{self.arch}.{key}")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self.gguf_file.metadata.get(f"{self.arch}.{key}", default)
        if value is _REQUIRED:
            raise ModelLoadError(
                f"GGUF file {self.gguf_file.path} lacks metadata '{self.arch}.{key}'"
            )
        return _single(value, f"{self.arch}.{key}", self.gguf_file.path)


def gguf_hf_config(gguf_file: GGUFFile) -> dict[str, Any]:
    """The config.json transformers would build for this file (plus what llama.cpp keeps
    outside its metadata: llama3 rope scaling, Gemma's attention scale, MoE dense layers)."""
    arch = gguf_file.metadata.get("general.architecture")
    if arch in ("clip", "mllama_vision"):  # llama.cpp's mmproj files: a vision encoder alone
        raise ModelLoadError(
            f"GGUF file {gguf_file.path} is a vision projector (llama.cpp's mmproj), not a "
            "language model; tokenmill serves vision models (LLaVA, Idefics3/SmolVLM, "
            "Qwen2.5-VL) from their Hugging Face safetensors directories, and a language "
            "GGUF alone as a text model"
        )
    if arch not in _ARCHITECTURES:
        raise ModelLoadError(
            f"GGUF file {gguf_file.path} has architecture '{arch}'; supported: {_SUPPORTED}"
        )
    meta = _Metadata(gguf_file, arch)
    config = _common_config(meta)
    is_mixtral = arch == "llama" and int(meta.get("expert_count", 0)) > 0
    arch_name, model_type = _MIXTRAL if is_mixtral else _ARCHITECTURES[arch]
    if extra := _mixtral_config if is_mixtral else _ARCH_CONFIG.get(arch):
        config |= extra(meta, config)
    return {"architectures": [arch_name], "model_type": model_type} | config


def _common_config(meta: _Metadata) -> dict[str, Any]:
    """What every architecture reads the same way."""
    gguf_file = meta.gguf_file
    hidden_size, num_heads = (
        int(meta.get("embedding_length")),
        int(meta.get("attention.head_count")),
    )
    head_dim = int(meta.get("attention.key_length", hidden_size // num_heads))
    rope_theta = float(meta.get("rope.freq_base", 10000.0))
    tensors = gguf_file.tensors
    embed = tensors.get("token_embd.weight")
    vocab_size = (
        meta.get("vocab_size", None) or token_count(gguf_file) or (embed.shape[0] if embed else 0)
    )
    return {
        "hidden_size": hidden_size,
        "intermediate_size": int(meta.get("feed_forward_length")),
        "num_hidden_layers": int(meta.get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.get("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": _rope_scaling(gguf_file, meta.get, rope_theta, head_dim),
        "max_position_embeddings": int(meta.get("context_length", 2048)),
        "vocab_size": int(vocab_size),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": any(n.endswith((".attn_q.bias", ".attn_qkv.bias")) for n in tensors),
        "torch_dtype": "float32",
        "bos_token_id": gguf_file.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_file.metadata.get("tokenizer.ggml.eos_token_id"),
    }


def _mixtral_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "num_local_experts": int(meta.get("expert_count")),
        "num_experts_per_tok": int(meta.get("expert_used_count")),
    }


def _qwen3_moe_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    tensors = meta.gguf_file.tensors
    layers = range(config["num_hidden_layers"])
    return {
        "num_experts": int(meta.get("expert_count")),
        "num_experts_per_tok": int(meta.get("expert_used_count")),
        "moe_intermediate_size": int(meta.get("expert_feed_forward_length")),
        # llama.cpp's converter does not write it and its qwen3moe graph always renormalises
        # (as every Qwen3-MoE release's config says), transformers' default notwithstanding
        "norm_topk_prob": bool(meta.get("expert_weights_norm", True)),
        # llama.cpp keeps no list of dense layers: they are the ones without a router
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in layers if f"blk.{i}.ffn_gate_inp.weight" not in tensors],
    }


def _qwen2_moe_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    layers = range(config["num_hidden_layers"])
    return {
        "num_experts": int(meta.get("expert_count")),
        "num_experts_per_tok": int(meta.get("expert_used_count")),
        "moe_intermediate_size": int(meta.get("expert_feed_forward_length")),
        "shared_expert_intermediate_size": int(meta.get("expert_shared_feed_forward_length", 0)),
        "norm_topk_prob": False,  # llama.cpp's qwen2moe graph does not renormalise the top k
        "decoder_sparse_step": 1,
        "mlp_only_layers": [
            i for i in layers if f"blk.{i}.ffn_gate_inp.weight" not in meta.gguf_file.tensors
        ],
    }


def _granite_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp writes each multiplier only where it is set; transformers' default is 1
    return {
        "embedding_multiplier": float(meta.get("embedding_scale", 1.0)),
        "residual_multiplier": float(meta.get("residual_scale", 1.0)),
        "attention_multiplier": float(meta.get("attention.scale", 1.0)),
        "logits_scaling": float(meta.get("logit_scale", 1.0)),
    }


def _phi3_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    head_dim = config["head_dim"]
    original = meta.get("rope.scaling.original_context_length", None)
    extra: dict[str, Any] = {
        # 0: no window (Phi-4, written by the same converter)
        "sliding_window": int(meta.get("attention.sliding_window", 0)) or None,
        "partial_rotary_factor": int(meta.get("rope.dimension_count", head_dim)) / head_dim,
    }
    if original is not None:
        extra["original_max_position_embeddings"] = int(original)
    tensors = meta.gguf_file.tensors
    if "rope_factors_long.weight" in tensors:  # the 128k models: LongRoPE
        read = meta.gguf_file.read_tensor
        original = int(original or config["max_position_embeddings"])
        extra["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": read(tensors["rope_factors_long.weight"]).tolist(),
            "short_factor": read(tensors["rope_factors_short.weight"]).tolist(),
            "factor": config["max_position_embeddings"] / original,
            "original_max_position_embeddings": original,
        }
    return extra


def _gemma_config(meta: _Metadata, config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2 and 3. llama.cpp keeps no query_pre_attn_scalar: its q.k scale is
    1/sqrt(head_dim), except for the 27B models (told by their layer count), 1/sqrt(hidden /
    heads); every Gemma 2 and 3 release's query_pre_attn_scalar agrees with that."""
    is_gemma3 = meta.arch == "gemma3"
    num_layers = config["num_hidden_layers"]
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    is_27b = num_layers == (62 if is_gemma3 else 46)
    extra: dict[str, Any] = {
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": hidden // heads if is_27b else config["head_dim"],
    }
    if is_gemma3:
        window = int(meta.get("attention.sliding_window", 0))  # 0 or absent: none
        extra |= {
            "rope_theta": float(meta.get("rope.freq_base", 1_000_000.0)),
            # llama.cpp's local base is fixed at transformers' default unless written
            "rope_local_base_freq": float(meta.get("rope.freq_base_swa", 10000.0)),
            "final_logit_softcapping": meta.get("final_logit_softcapping", None),
            "sliding_window": window or None,
            "layer_types": _gemma3_layer_types(meta, num_layers, window),
        }
    else:  # llama.cpp's (and transformers') defaults where the file is silent
        extra |= {
            "attn_logit_softcapping": float(meta.get("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": float(meta.get("final_logit_softcapping", 30.0)),
            "sliding_window": int(meta.get("attention.sliding_window", 4096)),
            "layer_types": [FULL if i % 2 else SLIDING for i in range(num_layers)],
        }
    return extra


def _gemma3_layer_types(meta: _Metadata, num_layers: int, window: int) -> list[str]:
    """Every 6th layer global (llama.cpp's fixed pattern), unless the file says otherwise: a
    period, or one is-sliding flag per layer."""
    if not window:
        return [FULL] * num_layers
    pattern = meta.raw("attention.sliding_window_pattern")
    if isinstance(pattern, np.ndarray) and pattern.size == num_layers:
        return [SLIDING if flag else FULL for flag in pattern.tolist()]
    period = int(pattern) if isinstance(pattern, int) and pattern > 0 else 6
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(num_layers)]


_ARCH_CONFIG: dict[str, Callable[[_Metadata, dict[str, Any]], dict[str, Any]]] = {
    "qwen2moe": _qwen2_moe_config,
    "qwen3moe": _qwen3_moe_config,
    "gemma2": _gemma_config,
    "gemma3": _gemma_config,
    "phi3": _phi3_config,
    "granite": _granite_config,
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
