"""A small convert_hf_to_gguf.py: a tiny transformers checkpoint written as a GGUF file the
way llama.cpp's converter writes it (its metadata keys, its tensor names through gguf-py's
own name map, and its layout: q/k rows interleaved for "llama"-arch models, experts stacked
[E, ...], Gemma's norms stored as 1 + w, the router and 1-D tensors kept in float32)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file

# transformers model_type -> llama.cpp's general.architecture (Mixtral is written as llama)
ARCHITECTURES = {
    "llama": "llama",
    "mixtral": "llama",
    "granite": "granite",
    "phi3": "phi3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}
# the expert projections' names per expert -> llama.cpp's stacked tensor
_EXPERT_PARTS = {
    "w1": "ffn_gate_exps",
    "w3": "ffn_up_exps",
    "w2": "ffn_down_exps",
    "gate_proj": "ffn_gate_exps",
    "up_proj": "ffn_up_exps",
    "down_proj": "ffn_down_exps",
}


def hf_weights(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of the directory's safetensors shards, by transformers' name."""
    weights: dict[str, np.ndarray] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        weights |= load_file(str(shard))
    return weights


def write_llama_cpp_gguf(
    directory: Path, path: Path, qtype: Q = Q.F32, *, stack_experts: bool = True
) -> Path:
    """Convert the float32 checkpoint in `directory` as llama.cpp would (`--outtype` qtype:
    2-D weights in qtype where their rows are whole blocks; 1-D and router weights F32).
    `stack_experts=False`: one tensor per expert, "blk.N.ffn_gate.E.weight", as llama.cpp
    wrote Mixtral before it stacked them."""
    hf = json.loads((directory / "config.json").read_text())
    arch = ARCHITECTURES[hf["model_type"]]
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in llama_cpp_metadata(hf).items():
        _add(writer, f"{arch}.{key}", value)
    add_tokenizer(writer, hf["vocab_size"])
    arch_id = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = gguf.get_tensor_name_map(arch_id, hf["num_hidden_layers"])
    tensors = llama_cpp_tensors(hf, hf_weights(directory))
    if not stack_experts:
        tensors = unstacked_experts(tensors)
    for name, tensor in tensors.items():
        gguf_name = name if name.startswith("blk.") else names.get_name(name, (".weight", ".bias"))
        assert gguf_name is not None, name
        stored, stored_type = _stored(gguf_name, tensor, qtype)
        writer.add_tensor(gguf_name, stored, raw_dtype=stored_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def llama_cpp_metadata(hf: dict[str, Any]) -> dict[str, Any]:
    """The `{arch}.*` keys convert_hf_to_gguf.py writes for this config."""
    model_type = hf["model_type"]
    rope = hf.get("rope_parameters") or {}
    meta: dict[str, Any] = {
        "context_length": hf["max_position_embeddings"],
        "embedding_length": hf["hidden_size"],
        "feed_forward_length": hf["intermediate_size"],
        "block_count": hf["num_hidden_layers"],
        "attention.head_count": hf["num_attention_heads"],
        "attention.head_count_kv": hf["num_key_value_heads"],
        "attention.layer_norm_rms_epsilon": float(hf["rms_norm_eps"]),
    }
    if model_type != "granite":  # GraniteModel drops head_dim before the base class sees it
        meta |= {"attention.key_length": hf["head_dim"], "attention.value_length": hf["head_dim"]}
    if model_type == "gemma3_text":  # the global layers' base; the local one is not written
        meta["rope.freq_base"] = float(rope["full_attention"]["rope_theta"])
    elif model_type != "gemma2":  # Gemma2Model writes no rope base
        meta["rope.freq_base"] = float(rope["rope_theta"])
    if model_type in ("llama", "mixtral", "granite"):  # LlamaModel's own keys
        meta |= {"vocab_size": hf["vocab_size"], "rope.dimension_count": hf["head_dim"]}
    if model_type == "mixtral":
        meta |= {"expert_count": hf["num_local_experts"]}
        meta |= {"expert_used_count": hf["num_experts_per_tok"]}
    if model_type in ("qwen2_moe", "qwen3_moe"):
        meta |= {"expert_count": hf.get("num_experts") or hf["num_local_experts"]}
        meta |= {"expert_used_count": hf["num_experts_per_tok"]}
        meta |= {"expert_feed_forward_length": hf["moe_intermediate_size"]}
    if model_type == "qwen2_moe":
        meta |= {"expert_shared_feed_forward_length": hf["shared_expert_intermediate_size"]}
    if model_type == "granite":
        meta |= {
            "attention.scale": float(hf["attention_multiplier"]),
            "embedding_scale": float(hf["embedding_multiplier"]),
            "residual_scale": float(hf["residual_multiplier"]),
            "logit_scale": float(hf["logits_scaling"]),
        }
    if model_type == "phi3":
        meta |= {
            "rope.scaling.original_context_length": hf["original_max_position_embeddings"],
            "rope.dimension_count": hf["head_dim"],
            "attention.sliding_window": hf.get("sliding_window") or 0,
        }
    if model_type == "gemma2":
        meta |= {
            "attn_logit_softcapping": float(hf["attn_logit_softcapping"]),
            "final_logit_softcapping": float(hf["final_logit_softcapping"]),
            "attention.sliding_window": hf["sliding_window"],
        }
    if model_type == "gemma3_text":
        meta["attention.sliding_window"] = hf["sliding_window"]
        if hf.get("final_logit_softcapping"):
            meta["final_logit_softcapping"] = float(hf["final_logit_softcapping"])
    return meta


def llama_cpp_tensors(hf: dict[str, Any], weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """transformers' tensors in llama.cpp's layout: names still transformers' except the
    stacked experts (already "blk.N.ffn_*_exps.weight")."""
    model_type = hf["model_type"]
    heads, kv_heads = hf["num_attention_heads"], hf["num_key_value_heads"]
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, w in weights.items():
        if model_type.startswith("gemma") and name == "lm_head.weight":
            continue  # Gemma's converter drops it: the embedding is the output
        if model_type.startswith("gemma") and name.endswith("norm.weight"):
            w = w + np.float32(1)
        is_qk = name.endswith(("q_proj.weight", "k_proj.weight"))
        if model_type in ("llama", "mixtral", "granite") and is_qk:
            w = llama_cpp_permute(w, heads if "q_proj" in name else kv_heads)
        if ".experts." in name:
            layer = name.split(".")[2]
            expert, part = name.split(".experts.")[1].split(".")[:2]
            experts.setdefault(f"blk.{layer}.{_EXPERT_PARTS[part]}.weight", {})[int(expert)] = w
            continue
        out[name] = w
    for name, by_expert in experts.items():
        out[name] = np.stack([by_expert[e] for e in sorted(by_expert)])  # [E, rows, cols]
    return out


def unstacked_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """blk.N.ffn_gate_exps.weight [E, ...] -> blk.N.ffn_gate.E.weight each."""
    out = {}
    for name, tensor in tensors.items():
        if "_exps." not in name:
            out[name] = tensor
            continue
        base = name.removesuffix("_exps.weight")
        out |= {f"{base}.{e}.weight": expert for e, expert in enumerate(tensor)}
    return out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: interleave the two rotary halves of each head."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def add_tokenizer(writer: gguf.GGUFWriter, vocab_size: int) -> None:
    """A byte-level BPE vocabulary of `vocab_size` tokens (bos 1, eos 2) with a few merges:
    enough for the GGUF to carry a tokenizer whose size matches the model's."""
    tokens = ["<unk>", "<s>", "</s>", *gpt2_byte_alphabet(), "Ġt", "he", "Ġthe"]
    tokens += [f"<unused_{i}>" for i in range(vocab_size - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def gpt2_byte_alphabet() -> list[str]:
    """GPT-2's bytes_to_unicode table in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), 256)
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _stored(gguf_name: str, w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
    """What llama.cpp stores: 1-D tensors and the router in F32, rows that are not whole
    blocks in F32 too, everything else in `qtype`."""
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if qtype == Q.F32 or w.ndim == 1 or "ffn_gate_inp" in gguf_name or w.shape[-1] % block_size:
        return w.astype(np.float32), Q.F32
    return gguf.quants.quantize(w, qtype), qtype


def _add(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_uint32(key, int(value))
