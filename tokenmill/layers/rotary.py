"""Rotary position embeddings (HF "rotate half" layout): linear, llama3 and LongRoPE scaling,
and partial rotary (only each head's first rotary_dim dims turn; Phi-4-mini).

LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini) divides each frequency by its
`short_factor` or `long_factor` and scales cos and sin by an attention factor. One set turns
every position, chosen at load as vLLM does: the long factors where the served context
(max_model_len) exceeds `original_max_position_embeddings`, else the short ones. A token's
keys so depend on its position alone (never on its batch, its chunk or how long its sequence
grows, as the KV cache and prefix cache need) and keys and queries always turn alike.
transformers instead switches per sequence (short factors while a sequence fits the
original context, long ones for all its positions once it is longer, recomputing its cache):
tokenmill matches it on sequences past the original context, and on the rest when
--max-model-len is at most the original context. Mixing the sets per position (short keys,
long queries) is what has been reported to break long-context output.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from tokenmill.errors import ModelLoadError


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The scaling's kind ("default" where there is none)."""
    return (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [dim/2] of the rotated dims, adjusted by position-independent
    rope scaling (LongRoPE's depend on the position: `LongRope`)."""
    inv_freq = _default_inv_freq(dim, theta)
    kind = rope_type(scaling)
    if kind == "default":
        return inv_freq.float()
    assert scaling is not None
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling).float()
    raise ModelLoadError(
        f"unsupported rope scaling type {kind!r} (supported: default, linear, llama3, longrope)"
    )


def _default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """theta ** -(2i / dim) [dim/2], float64."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    ramp = ((old_len / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    # ramp = 0 where wavelen > old_len/low (long waves: scaled), 1 where wavelen < old_len/high
    return inv_freq / factor * (1 - ramp) + inv_freq * ramp


class LongRope(NamedTuple):
    """A "longrope" scaling, checked: frequency divisors for positions below `original`
    (short) and from it on (long), and the factor cos and sin are multiplied by."""

    short_factor: list[float]
    long_factor: list[float]
    original: int  # original_max_position_embeddings: the first position on long factors
    attention_factor: float

    @classmethod
    def parse(cls, scaling: dict[str, Any], rotary_dim: int, max_positions: int) -> LongRope:
        """Transformers' rule: `attention_factor` if given, else sqrt(1 + ln(factor) /
        ln(original)), `factor` defaulting to max_positions / original (1 if not above 1)."""
        for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
            if scaling.get(key) is None:
                raise ModelLoadError(f"longrope rope scaling lacks {key!r}")
        short, long = list(scaling["short_factor"]), list(scaling["long_factor"])
        for name, factors in (("short_factor", short), ("long_factor", long)):
            if len(factors) != rotary_dim // 2:
                raise ModelLoadError(
                    f"longrope {name} has {len(factors)} entries; the {rotary_dim} rotated "
                    f"dims of a head need {rotary_dim // 2}"
                )
        original = int(scaling["original_max_position_embeddings"])
        factor = scaling.get("factor") or max_positions / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            )
        return cls(short, long, original, float(attention))

    def table(
        self, rotary_dim: int, theta: float, max_positions: int, context: int
    ) -> torch.Tensor:
        """cos/sin [max_positions, 2, rotary_dim] scaled by the attention factor: the long
        factors where `context` (the longest sequence served) exceeds `original`, else the
        short ones."""
        factors = self.long_factor if context > self.original else self.short_factor
        inv_freq = _default_inv_freq(rotary_dim, theta)
        inv_freq = (inv_freq / torch.tensor(factors, dtype=torch.float64)).float()
        positions = torch.arange(max_positions, dtype=torch.float32)
        return _cos_sin(positions, inv_freq) * self.attention_factor


def _cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """cos and sin [P, 2, R] of positions [P] at inverse frequencies [R/2], "rotate half"."""
    freqs = torch.outer(positions, inv_freq)  # [P, R/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [P, R]
    return torch.stack([emb.cos(), emb.sin()], dim=1)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin for every position up to max_positions (the model's
    max_position_embeddings: LongRoPE's default factor is read from it), for the first
    rotary_dim dims of each head (all of them unless given)."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        rotary_dim: int | None = None,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim or head_dim
        if self.rotary_dim % 2 or self.rotary_dim > head_dim:
            raise ModelLoadError(
                f"rotary embeddings over {self.rotary_dim} of a head's {head_dim} dims: "
                "need an even number, at most the head's"
            )
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.cos_sin: torch.Tensor | None = None  # [max_positions, 2, rotary_dim], float32

    def build(self, device: torch.device, context: int | None = None) -> None:
        """The table, for sequences of up to `context` tokens (None: max_positions)."""
        R, P = self.rotary_dim, self.max_positions
        if rope_type(self.scaling) == "longrope":
            assert self.scaling is not None
            table = LongRope.parse(self.scaling, R, P).table(R, self.theta, P, context or P)
        else:
            table = _cos_sin(
                torch.arange(P, dtype=torch.float32), rope_inv_freq(R, self.theta, self.scaling)
            )
        self.cos_sin = table.to(device)

    def cos_sin_for(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """The tables of one step's token positions [T]; every layer reuses them."""
        assert self.cos_sin is not None, "RotaryEmbedding.build() not called"
        return self._tables(self.cos_sin[positions], dtype, self.cos_sin, positions)

    def _tables(
        self, rows: torch.Tensor, dtype: torch.dtype, table: torch.Tensor, positions: torch.Tensor
    ) -> RotaryTables:
        """RotaryTables of the step's rows [T, 2, R] of `table`, at `positions` in it."""
        cos_sin = rows.to(dtype)
        cos, sin = cos_sin[:, 0].unsqueeze(1), cos_sin[:, 1].unsqueeze(1)  # [T, 1, R]
        half = self.rotary_dim // 2
        # rotate_half(x) * sin == roll(x, half) * signed_sin, one op fewer per call
        signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        return RotaryTables(cos, signed_sin, table, positions)


