"""LLaVA-NeXT (1.6): LLaVA's tower and projector over "any resolution" tiles. The processor
picks the grid (`image_grid_pinpoints`) that fits the image best and sends the tiles plus a
downscaled base image; the tiles' features are laid back out as one picture, the padding
the resize added is cut away, and a learned newline row (`image_newline`) ends each row."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.model.llava import LlavaForConditionalGeneration
from tokenmill.model.vision import transformers_config


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    encoder_prefixes = (
        *LlavaForConditionalGeneration.encoder_prefixes,
        ("image_newline", "image_newline"),
        ("model.image_newline", "image_newline"),
    )

    def build_encoder(self) -> nn.Module:
        from transformers import AutoModel
        from transformers.models.llava_next.modeling_llava_next import (
            LlavaNextMultiModalProjector,
        )

        config = self.next_config = transformers_config(self.hf_config)
        hidden = config.text_config.hidden_size
        return _LlavaNextEncoder(
            AutoModel.from_config(config.vision_config),
            LlavaNextMultiModalProjector(config),
            nn.Parameter(torch.empty(hidden)),
        )

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Every image's tiles through the tower in one batch, then each laid out (as
        transformers' LlavaNextModel.pack_image_features, "spatial_unpad")."""
        from transformers.models.llava_next.modeling_llava_next import (
            get_anyres_image_grid_shape,
            unpad_image,
        )

        assert isinstance(self.encoder, _LlavaNextEncoder)
        config = self.next_config
        size = config.vision_config.image_size
        tiles = [image["pixel_values"][0] for image in images]  # [tiles, 3, H, W] each
        out = self.encoder.vision_tower(torch.cat(tiles), output_hidden_states=True)
        layers = [out.hidden_states[i] for i in self.feature_layers]
        if self.select_strategy == "default":
            layers = [h[:, 1:] for h in layers]
        features = self.encoder.multi_modal_projector(torch.cat(layers, dim=-1))
        newline = self.encoder.image_newline
        result = []
        for image, feature in zip(images, features.split([len(t) for t in tiles]), strict=True):
            image_size = image["image_sizes"][0]
            if feature.shape[0] == 1:
                result.append(torch.cat([feature[0], newline[None].to(feature)]))
                continue
            side = size // config.vision_config.patch_size
            rows, cols = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, size)
            grid = feature[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3)
            grid = unpad_image(grid.flatten(1, 2).flatten(2, 3), image_size)  # [C, H', W']
            ends = newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid)
            grid = torch.cat([grid, ends], dim=-1).flatten(1, 2).transpose(0, 1)
            result.append(torch.cat([feature[0], grid]))
        return result


class _LlavaNextEncoder(nn.Module):
    """The checkpoint's vision_tower, multi_modal_projector and image_newline."""

    def __init__(
        self, vision_tower: nn.Module, multi_modal_projector: nn.Module, newline: nn.Parameter
    ):
        super().__init__()
        self.vision_tower, self.multi_modal_projector = vision_tower, multi_modal_projector
        self.image_newline = newline
