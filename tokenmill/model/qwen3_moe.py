"""Qwen3-MoE: Qwen3 (q/k norms) with sparse experts in the layers the config names
(`decoder_sparse_step`, `mlp_only_layers`: the others keep a dense MLP); the experts'
weights renormalised where `norm_topk_prob` says."""

from __future__ import annotations

from typing import Any, ClassVar

from tokenmill.model.llama import LlamaDecoderLayer
from tokenmill.model.mixtral import sparse_moe
from tokenmill.model.qwen3 import Qwen3ForCausalLM


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    expert_params_mapping: ClassVar[dict[str, tuple[str, int | None]] | None] = {
        "gate_proj": ("w13", 0),
        "up_proj": ("w13", 1),
        "down_proj": ("w2", None),
    }

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__(hf_config)
        cfg = self.config
        step = int(hf_config.get("decoder_sparse_step") or 1)
        dense = set(hf_config.get("mlp_only_layers") or [])
        for i, layer in enumerate(self.model.layers):
            assert isinstance(layer, LlamaDecoderLayer)
            if i not in dense and (i + 1) % step == 0:
                layer.mlp = sparse_moe(cfg)  # the checkpoint's mlp.gate, mlp.experts
