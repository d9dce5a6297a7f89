"""Python side of the sampler's row kernels (in layer_ops.c, built into the one library):
argmax and inverse-CDF draws over [N, V] float32 CPU logits, one vectorized pass per row."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from tokenmill.kernels import function

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _fn(symbol: str, *argtypes: object) -> Callable[..., int]:
    fn = function(symbol, *argtypes)
    assert fn is not None, "check layer_ops.available() first"
    return fn


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor
) -> torch.Tensor | None:
    """One token per row of softmax(logits [N, V] / temperature [N]) by inverse CDF at
    uniforms [N]; None when a row has no finite logit (the caller's torch path decides).
    The rows may be a slice of wider ones."""
    logits = _unit_columns(logits)
    rows, vocab = logits.shape
    temperature = temperature.to(torch.float32).contiguous()
    uniforms = uniforms.to(torch.float32).contiguous()
    out = torch.empty(rows, dtype=torch.long)
    fn = _fn("tm_sample_rows", _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr)
    status = fn(
        logits.data_ptr(), rows, vocab, logits.stride(0),
        temperature.data_ptr(), uniforms.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    if status == 2:
        raise MemoryError("tm_sample_rows: out of memory")
    return None if status else out


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits [N, V], dim=-1) for float32 CPU rows (first maximum, or first NaN)
    in one vectorized pass per row; the rows may be a slice of wider ones."""
    logits = _unit_columns(logits)
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long)
    fn = _fn("tm_argmax_rows", _ptr, _i64, _i64, _i64, _ptr)
    if fn(logits.data_ptr(), rows, vocab, logits.stride(0), out.data_ptr()) != 0:
        raise ValueError("argmax_rows: empty logits")
    return out


def _unit_columns(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] whose values within a row are adjacent (the kernels take the row
    stride, so a slice of a padded vocabulary is read in place)."""
    return logits if logits.stride(1) == 1 else logits.contiguous()
