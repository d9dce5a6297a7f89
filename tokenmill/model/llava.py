"""LLaVA-1.5 style models: a CLIP or SigLIP vision tower, an MLP projector and a Llama,
Mistral or Qwen2 language model; each image is a fixed number of image tokens."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.model.vision import VisionLanguageModel, transformers_config


class LlavaForConditionalGeneration(VisionLanguageModel):
    # the hub's checkpoints, and transformers 5's in-memory names
    encoder_prefixes: ClassVar[tuple[tuple[str, str], ...]] = (
        ("vision_tower.", "vision_tower."),
        ("multi_modal_projector.", "multi_modal_projector."),
        ("model.vision_tower.", "vision_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    )
    language_prefixes = (
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."),
    )

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__(hf_config)
        strategy = hf_config.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ModelLoadError(f"unknown vision_feature_select_strategy {strategy!r}")
        self.select_strategy = strategy
        layer = hf_config.get("vision_feature_layer", -2)
        self.feature_layers: list[int] = [layer] if isinstance(layer, int) else list(layer)

    def build_encoder(self) -> nn.Module:
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        config = transformers_config(self.hf_config)
        return _LlavaEncoder(
            AutoModel.from_config(config.vision_config), LlavaMultiModalProjector(config)
        )

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        assert isinstance(self.encoder, _LlavaEncoder)
        pixels = torch.cat([image["pixel_values"] for image in images])  # [N, 3, H, W]
        out = self.encoder.vision_tower(pixels, output_hidden_states=True, return_dict=True)
        layers = [out.hidden_states[i] for i in self.feature_layers]
        if self.select_strategy == "default":  # without the CLS position
            layers = [h[:, 1:] for h in layers]
        features = self.encoder.multi_modal_projector(torch.cat(layers, dim=-1))
        return list(features)  # N x [tokens, C]


class _LlavaEncoder(nn.Module):
    """The checkpoint's vision_tower and multi_modal_projector."""

    def __init__(self, vision_tower: nn.Module, multi_modal_projector: nn.Module):
        super().__init__()
        self.vision_tower, self.multi_modal_projector = vision_tower, multi_modal_projector
