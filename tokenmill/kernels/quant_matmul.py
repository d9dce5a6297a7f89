"""Python side of quant_matmul.c: x @ W^T with W kept in a compact format: its GGUF blocks
(Q4_1, Q8_0), or float16 in panels of 16 output columns. GGUF blocks multiply float32
activations, or (int8_activations) activations quantized to int8 per 32-value block with
integer dot products, as llama.cpp does."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from tokenmill.kernels import function

# GGML type ids the kernel reads, and (values per block, bytes per block)
GGML_Q4_1, GGML_Q8_0 = 3, 8
BLOCK_LAYOUT = {GGML_Q4_1: (32, 20), GGML_Q8_0: (32, 34)}
INT8_ACTIVATIONS = 256  # type flag: int8 activations, values in dot-product order


def kernel_type(ggml_type: int, int8_activations: bool) -> int:
    """The kernel's type argument: the GGML type, flagged when activations are int8."""
    return ggml_type | (INT8_ACTIVATIONS if int8_activations else 0)


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _function() -> Callable[..., int] | None:
    args = [_ptr, _i64, _i64, _ptr, _ptr, _i64, ctypes.c_int, _ptr, _ptr, ctypes.c_int]
    return function("tm_quant_matmul", *args)


def _f16_function() -> Callable[..., int] | None:
    args = [_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, ctypes.c_int]
    return function("tm_f16_matmul", *args)


def available() -> bool:
    return _function() is not None


def vectorized() -> bool:
    """Whether the kernels run their vector tiles here (x86 with AVX2, FMA, F16C); elsewhere
    a portable scalar path computes the same chains, far slower."""
    fn = function("tm_matmul_vectorized")
    return fn is not None and fn() == 1


PANEL = 16  # output columns per panel (float16 and GGUF layouts)


def pack_f16(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> float16 panels [ceil(N/16), K, 16] (output columns zero-padded)."""
    out_features, in_features = weight.shape
    panels = -(-out_features // PANEL)
    padded = weight.new_zeros(panels * PANEL, in_features, dtype=torch.float16)
    padded[:out_features] = weight
    return padded.view(panels, PANEL, in_features).transpose(1, 2).contiguous()


def f16_matmul(
    x: torch.Tensor,  # [M, K] float32
    panels: torch.Tensor,  # from pack_f16
    out_features: int,
    bias: torch.Tensor | None = None,  # [N] float32
) -> torch.Tensor:  # [M, N]
    """x W^T (+ bias) in float32 math over float16 weights; every output is one fused
    multiply-add chain over k in order, so a row's result never depends on its batch."""
    fn = _f16_function()
    assert fn is not None, "check available() first"
    return _run(
        "float16 matmul",
        fn,
        x,
        panels.shape[1],
        panels.shape[0],
        (panels.data_ptr(),),
        (),
        out_features,
        bias,
    )


def pack_blocks(
    blocks: torch.Tensor, ggml_type: int, in_features: int, int8_activations: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF rows [N, row_bytes] -> (values, float16 scales) in the kernel's panels of 16
    output columns (see quant_matmul.c; int8_activations: values in dot-product order);
    output columns zero-padded to a whole panel."""
    values_per_block, block_bytes = BLOCK_LAYOUT.get(ggml_type, (32, 0))
    if block_bytes == 0 or in_features % values_per_block:
        raise ValueError(f"quant_matmul reads Q4_1 and Q8_0 rows, not type {ggml_type}")
    num_blocks = in_features // values_per_block
    if blocks.dtype != torch.uint8 or blocks.shape[1] != num_blocks * block_bytes:
        raise ValueError(
            f"quant_matmul: rows of {blocks.shape[1]} bytes for {in_features} "
            f"type-{ggml_type} values"
        )
    rows = blocks.shape[0]
    panels = -(-rows // PANEL)
    padded = blocks.new_zeros(panels * PANEL, num_blocks, block_bytes)
    padded[:rows] = blocks.view(rows, num_blocks, block_bytes)

    def halves(start: int) -> torch.Tensor:  # [panels, blocks, 16] float16 at a byte offset
        half = padded[:, :, start : start + 2].contiguous().view(torch.float16).squeeze(-1)
        return half.view(panels, PANEL, num_blocks).transpose(1, 2)

    if ggml_type == GGML_Q4_1:
        packed = padded[:, :, 4:]  # value j: low nibble of byte j, value j + 16: high nibble
        if int8_activations:  # [panels, blocks, group, v, column, i]: values 4v+i | 16+4v+i
            nibbles = packed.reshape(panels, 2, 8, num_blocks, 4, 4)
            values = nibbles.permute(0, 3, 1, 4, 2, 5)
        else:
            q = torch.cat([packed & 15, packed >> 4], dim=-1).view(panels, PANEL, in_features)
            values = (q[:, :8] | (q[:, 8:] << 4)).transpose(1, 2)  # byte j: columns j, j + 8
        scales = torch.stack([halves(0), halves(2)], dim=2)
    else:
        q = padded[:, :, 2:].contiguous().view(torch.int8).view(panels, PANEL, in_features)
        if int8_activations:  # [panels, blocks, group, j, column, i]: value 4j + i
            values = q.reshape(panels, 2, 8, num_blocks, 8, 4).permute(0, 3, 1, 4, 2, 5)
        else:
            values = q.transpose(1, 2)
        scales = halves(0).unsqueeze(2)
    return values.contiguous(), scales.contiguous()


def quant_matmul(
    x: torch.Tensor,  # [M, K] float32
    values: torch.Tensor,  # from pack_blocks
    scales: torch.Tensor,
    ggml_type: int,
    out_features: int,
    bias: torch.Tensor | None = None,  # [N] float32
    int8_activations: bool = False,  # as the values were packed
) -> torch.Tensor:  # [M, N]
    """x W^T (+ bias) with W the GGUF blocks packed by pack_blocks: float32 math, or x
    quantized to int8 per 32-value block and integer dot products per block."""
    fn = _function()
    assert fn is not None, "check available() first"
    weights = (values.data_ptr(), scales.data_ptr())
    in_features = scales.shape[1] * BLOCK_LAYOUT[ggml_type][0]
    return _run(
        "quantized matmul",
        fn,
        x,
        in_features,
        values.shape[0],
        weights,
        (kernel_type(ggml_type, int8_activations),),
        out_features,
        bias,
    )


def _run(
    what: str,
    fn: Callable[..., int],
    x: torch.Tensor,
    in_features: int,  # the weight's shape: K, and output columns in panels of 16
    num_panels: int,
    weights: tuple[int, ...],  # the weight's pointers
    format_args: tuple[int, ...],
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Check the shapes, then y [M, N] = fn(x [M, K], weights, N, format, bias) on torch's
    thread count."""
    if x.shape[-1] != in_features or num_panels * PANEL < out_features:
        raise ValueError(
            f"{what}: x has {x.shape[-1]} features, the weight {in_features} "
            f"by {out_features} in {num_panels} panels"
        )
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    if x.shape[0] == 0:
        return y
    bias_ptr = None if bias is None else bias.data_ptr()
    rows, threads = x.shape[0], torch.get_num_threads()
    status = fn(x.data_ptr(), rows, in_features, *weights, out_features, *format_args, bias_ptr, y.data_ptr(), threads)  # fmt: skip
    if status != 0:
        raise RuntimeError(f"{what} failed (M {rows}, K {in_features}, format {format_args})")
    return y
