"""The multimodal rotary positions of a prompt with images (Qwen2-VL, Qwen2.5-VL).

Text tokens count up by one on all three axes. An image's tokens, laid out as its grid of
merged patches (time, height, width), take the position the text had reached plus their
row and column (and frame); the text after the image goes on from that position plus the
grid's larger side. So a prompt's positions grow slower than its token count, and a token
generated at index p sits at p + delta, delta = (largest prompt position + 1) - prompt
length.
"""

from __future__ import annotations

import torch

from tokenmill.multimodal.inputs import ImageInput


def mrope_positions(num_tokens: int, images: tuple[ImageInput, ...]) -> tuple[torch.Tensor, int]:
    """The positions [3, num_tokens] of a prompt with these images, and its delta."""
    positions = torch.empty(3, num_tokens, dtype=torch.long)
    current, done = 0, 0
    for image in images:
        assert image.grid is not None, "a multimodal-rotary image carries its grid"
        first, n = int(image.positions[0]), image.num_embeds
        positions[:, done:first] = torch.arange(first - done) + current
        current += first - done
        t, h, w = image.grid
        grid = torch.stack(
            torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        )
        positions[:, first : first + n] = grid.reshape(3, -1) + current
        current += max(h, w)
        done = first + n
    positions[:, done:] = torch.arange(num_tokens - done) + current
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta
