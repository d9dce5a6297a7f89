"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2 (biases on q/k/v) with sparse
experts in the layers the config names (`decoder_sparse_step`, `mlp_only_layers`: the others
keep a dense MLP), each beside a shared expert that every token runs, scaled per token by
sigmoid(`shared_expert_gate`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.model.config import FULL, SLIDING, ArchConfig
from tokenmill.model.llama import LlamaDecoderLayer, LlamaMLP
from tokenmill.model.qwen2 import Qwen2ForCausalLM

# transformers' Qwen2MoeConfig defaults, for the keys a config leaves out
DEFAULTS: dict[str, Any] = {
    "qkv_bias": True,
    "norm_topk_prob": False,  # the chosen experts' router probabilities as they are
    "num_experts": 60,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632,
    "decoder_sparse_step": 1,
    "use_sliding_window": False,
    "max_window_layers": 28,
}


def qwen2_moe_layer_types(hf: dict[str, Any]) -> list[str]:
    """transformers' rule where a config with a sliding window names no `layer_types`:
    every other layer (0, 2, ...) below `max_window_layers` slides (unlike Qwen2's)."""
    start = int(hf["max_window_layers"])
    return [SLIDING if i % 2 == 0 and i < start else FULL for i in range(hf["num_hidden_layers"])]


def sparse_moe_with_shared_expert(cfg: ArchConfig, shared_size: int) -> SparseMoeBlock:
    """The routed experts and, where its size is not 0, the shared expert (a dense MLP)."""
    shared = LlamaMLP(replace(cfg, intermediate_size=shared_size)) if shared_size > 0 else None
    return SparseMoeBlock(
        cfg.hidden_size,
        cfg.moe_intermediate_size or cfg.intermediate_size,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.norm_topk_prob,
        shared,
    )


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    expert_params_mapping: ClassVar[dict[str, tuple[str, int | None]] | None] = {
        "gate_proj": ("w13", 0),
        "up_proj": ("w13", 1),
        "down_proj": ("w2", None),
    }

    def __init__(self, hf_config: dict[str, Any]):
        hf = {**DEFAULTS, **hf_config}
        hf["attention_bias"] = hf["qkv_bias"]  # Qwen2-MoE's name for the q/k/v biases
        if hf["use_sliding_window"] and hf.get("layer_types") is None:
            hf["layer_types"] = qwen2_moe_layer_types(hf)
        super().__init__(hf)
        cfg = self.config
        step = int(hf["decoder_sparse_step"] or 1)
        dense = set(hf.get("mlp_only_layers") or [])
        shared_size = int(hf["shared_expert_intermediate_size"] or 0)
        for i, layer in enumerate(self.model.layers):
            assert isinstance(layer, LlamaDecoderLayer)
            if cfg.num_experts > 0 and i not in dense and (i + 1) % step == 0:
                # the checkpoint's mlp.gate, mlp.experts, mlp.shared_expert(_gate)
                layer.mlp = sparse_moe_with_shared_expert(cfg, shared_size)
