"""Packed linear layers for CPU decode: weights stored once in fbgemm's layout.

`fp16`: float16 weights, float32 activations and accumulation (fbgemm's fp16 GEMM).
It halves the bytes read per decode step and beats MKL's float32 GEMM at the small
row counts of decode. (fbgemm's dynamic int8 was measured too: faster still, but its
per-call activation scale flipped the bundled model's first greedy token.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tokenmill.config import Quantization as QuantizationMethod

__all__ = ["PackedLinear", "QuantizationMethod", "fits_fp16", "quantize_linears", "weight_bytes"]


class PackedLinear(nn.Module):
    """y = x W^T + b with W [N, K] frozen in fbgemm's packed layout (CPU, float32 in and out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, method: QuantizationMethod):
        super().__init__()
        self.method = method
        self.out_features, self.in_features = weight.shape
        weight, bias = weight.detach().float(), None if bias is None else bias.detach().float()
        with _fbgemm_engine():
            self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)

    @property
    def weight_bytes(self) -> int:
        """Bytes of packed weight a forward pass reads (scales and bias not counted)."""
        return self.out_features * self.in_features * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}"


_FP16_MAX = 65504.0


def fits_fp16(weight: torch.Tensor) -> bool:
    """Whether `weight` is within float16's range (a layer past it is not packed)."""
    return bool(weight.detach().abs().max() <= _FP16_MAX)


def quantize_linears(module: nn.Module, method: QuantizationMethod) -> None:
    """Replace every nn.Linear under `module` whose weight fits with its PackedLinear."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            if fits_fp16(child.weight):
                setattr(module, name, PackedLinear(child.weight, child.bias, method))
        else:
            quantize_linears(child, method)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and packed weight under `module`."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    return params + sum(m.weight_bytes for m in module.modules() if isinstance(m, PackedLinear))


@contextmanager
def _fbgemm_engine() -> Iterator[None]:
    """Pack for fbgemm (the packed object keeps its backend, so running needs no global)."""
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = saved
