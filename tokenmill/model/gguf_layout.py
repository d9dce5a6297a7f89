"""GGUF tensor names -> transformers' names, with llama.cpp's layout undone: q/k rows
interleaved for its rotary kernel, fused projections split, stacked experts sliced, Gemma's
norms stored as 1 + w."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import gguf
import torch

from tokenmill.errors import ModelLoadError
from tokenmill.model.gguf_reader import GGUFFile, GGUFTensorInfo

_T = gguf.GGMLQuantizationType

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# per-layer GGUF name -> transformers' name(s); several: rows of one fused tensor, in order
_LAYER_NAMES: dict[str, tuple[str, ...]] = {
    "attn_norm": ("input_layernorm",),
    "attn_q": ("self_attn.q_proj",),
    "attn_k": ("self_attn.k_proj",),
    "attn_v": ("self_attn.v_proj",),
    "attn_output": ("self_attn.o_proj",),
    "attn_q_norm": ("self_attn.q_norm",),
    "attn_k_norm": ("self_attn.k_norm",),
    "ffn_norm": ("post_attention_layernorm",),
    "ffn_gate": ("mlp.gate_proj",),
    "ffn_up": ("mlp.up_proj",),
    "ffn_down": ("mlp.down_proj",),
    "ffn_gate_inp": ("mlp.gate",),  # the MoE router
}
_GEMMA_NAMES = _LAYER_NAMES | {
    "post_attention_norm": ("post_attention_layernorm",),
    "ffn_norm": ("pre_feedforward_layernorm",),
    "post_ffw_norm": ("post_feedforward_layernorm",),
}
# Phi-3 keeps transformers' fused q|k|v and gate|up (named ffn_up); split, each part loads as
# the checkpoint's separate projection would (and keeps its own GGUF blocks)
_PHI3_NAMES = _LAYER_NAMES | {
    "attn_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "ffn_up": ("mlp.gate_proj", "mlp.up_proj"),
}
_MIXTRAL_NAMES = _LAYER_NAMES | {"ffn_gate_inp": ("block_sparse_moe.gate",)}
_QWEN2_MOE_NAMES = _LAYER_NAMES | {  # the shared expert and its sigmoid gate
    "ffn_gate_inp_shexp": ("mlp.shared_expert_gate",),
    "ffn_gate_shexp": ("mlp.shared_expert.gate_proj",),
    "ffn_up_shexp": ("mlp.shared_expert.up_proj",),
    "ffn_down_shexp": ("mlp.shared_expert.down_proj",),
}
_QWEN_EXPERTS = (
    "mlp.experts",
    {"ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj"},
)


@dataclass(frozen=True, slots=True)
class _Layout:
    """How one architecture's GGUF tensors map to its transformers checkpoint."""

    layer_names: dict[str, tuple[str, ...]] = field(default_factory=lambda: _LAYER_NAMES)
    # (the experts' module, GGUF projection -> its name per expert), for MoE models
    experts: tuple[str, dict[str, str]] | None = None
    norm_offset: float = 0.0  # stored norm weight - transformers' (Gemma: 1 + w vs w)


# by transformers' model_type
_LAYOUTS = {
    "gemma2": _Layout(_GEMMA_NAMES, norm_offset=1.0),
    "gemma3_text": _Layout(_GEMMA_NAMES, norm_offset=1.0),
    "phi3": _Layout(_PHI3_NAMES),
    "mixtral": _Layout(
        _MIXTRAL_NAMES,
        experts=(
            "block_sparse_moe.experts",
            {"ffn_gate": "w1", "ffn_up": "w3", "ffn_down": "w2"},
        ),
    ),
    "qwen2_moe": _Layout(_QWEN2_MOE_NAMES, experts=_QWEN_EXPERTS),
    "qwen3_moe": _Layout(experts=_QWEN_EXPERTS),
}
# llama.cpp interleaves q/k rows for its rotary kernel only in LlamaModel and its subclasses
# (Mistral and Mixtral are written as "llama"; Granite is one too)
_PERMUTED_ARCHITECTURES = {"llama", "granite"}
# blk.N.<part>[.E].weight|bias: E only in Mixtral GGUFs written before experts were stacked
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.(weight|bias)")
_STACKED = "_exps"  # blk.N.ffn_gate_exps.weight: [E, I, C], every expert's projection
# tensors that become config, not weights
CONFIG_TENSORS = frozenset(
    {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}
)


@dataclass(frozen=True, slots=True)
class PlannedWeight:
    """One transformers weight and where it is in the file."""

    hf_name: str
    info: GGUFTensorInfo  # the stored tensor, or the rows of it that are this weight
    num_heads: int = 0  # heads whose q/k rows to un-interleave; 0: none
    norm_offset: float = 0.0  # subtracted once read

    def read(self, gguf_file: GGUFFile) -> torch.Tensor:
        """Dequantized to float32, in transformers' layout."""
        tensor = gguf_file.read_tensor(self.info)
        if self.num_heads:
            tensor = unpermute_rotary(tensor, self.num_heads)
        return tensor - self.norm_offset if self.norm_offset else tensor

    def read_blocks(self, gguf_file: GGUFFile) -> tuple[int, torch.Tensor] | None:
        """A 2-D weight's stored blocks, rows in transformers' order (quantized rows are
        independent, so whole rows move); None for other shapes."""
        if len(self.info.shape) != 2 or self.norm_offset:
            return None
        rows = gguf_file.read_blocks(self.info)
        return self.info.ggml_type, unpermute_rotary(
            rows, self.num_heads
        ) if self.num_heads else rows


