"""VisionLanguageModel: a language model whose image tokens take their embeddings from a
vision encoder (LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Qwen2.5-VL).

The language model is one of tokenmill's own (paged KV cache, batching, the backends'
kernels); the encoder (vision tower and projector) is transformers' own modules, run once
per image by the worker's EncoderCache, outside the paged step. A subclass says how to
build the encoder from the config, how the checkpoint names its weights, and how the
encoder turns one image's processor outputs into embedding rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.weights import skip_init


class VisionLanguageModel(LlamaForCausalLM):
    """A Llama-family language model (Llama, Mistral, Qwen2, SmolLM2) plus a vision encoder."""

    # checkpoint name prefix -> the encoder's parameter prefix ("" drops the prefix)
    encoder_prefixes: ClassVar[tuple[tuple[str, str], ...]]
    # checkpoint name prefix -> the language model's (LlamaForCausalLM's) name prefix
    language_prefixes: ClassVar[tuple[tuple[str, str], ...]]
    # modules the backends leave as they are (they run in the checkpoint's dtype with torch)
    unpacked_modules: ClassVar[tuple[str, ...]] = ("encoder",)

    def __init__(self, hf_config: dict[str, Any]):
        text = hf_config.get("text_config") or hf_config  # older configs: the text at the top
        super().__init__(text)
        self.hf_config = hf_config  # (the image token is the processor's: multimodal/)
        # built by load_weights on the language model's device, in its dtype: transformers'
        # modules keep buffers (position ids) that the meta-device build would not hold
        self.encoder: nn.Module | None = None

    def build_encoder(self) -> nn.Module:
        """The vision tower and projector, as transformers builds them (random weights)."""
        raise NotImplementedError

    def encode_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Each image's processor outputs -> its embedding rows [num_image_tokens, C]."""
        raise NotImplementedError

    @torch.inference_mode()
    def embed_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The encoder's rows for each image, in the language model's dtype and device."""
        weight = self.model.embed_tokens.weight
        moved = [
            {k: v.to(weight.device, weight.dtype if v.is_floating_point() else v.dtype)
             for k, v in image.items()}
            for image in images
        ]  # fmt: skip
        return [rows.to(weight.dtype) for rows in self.encode_images(moved)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        encoder_weights: dict[str, torch.Tensor] = {}
        super().load_weights(self._split(weights, encoder_weights))
        weight = self.model.embed_tokens.weight
        with torch.device(weight.device), skip_init():
            encoder = self.build_encoder()
        encoder.to(weight.dtype)
        expected = set(encoder.state_dict())
        encoder_weights = {_as_named(k, expected): v for k, v in encoder_weights.items()}
        missing, unexpected = encoder.load_state_dict(encoder_weights, strict=False)
        missing = [n for n in missing if not n.endswith("position_ids")]
        if missing or unexpected:
            raise ModelLoadError(
                f"the vision encoder's weights do not match the checkpoint: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.encoder = encoder.eval()

    def _split(
        self, weights: Iterable[tuple[str, torch.Tensor]], encoder: dict[str, torch.Tensor]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The language model's weights (renamed); the encoder's go into `encoder`."""
        for name, tensor in weights:
            for old, new in self.encoder_prefixes:
                if name.startswith(old):
                    encoder[new + name.removeprefix(old)] = tensor
                    break
            else:
                for old, new in self.language_prefixes:
                    if name.startswith(old):
                        name = new + name.removeprefix(old)
                        break
                yield name, tensor


def _as_named(name: str, expected: set[str]) -> str:
    """A checkpoint name as the installed transformers names it: CLIP and SigLIP towers keep
    their weights under "vision_model." in the hub's checkpoints (and transformers 4), not in
    transformers 5's modules, so that segment is dropped or added where needed."""
    if name in expected:
        return name
    head, _, rest = name.partition(".")
    other = (
        f"{head}.{rest.removeprefix('vision_model.')}"
        if rest.startswith("vision_model.")
        else f"{head}.vision_model.{rest}"
    )
    return other if other in expected else name


def transformers_config(hf_config: dict[str, Any]) -> Any:
    """The checkpoint's transformers config object (vision_config and text_config included)."""
    from transformers import AutoConfig

    fields = {k: v for k, v in hf_config.items() if k not in ("model_type", "torch_dtype")}
    return AutoConfig.for_model(hf_config["model_type"], **fields)
