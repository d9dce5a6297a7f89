"""RMSNorm computed in float32, as the reference implementation does."""

from __future__ import annotations

import torch

from tokenmill.layers.ops import TorchOps, rms_norm


class RMSNorm(torch.nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, ops: TorchOps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); without a residual, x itself is the sum."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)
