"""Qwen2.5-VL: its own ViT (2D patches, window attention, patches merged 2x2 by an MLP) and a
Qwen2 language model whose rotary positions are multimodal (M-RoPE): time, height and width
turn separate sections of each head, so an image's tokens keep their place in the picture.

The runner gives this model positions [3, T] (multimodal/mrope.py) instead of [T]."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.layers.fusion import PreNormDecoder
from tokenmill.layers.rotary import MRotaryEmbedding
from tokenmill.model.vision import VisionLanguageModel, transformers_config


class Qwen2_5_VLForConditionalGeneration(VisionLanguageModel):
    attention_bias = True
    o_proj_bias = False
    uses_mrope = True  # positions [3, T]: the runner builds them from the images' grids
    encoder_prefixes = (("visual.", "visual."), ("model.visual.", "visual."))
    language_prefixes = (("model.language_model.", "model."),)

    def __init__(self, hf_config: dict[str, Any]):
        text = dict(hf_config.get("text_config") or hf_config)
        section = _mrope_section(text)
        text["attention_bias"] = True  # q, k and v always have biases (transformers' too)
        if (text.get("rope_scaling") or {}).get("rope_type") == "mrope":
            text["rope_scaling"] = None  # M-RoPE on top of plain rotary frequencies
        super().__init__({**hf_config, "text_config": text})
        cfg = self.config
        self.rotary = MRotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling, section
        )

    def pre_norm_decoder(self) -> PreNormDecoder | None:
        return None  # the fused decode step turns heads by one position per token

    def build_encoder(self) -> nn.Module:
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel,
        )

        config = transformers_config(self.hf_config)
        self.merge_size = int(config.vision_config.spatial_merge_size)
        return _Qwen2_5_VLEncoder(
            Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        )

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """All images' patches through the ViT in one call (it attends within each image)."""
        assert isinstance(self.encoder, _Qwen2_5_VLEncoder)
        pixels = torch.cat([image["pixel_values"] for image in images])
        grids = torch.cat([image["image_grid_thw"] for image in images])
        merged = self.encoder.visual(pixels, grid_thw=grids, return_dict=True).pooler_output
        return list(merged.split((grids.prod(-1) // self.merge_size**2).tolist()))


def _mrope_section(text: dict[str, Any]) -> list[int]:
    """mrope_section from rope_parameters (transformers 5) or rope_scaling (the hub's)."""
    for key in ("rope_parameters", "rope_scaling"):
        section = (text.get(key) or {}).get("mrope_section")
        if section:
            return [int(n) for n in section]
    raise ModelLoadError("the Qwen2.5-VL config has no mrope_section")


class _Qwen2_5_VLEncoder(nn.Module):
    """The checkpoint's `visual` (its merger included)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
