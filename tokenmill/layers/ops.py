"""The seam between layers and backends: the element-wise ops a layer calls, and the
context one forward pass runs in.

`TorchOps` is the reference: plain torch, any device and dtype. A backend (tokenmill/
backends) may override an op with a faster one that computes the same function; it is
chosen once at load, so a layer never asks which one it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokenmill.layers.attention import AttentionBackend, AttentionMetadata, KVCache

if TYPE_CHECKING:
    from tokenmill.layers.rotary import RotaryTables


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * RMSNorm(x), computed in float32 as the reference implementation does."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


class TorchOps:
    """The reference ops."""

    name = "torch"

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2 I] (gate | up) -> silu(gate) * up [T, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual) * weight, x + residual); without a residual x is the sum.
        May add into `residual` in place."""
        residual = x if residual is None else x + residual
        return rms_norm(residual, weight, eps), residual

    def rope_and_cache(
        self,
        qkv: torch.Tensor,  # [T, (H + 2 Hkv) D]
        rotary: RotaryTables,
        slots: torch.Tensor,  # [T]
        kv_cache: KVCache,
        num_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """q and k rotated, with k and v written into their cache slots, in one op; None
        where the backend has no such op (the layer then rotates, and attention writes)."""
        return None


@dataclass(slots=True)
class ForwardContext:
    """What every layer of one forward pass shares: the backend's ops and attention, and
    the step's attention metadata and KV caches (one per layer)."""

    ops: TorchOps
    attention: AttentionBackend
    meta: AttentionMetadata
    kv_caches: list[KVCache]
