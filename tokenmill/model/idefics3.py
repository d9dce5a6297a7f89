"""Idefics3 and SmolVLM: a SigLIP-style vision tower, a pixel-shuffle connector and a
Llama (SmolLM2) language model. The processor splits an image into tiles plus one global
image; each tile is `image_seq_len` image tokens between row/column markers."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.model.vision import VisionLanguageModel, transformers_config


class Idefics3ForConditionalGeneration(VisionLanguageModel):
    encoder_prefixes = (
        ("model.vision_model.", "vision_model."),
        ("model.connector.", "connector."),
    )
    language_prefixes = (("model.text_model.", "model."),)

    def build_encoder(self) -> nn.Module:
        from transformers.models.idefics3.modeling_idefics3 import (
            Idefics3Connector,
            Idefics3VisionTransformer,
        )

        config = transformers_config(self.hf_config)
        self.patch_size = int(config.vision_config.patch_size)
        return _Idefics3Encoder(
            Idefics3VisionTransformer._from_config(config.vision_config), Idefics3Connector(config)
        )

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Every tile of every image through the tower in one batch; all-zero tiles are the
        processor's padding and are dropped (as transformers does)."""
        assert isinstance(self.encoder, _Idefics3Encoder)
        tiles, masks, counts = [], [], []
        for image in images:
            pixels = image["pixel_values"].flatten(0, 1)  # [tiles, 3, H, W]
            mask = image.get("pixel_attention_mask")
            mask = (
                torch.ones(pixels.shape[0], *pixels.shape[2:], dtype=torch.bool)
                if mask is None
                else mask.flatten(0, 1).bool()
            )
            real = (pixels != 0).flatten(1).any(dim=1)
            tiles.append(pixels[real])
            masks.append(mask[real])
            counts.append(int(real.sum()))
        pixels, mask = torch.cat(tiles), torch.cat(masks)
        p = self.patch_size
        patches = mask.unfold(1, p, p).unfold(2, p, p)  # [tiles, H/p, W/p, p, p]
        patch_mask = patches.sum(dim=(-1, -2)) > 0
        hidden = self.encoder.vision_model(
            pixel_values=pixels, patch_attention_mask=patch_mask, return_dict=True
        ).last_hidden_state
        features = self.encoder.connector(hidden)  # [tiles, tokens per tile, C]
        return [f.reshape(-1, f.shape[-1]) for f in features.split(counts)]


class _Idefics3Encoder(nn.Module):
    """The checkpoint's vision_model and connector."""

    def __init__(self, vision_model: nn.Module, connector: nn.Module):
        super().__init__()
        self.vision_model, self.connector = vision_model, connector
