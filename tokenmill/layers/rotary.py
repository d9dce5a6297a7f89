"""Rotary position embeddings (HF "rotate half" layout), with llama3 and linear scaling."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from tokenmill.errors import ModelLoadError


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], adjusted by the checkpoint's rope scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if kind == "default":
        return inv_freq.float()
    assert scaling is not None
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling).float()
    raise ModelLoadError(
        f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3)"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    ramp = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    # ramp = 0 where wavelen > old_len/low (long waves: scaled), 1 where wavelen < old_len/high
    return inv_freq / factor * (1 - ramp) + inv_freq * ramp


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin for every position up to max_positions."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ):
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.cos_sin: torch.Tensor | None = None  # [max_positions, 2, head_dim], float32

    def build(self, device: torch.device) -> None:
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, D]
        self.cos_sin = torch.stack([emb.cos(), emb.sin()], dim=1).to(device)

    def cos_sin_for(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """The tables of one step's token positions [T]; every layer reuses them."""
        assert self.cos_sin is not None, "RotaryEmbedding.build() not called"
        cos_sin = self.cos_sin[positions].to(dtype)  # [T, 2, D]
        cos, sin = cos_sin[:, 0].unsqueeze(1), cos_sin[:, 1].unsqueeze(1)  # [T, 1, D]
        half = self.head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * signed_sin, one op fewer per call
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return RotaryTables(cos, signed_sin, self.cos_sin, positions)


class RotaryTables(NamedTuple):
    """cos and sign-adjusted sin, [T, 1, D] each, for one step's positions; the whole
    table and the positions for the native kernel (tokenmill/kernels/layer_ops.c)."""

    cos: torch.Tensor
    signed_sin: torch.Tensor
    table: torch.Tensor  # [P, 2, D] float32
    positions: torch.Tensor  # [T]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] rotated by its token's position (HF "rotate half" layout)."""
        return x * self.cos + x.roll(x.shape[-1] // 2, dims=-1) * self.signed_sin
