"""Packed linear layers for CPU decode: weights stored once in a compact layout.

`gguf`: a GGUF checkpoint's own quantized blocks (Q4_1, Q8_0), multiplied by the native
kernel (tokenmill/kernels/quant_matmul.c) with activations quantized to int8 per 32-value
block and integer dot products (llama.cpp's numerics): about a third of float16's bytes
per step, batch-invariant. `gguf-float32`: the same blocks in float32 math (the
dequantized model's results up to summation order), ~1.8x slower at batch 32.
`fp16`: float16 weights, float32 activations and accumulation: the native kernel's
float16 panels, else fbgemm's fp16 GEMM. It halves the bytes read per decode step and
beats MKL's float32 GEMM at the small row counts of decode. (fbgemm's dynamic int8 was
measured too: faster still, but its per-call activation scale flipped the bundled model's
first greedy token.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from tokenmill.config import Quantization as QuantizationMethod
from tokenmill.kernels import quant_matmul

__all__ = [
    "BlockLookup",
    "GGUFLinear",
    "PackedLinear",
    "QuantizationMethod",
    "fast_fp16",
    "fbgemm_available",
    "fits_fp16",
    "quantize_linears",
    "weight_bytes",
]

# HF weight name -> (GGML type, [N, row_bytes] uint8 blocks), or None when not stored quantized
BlockLookup = Callable[[str], "tuple[int, torch.Tensor] | None"]


class PackedLinear(nn.Module):
    """y = x W^T + b with W [N, K] frozen as float16 (CPU, float32 in and out): in panels
    for the native kernel (quant_matmul.c), else in fbgemm's packed layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, method: QuantizationMethod):
        super().__init__()
        self.method = method
        self.out_features, self.in_features = weight.shape
        weight, bias = weight.detach().float(), None if bias is None else bias.detach().float()
        # the native panels where their vector tiles run, else fbgemm where it exists
        self.native = quant_matmul.vectorized() or not fbgemm_available()
        if self.native:
            self.panels = quant_matmul.pack_f16(weight)
            self.bias = bias
        else:
            with _fbgemm_engine():
                self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)

    @property
    def weight_bytes(self) -> int:
        """Bytes of packed weight a forward pass reads (scales and bias not counted)."""
        return self.out_features * self.in_features * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        if self.native:
            return quant_matmul.f16_matmul(x, self.panels, self.out_features, self.bias)
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def extra_repr(self) -> str:
        kernel = "native" if self.native else "fbgemm"
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}, {kernel}"


class GGUFLinear(nn.Module):
    """y = x W^T + b with W [N, K] kept as GGUF Q4_1/Q8_0 blocks, repacked in the native
    kernel's panels (CPU, float32 in and out). int8_activations: x is quantized to int8 per
    32-value block and each block's dot product is integer (llama.cpp's numerics), ~2x
    faster; else float32 math over the dequantized weights."""

    def __init__(
        self,
        blocks: torch.Tensor,
        ggml_type: int,
        in_features: int,
        bias: torch.Tensor | None,
        int8_activations: bool = False,
    ):
        super().__init__()
        self.ggml_type, self.in_features, self.out_features = ggml_type, in_features, len(blocks)
        self.int8_activations = int8_activations
        self.values, self.scales = quant_matmul.pack_blocks(
            blocks, ggml_type, in_features, int8_activations
        )
        self.bias = None if bias is None else bias.detach().float().contiguous()

    @property
    def weight_bytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.scales.numel() * 2

    @property
    def kernel_type(self) -> int:
        """The type argument of the native kernel: the GGML type, with its int8 flag."""
        return quant_matmul.kernel_type(self.ggml_type, self.int8_activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        return quant_matmul.quant_matmul(
            x, self.values, self.scales, self.ggml_type, self.out_features, self.bias,
            self.int8_activations,
        )  # fmt: skip

    def extra_repr(self) -> str:
        activations = "int8" if self.int8_activations else "float32"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"ggml_type={self.ggml_type}, activations={activations}"
        )


def gguf_linear(
    linear: nn.Linear | torch.Tensor,
    parts: list[tuple[int, torch.Tensor] | None],
    int8_activations: bool = False,
) -> GGUFLinear | None:
    """The GGUFLinear of a layer whose weight is the row-wise concatenation of `parts`
    (fused projections), or None when a part is not stored in a type the kernel reads."""
    if not parts or any(p is None or p[0] not in quant_matmul.BLOCK_LAYOUT for p in parts):
        return None
    types = {p[0] for p in parts if p is not None}
    if len(types) != 1:
        return None
    weight = linear.weight if isinstance(linear, nn.Linear) else linear
    bias = linear.bias if isinstance(linear, nn.Linear) else None
    blocks = torch.cat([p[1] for p in parts if p is not None])
    if blocks.shape[0] != weight.shape[0]:
        return None
    return GGUFLinear(blocks, types.pop(), weight.shape[1], bias, int8_activations)


_FP16_MAX = 65504.0


def fbgemm_available() -> bool:
    """Whether this PyTorch build has fbgemm (x86 CPUs) for its float16 GEMM."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def fast_fp16() -> bool:
    """Whether a fast float16 matmul runs here: the native vector tiles, or fbgemm."""
    return quant_matmul.vectorized() or fbgemm_available()


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
    packed = (m for m in module.modules() if isinstance(m, PackedLinear | GGUFLinear))
    return params + sum(m.weight_bytes for m in packed)


@contextmanager
def _fbgemm_engine() -> Iterator[None]:
    """Pack for fbgemm (the packed object keeps its backend, so running needs no global)."""
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = saved
