"""ImageProcessor: a vision model's own Hugging Face processor, one image at a time.

The chat template (or an offline prompt) puts one placeholder per image, e.g. "<image>";
the model's processor (transformers' `AutoProcessor`, PIL image backends) turns an image
into the tokens that replace it (LLaVA: N image tokens; Idefics3: tiles of image tokens
between row/column markers; Qwen2.5-VL: one pad per merged patch) and the encoder's inputs.
Processing each image alone and splicing its expansion at its placeholder gives the same
tokens as the processor over the whole text: placeholders and markers are special tokens,
which the tokenizer never merges with their neighbours.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.errors import InvalidRequestError, ModelLoadError
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.tokenizer.tokenizer import Tokenizer

if TYPE_CHECKING:
    from PIL.Image import Image

_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def image_token_id(hf_config: dict[str, Any]) -> int | None:
    """The token whose embeddings a vision model replaces with image features, if it has one."""
    value = hf_config.get("image_token_id", hf_config.get("image_token_index"))
    return int(value) if isinstance(value, int) else None


class ImageProcessor:
    """Expands a prompt's image placeholders with the model's own processor.

    Two kinds: the model's whole processor (`AutoProcessor`: LLaVA, Idefics3), which expands
    a placeholder itself; or, for the Qwen2-VL family, its image processor alone (its full
    processor also loads a video processor, which needs torchvision), where the placeholder
    (the image token) becomes one image token per merged patch:
    grid_t * grid_h * grid_w / merge_size**2.
    """

    def __init__(
        self,
        path: str,
        hf_config: dict[str, Any],
        tokenizer: Tokenizer,
        kwargs: dict[str, Any] | None = None,  # processor options for every image
    ):
        from transformers import AutoImageProcessor, AutoProcessor

        token_id = image_token_id(hf_config)
        if token_id is None:
            raise ModelLoadError("the vision model's config names no image_token_id")
        self.image_token_id = token_id
        self.hf: Any = None
        try:
            images: Any = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            self.merge_size: int | None = getattr(images, "merge_size", None)
            if self.merge_size is None:
                self.hf = AutoProcessor.from_pretrained(path, local_files_only=True)
                images = getattr(self.hf, "image_processor", None)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(f"cannot load the image processor in {path}: {reason}") from exc
        if images is None:
            raise ModelLoadError(f"{path} has no image processor (preprocessor_config.json)")
        self.images = images
        # what the chat template writes for one image
        if self.hf is not None:
            self.placeholder: str = getattr(self.hf, "image_token", None) or "<image>"
        else:
            self.placeholder = tokenizer.convert_ids_to_tokens([token_id])[0]
        ids = tokenizer.encode(self.placeholder, add_special_tokens=False)
        if len(ids) != 1:
            raise ModelLoadError(f"the image placeholder {self.placeholder!r} is not one token")
        self.placeholder_id = ids[0]
        owner = type(self.hf).__name__ if self.hf is not None else "merged patches"
        self.name = f"{owner} ({type(images).__name__})"
        try:
            self.kwargs = self.check_kwargs(kwargs or {}, "mm_processor_kwargs")
        except InvalidRequestError as exc:
            raise ModelLoadError(exc.message) from None

    def check_kwargs(self, kwargs: dict[str, Any], param: str) -> dict[str, Any]:
        """Processor options this model's image processor has (another would be ignored by it,
        so it is a 400 naming it)."""
        known = _options(self.images)
        unknown = sorted(k for k in kwargs if k not in known and not hasattr(self.images, k))
        if unknown:
            raise InvalidRequestError(
                f"{type(self.images).__name__} has no option {', '.join(unknown)}", param=param
            )
        return dict(kwargs)

    def expand(
        self,
        prompt_ids: list[int],
        images: list[Image],
        param: str,
        kwargs: dict[str, Any] | None = None,  # a request's processor options (checked)
    ) -> tuple[list[int], tuple[ImageInput, ...]]:
        """The prompt with each placeholder replaced by its image's tokens, and the images."""
        options = {**self.kwargs, **(kwargs or {})}
        slots = [i for i, t in enumerate(prompt_ids) if t == self.placeholder_id]
        if len(slots) != len(images):
            raise InvalidRequestError(
                f"the prompt has {len(slots)} image placeholders ({self.placeholder}) for "
                f"{len(images)} images",
                param=param,
            )
        out: list[int] = []
        inputs = []
        prev = 0
        for slot, image in zip(slots, images, strict=True):
            out.extend(prompt_ids[prev:slot])
            expansion, data, grid = self._process(image, param, options)
            offset = len(out)
            rows = [offset + i for i, t in enumerate(expansion) if t == self.image_token_id]
            key = _content_hash(image, options)
            inputs.append(ImageInput(key, data, offset, len(expansion), torch.tensor(rows), grid))
            out.extend(expansion)
            prev = slot + 1
        out.extend(prompt_ids[prev:])
        return out, tuple(inputs)

    def _process(
        self, image: Image, param: str, options: dict[str, Any]
    ) -> tuple[list[int], dict[str, torch.Tensor], tuple[int, int, int] | None]:
        """One image's tokens, the encoder's inputs, and (merged patches) its token grid."""
        try:
            if self.merge_size is not None:
                out = self.images(images=[image], return_tensors="pt", **options)
            else:
                out = self.hf(
                    text=self.placeholder, images=[image], return_tensors="pt",
                    add_special_tokens=False, **options,
                )  # fmt: skip
        except Exception as exc:  # the processor refuses the image (e.g. too small to tile)
            raise InvalidRequestError(f"cannot process the image: {exc}", param=param) from exc
        data = {k: v for k, v in out.items() if k not in _TEXT_KEYS}
        if self.merge_size is None:
            return [int(t) for t in out["input_ids"][0].tolist()], data, None
        t, h, w = (int(x) for x in out["image_grid_thw"][0].tolist())
        grid = (t, h // self.merge_size, w // self.merge_size)
        return [self.image_token_id] * (grid[0] * grid[1] * grid[2]), data, grid


def _options(image_processor: Any) -> set[str]:
    """The call options an image processor declares (transformers 5: its `valid_kwargs`)."""
    declared = getattr(image_processor, "valid_kwargs", None)
    if declared is None:
        return set()
    return {name for cls in declared.__mro__ for name in getattr(cls, "__annotations__", {})}


def _content_hash(image: Image, options: dict[str, Any]) -> str:
    """SHA-256 over the decoded pixels and the processor options: the same picture in PNG and
    WebP is the same image; processed otherwise, it is another."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}:{sorted(options.items())!r}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
