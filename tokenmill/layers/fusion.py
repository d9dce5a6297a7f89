"""What a model tells a backend about layers it may run fused: today, decoder layers of
the standard pre-norm shape (Llama's), which the CPU backend runs a decode step through
in one native call (tokenmill/backends/cpu.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn


class PreNormBlock(NamedTuple):
    """One decoder layer: h = x + o(attention(rope(qkv(RMSNorm(x))))), then
    out = h + down(silu(gate) * up)(RMSNorm(h)), with gate_up = gate | up. The projections
    are whatever the backend packed them as; no q/k norms."""

    input_norm: torch.Tensor  # [C]
    qkv_proj: nn.Module
    o_proj: nn.Module
    post_attention_norm: torch.Tensor  # [C]
    gate_up_proj: nn.Module
    down_proj: nn.Module
    window: int | None = None  # the attention's sliding window; None: the whole context


@dataclass(slots=True)
class PreNormDecoder:
    """A model's whole stack of PreNormBlocks, between its embedding and its final norm."""

    blocks: list[PreNormBlock]
    num_heads: int
    intermediate_size: int
    eps: float
    cos_sin: torch.Tensor  # [P, 2, D] float32, the rotary table
