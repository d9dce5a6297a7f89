"""IBM Granite 3: the Llama architecture with four multipliers (the embedding, each residual
branch, the attention scores in place of 1/sqrt(head_dim), and the logits as a divisor)."""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.errors import ModelLoadError
from tokenmill.layers.fusion import PreNormDecoder
from tokenmill.layers.ops import ForwardContext, KVCache
from tokenmill.layers.rotary import RotaryTables
from tokenmill.model.config import ArchConfig
from tokenmill.model.llama import LlamaDecoderLayer, LlamaForCausalLM

_MULTIPLIERS = (
    "embedding_multiplier",
    "residual_multiplier",
    "attention_multiplier",
    "logits_scaling",
)


class GraniteDecoderLayer(LlamaDecoderLayer):
    def __init__(self, cfg: ArchConfig):
        super().__init__(cfg)
        self.residual_multiplier = 1.0  # set by the model

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: RotaryTables,
        kv_cache: KVCache,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm.add_and_norm(x, residual, ctx.ops)
        x = self.self_attn(h, rotary, kv_cache, ctx) * self.residual_multiplier
        h, residual = self.post_attention_layernorm.add_and_norm(x, residual, ctx.ops)
        return self.mlp(h, ctx) * self.residual_multiplier, residual


class GraniteForCausalLM(LlamaForCausalLM):
    decoder_layer_class = GraniteDecoderLayer

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__(hf_config)
        missing = [k for k in _MULTIPLIERS if not isinstance(hf_config.get(k), int | float)]
        if missing:
            raise ModelLoadError(f"Granite config is missing {', '.join(missing)}")
        self.embedding_multiplier = float(hf_config["embedding_multiplier"])
        self.logits_scaling = float(hf_config["logits_scaling"])
        for layer in self.model.layers:
            assert isinstance(layer, GraniteDecoderLayer)
            layer.residual_multiplier = float(hf_config["residual_multiplier"])
            layer.self_attn.scale = float(hf_config["attention_multiplier"])

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().embed_input_ids(input_ids) * self.embedding_multiplier

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.logits_scaling

    def pre_norm_decoder(self) -> PreNormDecoder | None:
        return None  # the multipliers are not in the fused decode step
