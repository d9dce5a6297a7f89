"""ImageInput: one image of a prompt as the engine carries it, from the processor to the encoder.

The processor expands the prompt's placeholder for the image into tokens (some of them the
model's image token); the vision encoder turns `data` into one embedding row per image token,
in order, which replace those tokens' embeddings. `hash` names the image's content: the
encoder's output is cached under it, and the prefix cache keys every block the image's
tokens touch with it (two images never share KV blocks; the same image does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True, slots=True, eq=False)
class ImageInput:
    hash: str  # SHA-256 of the decoded pixels (mode, size, bytes) and the processor's output
    data: dict[str, torch.Tensor] = field(repr=False)  # the encoder's inputs for this image
    offset: int  # prompt position of the first token of its expansion
    length: int  # tokens in its expansion (image tokens and the markers between them)
    # prompt positions whose embeddings are the encoder's rows, in row order
    positions: torch.Tensor = field(repr=False)  # [num_embeds] long
    # Qwen2-VL family: the image's grid of tokens (time, height, width) after merging patches,
    # which gives its tokens' multimodal rotary positions; None for other models
    grid: tuple[int, int, int] | None = None

    @property
    def num_embeds(self) -> int:
        return int(self.positions.numel())

    @property
    def end(self) -> int:
        return self.offset + self.length

    def overlaps(self, start: int, end: int) -> bool:
        """Whether any token of its expansion lies in positions [start, end)."""
        return self.offset < end and start < self.end

    def moved(self, shift: int) -> ImageInput:
        """The same image `shift` positions later in the prompt (negative: earlier)."""
        return ImageInput(
            self.hash, self.data, self.offset + shift, self.length, self.positions + shift,
            self.grid,
        )  # fmt: skip


def hashes_in(images: tuple[ImageInput, ...], start: int, end: int) -> tuple[str, ...]:
    """The hashes of the images whose tokens lie in positions [start, end), in prompt order."""
    return tuple(image.hash for image in images if image.overlaps(start, end))