def weight_plan(
    gguf_file: GGUFFile, hf_config: dict[str, Any], architecture: str
) -> list[PlannedWeight]:
    """Every transformers weight of the file (`architecture`: its general.architecture),
    checked before anything is read."""
    layout = _LAYOUTS.get(hf_config["model_type"], _Layout())
    heads = {}
    if architecture in _PERMUTED_ARCHITECTURES:
        heads = {
            "q_proj": hf_config["num_attention_heads"],
            "k_proj": hf_config["num_key_value_heads"],
        }
    plan = []
    for info in gguf_file.tensors.values():
        if info.name in CONFIG_TENSORS:
            continue
        parts = _hf_parts(info, layout, hf_config)
        if parts is None:
            raise ModelLoadError(
                f"GGUF file {gguf_file.path}: tensor '{info.name}' has no equivalent in a "
                f"{hf_config['architectures'][0]} (vision GGUFs are not supported)"
            )
        if not info.is_dequantizable:
            raise ModelLoadError(
                f"GGUF file {gguf_file.path}: tensor '{info.name}' is stored as {info.type_name}, "
                "which gguf cannot dequantize"
            )
        for hf_name, part in parts:
            offset = layout.norm_offset if hf_name.endswith("norm.weight") else 0.0
            num_heads = heads.get(hf_name.split(".")[-2], 0)
            plan.append(PlannedWeight(hf_name, part, num_heads, offset))
    return plan


def _hf_parts(
    info: GGUFTensorInfo, layout: _Layout, hf_config: dict[str, Any]
) -> list[tuple[str, GGUFTensorInfo]] | None:
    """(transformers' name, the rows of `info` it is) for each weight `info` holds."""
    match = _LAYER_TENSOR.fullmatch(info.name)
    if match is None:
        base, _, kind = info.name.rpartition(".")
        return [(f"{_GLOBAL_NAMES[base]}.{kind}", info)] if base in _GLOBAL_NAMES else None
    layer, part, expert, kind = match.groups()
    prefix = f"model.layers.{layer}"
    if layout.experts is not None and (part.endswith(_STACKED) or expert is not None):
        module, expert_names = layout.experts
        name = expert_names.get(part.removesuffix(_STACKED))
        if name is None or kind != "weight":
            return None
        if expert is not None:  # one expert's tensor
            return [(f"{prefix}.{module}.{expert}.{name}.weight", info)]
        return [  # [E, ...]: expert e's rows are the e-th slice of the bytes
            (f"{prefix}.{module}.{e}.{name}.weight", rows(info, e, e + 1, squeeze=True))
            for e in range(info.shape[0])
        ]
    names = layout.layer_names.get(part) if expert is None else None
    if names is None:
        return None
    if len(names) == 1:
        return [(f"{prefix}.{names[0]}.{kind}", info)]
    sizes = _fused_sizes(names, info.shape[0], hf_config)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [
        (f"{prefix}.{name}.{kind}", rows(info, start, start + size, squeeze=False))
        for name, start, size in zip(names, starts, sizes, strict=True)
    ]


def _fused_sizes(names: tuple[str, ...], num_rows: int, hf_config: dict[str, Any]) -> list[int]:
    """Rows of each part of a fused tensor: q|k|v by heads, others in equal parts."""
    if names[0].endswith("q_proj"):
        head_dim = hf_config["head_dim"]
        kv = hf_config["num_key_value_heads"] * head_dim
        sizes = [hf_config["num_attention_heads"] * head_dim, kv, kv]
    else:
        sizes = [num_rows // len(names)] * len(names)
    if sum(sizes) != num_rows:
        raise ModelLoadError(f"a fused tensor of {num_rows} rows cannot hold {names} ({sizes})")
    return sizes


def rows(info: GGUFTensorInfo, start: int, stop: int, *, squeeze: bool) -> GGUFTensorInfo:
    """Slices [start, stop) of the leading dimension (one slice without its dimension if
    `squeeze`): stored one after another, each a whole number of quantized blocks."""
    if len(info.shape) < 2 and info.ggml_type not in (_T.F32, _T.F16, _T.BF16):
        raise ModelLoadError(f"cannot split the 1-D {info.type_name} tensor '{info.name}'")
    stride = info.num_bytes // info.shape[0]
    shape = info.shape[1:] if squeeze else (stop - start, *info.shape[1:])
    name = f"{info.name}[{start}]" if squeeze else f"{info.name}[{start}:{stop}]"
    return GGUFTensorInfo(
        name, shape, info.ggml_type, info.offset + start * stride, (stop - start) * stride
    )


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row interleave, as transformers' GGUF loader does.

    convert_hf_to_gguf.py writes w.reshape(H, 2, D // 2, ...).swapaxes(1, 2): per head, row
    pairs (i, i + D/2) become adjacent. Reading them back: reshape(H, D // 2, 2, ...).swapaxes(1, 2).
    """
    head_dim = weight.shape[0] // num_heads
    split = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # [H, D/2, 2, ...]
    return split.transpose(1, 2).reshape(weight.shape)
