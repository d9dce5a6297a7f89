"""EncoderCache: each image's vision-encoder rows, computed once and kept by content hash.

A prompt's image is encoded when the first chunk that holds one of its tokens runs; the
rows stay cached (least recently used first out, up to a row budget) for the chunks after
it, for a request recomputed after preemption, and for the next request with the same
image. The images a step misses are encoded together, in one call to the model.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

import torch

from tokenmill.multimodal.inputs import ImageInput


class ImageEncoder(Protocol):
    def embed_images(self, images: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]: ...


class EncoderCache:
    def __init__(self, model: ImageEncoder, max_rows: int = 65536):
        self.model, self.max_rows = model, max_rows
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._num_rows = 0
        self.num_encoded = 0  # images run through the encoder (for tests and stats)

    def rows(self, images: list[ImageInput]) -> dict[str, torch.Tensor]:
        """image hash -> its rows [num_embeds, C] for every image given (encoding misses)."""
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, ImageInput] = {}
        for image in images:
            rows = self._rows.get(image.hash)
            if rows is not None:
                self._rows.move_to_end(image.hash)
                found[image.hash] = rows
            else:
                missing.setdefault(image.hash, image)
        if missing:
            encoded = self.model.embed_images([image.data for image in missing.values()])
            self.num_encoded += len(missing)
            for image, rows in zip(missing.values(), encoded, strict=True):
                if rows.shape[0] != image.num_embeds:
                    raise RuntimeError(
                        f"the vision encoder gave {rows.shape[0]} rows for an image with "
                        f"{image.num_embeds} image tokens"
                    )
                found[image.hash] = rows
                self._put(image.hash, rows)
        return found

    def _put(self, key: str, rows: torch.Tensor) -> None:
        self._rows[key] = rows
        self._num_rows += rows.shape[0]
        while self._num_rows > self.max_rows and len(self._rows) > 1:
            _, evicted = self._rows.popitem(last=False)
            self._num_rows -= evicted.shape[0]
