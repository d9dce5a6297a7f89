"""Python side of gguf_rows.c: rows of a GGUF tensor's quantized blocks decoded to float32,
equal to gguf-py's (and ggml's) dequantization of those rows; rows stored as float16 or
bfloat16 are read by torch."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from tokenmill.kernels import function

# GGML type ids gguf_rows.c decodes -> (values, bytes) per block
ROW_LAYOUT = {
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
}
GGML_F16, GGML_BF16 = 1, 30
FLOAT_ROWS = {GGML_F16: torch.float16, GGML_BF16: torch.bfloat16}  # plain values


def _function() -> Callable[..., int] | None:
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return function("tm_gguf_rows", p, i64, ctypes.c_int, i64, p, i64, p)


def available() -> bool:
    return _function() is not None


def decodes(ggml_type: int, dim: int) -> bool:
    """Whether rows of `dim` values of `ggml_type` can be decoded here."""
    if ggml_type in FLOAT_ROWS:
        return True
    layout = ROW_LAYOUT.get(ggml_type)
    return layout is not None and dim % layout[0] == 0 and available()


def gguf_rows(
    blocks: torch.Tensor,  # [V, row_bytes] uint8, contiguous
    ggml_type: int,
    dim: int,
    ids: torch.Tensor,  # [T] integer, each in [0, V)
) -> torch.Tensor:  # [T, dim] float32
    """Rows `ids` of the tensor whose GGUF blocks are `blocks`, as float32."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= blocks.shape[0]):
        raise IndexError(f"token id out of range [0, {blocks.shape[0]})")
    dtype = FLOAT_ROWS.get(ggml_type)
    if dtype is not None:
        return blocks.view(dtype).index_select(0, ids.reshape(-1).to(torch.int64)).float()
    fn = _function()
    assert fn is not None, "check available() first"
    ids = ids.reshape(-1).to(torch.int64).contiguous()
    out = torch.empty(len(ids), dim, dtype=torch.float32)
    row_bytes = blocks.shape[1]
    status = fn(
        blocks.data_ptr(), row_bytes, ggml_type, dim, ids.data_ptr(), len(ids), out.data_ptr()
    )
    if status != 0:
        raise ValueError(f"gguf_rows: type {ggml_type} with {dim} values in {row_bytes} bytes")
    return out