class MRotaryEmbedding(RotaryEmbedding):
    """Multimodal RoPE (Qwen2-VL, Qwen2.5-VL): a token has three positions (time, height,
    width; equal for text), and the head's rotary frequencies are split into three sections,
    each turned by one of them (`mrope_section`, in frequency pairs). Text-only positions [T]
    give the plain rotary tables."""

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        mrope_section: list[int],
    ):
        super().__init__(head_dim, max_positions, theta, scaling)
        half = self.rotary_dim // 2
        if sum(mrope_section) != half:
            raise ModelLoadError(
                f"mrope_section {mrope_section} must add up to half the rotary dims ({half})"
            )
        self.mrope_section = list(mrope_section)
        self.axis_of_dim: torch.Tensor | None = None  # [R]: which position turns each dim

    def build(self, device: torch.device, context: int | None = None) -> None:
        super().build(device, context)
        axis = [i % 3 for i, n in enumerate(self.mrope_section) for _ in range(n)]
        self.axis_of_dim = torch.tensor(axis + axis, dtype=torch.long, device=device)

    def cos_sin_for(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """positions [T] (text) or [3, T]: the tables of one step, every layer reuses them.
        With three rows, the tables are built per token: `table` holds the step's rows and
        `positions` indexes them (0..T-1), which the native kernel reads the same way."""
        if positions.dim() == 1:
            return super().cos_sin_for(positions, dtype)
        assert self.cos_sin is not None and self.axis_of_dim is not None, "build() not called"
        per_axis = self.cos_sin[positions]  # [3, T, 2, R]
        axis = self.axis_of_dim.view(1, 1, 1, -1)
        table = per_axis.gather(0, axis.expand(1, *per_axis.shape[1:]))[0].contiguous()
        return self._tables(table, dtype, table, torch.arange(table.shape[0], device=table.device))


class RotaryTables(NamedTuple):
    """cos and sign-adjusted sin, [T, 1, R] each, for one step's positions; the whole
    table and the positions for the native kernel (tokenmill/kernels/layer_ops.c, which
    rotates whole heads only: R == D)."""

    cos: torch.Tensor
    signed_sin: torch.Tensor
    table: torch.Tensor  # [P, 2, R] float32
    positions: torch.Tensor  # [T]

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, heads, D] rotated by its token's position (HF "rotate half" layout, within
        the first R dims; the rest pass through)."""
        R = self.cos.shape[-1]
        if x.shape[-1] == R:
            return x * self.cos + x.roll(R // 2, dims=-1) * self.signed_sin
        turned = x[..., :R]
        turned = turned * self.cos + turned.roll(R // 2, dims=-1) * self.signed_sin
        return torch.cat([turned, x[..., R:]], dim=-1)
