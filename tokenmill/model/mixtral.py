"""Mixtral: the Llama architecture with a sparse mixture of SiLU experts in place of the
MLP (the top k of the router's softmax, renormalised)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.layers.fusion import PreNormDecoder
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.layers.ops import ForwardContext
from tokenmill.model.config import ArchConfig
from tokenmill.model.llama import LlamaDecoderLayer, LlamaForCausalLM


def sparse_moe(cfg: ArchConfig) -> SparseMoeBlock:
    """The layer's experts as the config describes them; a load error where it does not."""
    if cfg.num_experts <= 0 or cfg.num_experts_per_tok <= 0:
        raise ModelLoadError(
            "MoE config is missing num_local_experts / num_experts or num_experts_per_tok"
        )
    return SparseMoeBlock(
        cfg.hidden_size,
        cfg.moe_intermediate_size or cfg.intermediate_size,
        cfg.num_experts,
        cfg.num_experts_per_tok,
        cfg.norm_topk_prob,
    )


class MixtralDecoderLayer(LlamaDecoderLayer):
    def __init__(self, cfg: ArchConfig):
        super().__init__(cfg)
        del self.mlp
        self.block_sparse_moe = sparse_moe(cfg)

    def feed_forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.block_sparse_moe(h, ctx)


class MixtralForCausalLM(LlamaForCausalLM):
    decoder_layer_class = MixtralDecoderLayer
    expert_params_mapping: ClassVar[dict[str, tuple[str, int | None]] | None] = {
        "w1": ("w13", 0),
        "w3": ("w13", 1),
        "w2": ("w2", None),
    }

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__({**hf_config, "norm_topk_prob": True})  # Mixtral always renormalises

    def pre_norm_decoder(self) -> PreNormDecoder | None:
        return None  # the fused decode step runs dense MLPs only
