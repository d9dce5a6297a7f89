"""Python side of quant_matmul.c: x @ W^T with W kept in a compact format: its GGUF blocks
(Q4_1, Q8_0), or float16 in panels of 16 output columns."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from tokenmill.kernels import function

# GGML type ids the kernel reads, and (values per block, bytes per block)
GGML_Q4_1, GGML_Q8_0 = 3, 8
BLOCK_LAYOUT = {GGML_Q4_1: (32, 20), GGML_Q8_0: (32, 34)}

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _function() -> Callable[..., int] | None:
    args = [_ptr, _i64, _i64, _ptr, _i64, _i64, ctypes.c_int, _ptr, _ptr, ctypes.c_int]
    return function("quant_matmul", "tm_quant_matmul", *args)


def _f16_function() -> Callable[..., int] | None:
    args = [_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, ctypes.c_int]
    return function("quant_matmul", "tm_f16_matmul", *args)


def available() -> bool:
    return _function() is not None


F16_PANEL = 16  # output columns per panel of the float16 layout


def pack_f16(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> float16 panels [ceil(N/16), K, 16] (output columns zero-padded)."""
    out_features, in_features = weight.shape
    panels = -(-out_features // F16_PANEL)
    padded = weight.new_zeros(panels * F16_PANEL, in_features, dtype=torch.float16)
    padded[:out_features] = weight
    return padded.view(panels, F16_PANEL, in_features).transpose(1, 2).contiguous()


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
    in_features = panels.shape[1]
    if x.shape[-1] != in_features or panels.shape[0] * F16_PANEL < out_features:
        raise ValueError(
            f"f16_matmul: x has {x.shape[-1]} features, the weight {in_features} "
            f"by {out_features} in {panels.shape[0]} panels"
        )
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    if x.shape[0] == 0:
        return y
    status = fn(
        x.data_ptr(),
        x.shape[0],
        in_features,
        panels.data_ptr(),
        out_features,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"float16 matmul failed (M {x.shape[0]}, K {in_features})")
    return y


def quant_matmul(
    x: torch.Tensor,  # [M, K] float32
    blocks: torch.Tensor,  # [N, row_bytes] uint8, GGUF blocks of each weight row
    ggml_type: int,
    in_features: int,
    bias: torch.Tensor | None = None,  # [N] float32
) -> torch.Tensor:  # [M, N]
    fn = _function()
    assert fn is not None, "check available() first"
    values_per_block, block_bytes = BLOCK_LAYOUT.get(ggml_type, (32, 0))
    if (
        x.shape[-1] != in_features
        or blocks.shape[1] != in_features // values_per_block * block_bytes
    ):
        raise ValueError(
            f"quant_matmul: x has {x.shape[-1]} features, the weight {in_features} "
            f"in rows of {blocks.shape[1]} bytes (type {ggml_type})"
        )
    x = x.contiguous()
    rows, out_features = x.shape[0], blocks.shape[0]
    y = x.new_empty(rows, out_features)
    if rows == 0:
        return y
    status = fn(
        x.data_ptr(),
        rows,
        in_features,
        blocks.data_ptr(),
        out_features,
        blocks.shape[1],
        ggml_type,
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        torch.get_num_threads(),
    )
    if status != 0:
        raise RuntimeError(f"quantized matmul failed (type {ggml_type}, K {in_features})")
    return y
