"""RMSNorm computed in float32, as the reference implementation does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.kernels import layer_ops


class RMSNorm(torch.nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, native: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); without a residual, x itself is the sum.

        native: one call of the float32 kernel, which adds into `residual` in place.
        """
        if native:
            if residual is None:
                residual = x.contiguous()
                return layer_ops.add_rms_norm(
                    residual, residual, self.weight, self.eps, False
                ), residual
            return layer_ops.add_rms_norm(x, residual, self.weight, self.eps), residual
        residual = x if residual is None else x + residual
        return self(residual), residual
