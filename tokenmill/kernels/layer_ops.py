"""Python side of layer_ops.c: a decoder layer's element-wise work in one native call each
(the sampler's row kernels in the same file: sampling_ops.py).

Every function takes float32 CPU tensors; `available()` says whether the library built.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from tokenmill.kernels import function, kv_format

_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int


def _fn(symbol: str, *argtypes: object) -> Callable[..., int]:
    fn = function(symbol, *argtypes)
    assert fn is not None, "check available() first"
    return fn


def available() -> bool:
    return function("tm_silu_mul", _ptr, _ptr, _i64, _i64) is not None


def writes_f16() -> bool:
    """Whether rope_and_cache can write float16 and fp8 caches (an F16C build)."""
    fn = function("tm_rope_writes_f16")
    return fn is not None and bool(fn())


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, add: bool = True
) -> torch.Tensor:
    """residual += x (in place, when add), then RMSNorm(residual) * weight. [T, C] each."""
    assert residual.is_contiguous() and x.is_contiguous()
    out = torch.empty_like(residual)
    rows, size = residual.shape
    fn = _fn("tm_add_rms_norm", _ptr, _ptr, _ptr, _ptr, _i64, _i64, _f32, _int)
    fn(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, size, eps, add)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 I] (gate | up) -> silu(gate) * up [T, I]."""
    gate_up = gate_up.contiguous()
    rows, width = gate_up.shape
    out = gate_up.new_empty(rows, width // 2)
    _fn("tm_silu_mul", _ptr, _ptr, _i64, _i64)(gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
    return out


def rope_and_cache(
    qkv: torch.Tensor,  # [T, (H + 2 Hkv) D]
    cos_sin: torch.Tensor,  # [P, 2, D] float32
    positions: torch.Tensor,  # [T] int64
    slots: torch.Tensor,  # [T] int64
    k_cache: torch.Tensor,  # [S, Hkv, D] float32, or float16 / fp8 (see writes_f16)
    v_cache: torch.Tensor,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # q [T, H, D], k [T, Hkv, D], rotated
    """Rotate q and k by position, write k and v into the cache slots, return q and k."""
    qkv = qkv.contiguous()
    rows = qkv.shape[0]
    num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    q = qkv.new_empty(rows, num_heads, head_dim)
    k = qkv.new_empty(rows, num_kv_heads, head_dim)
    fn = _fn("tm_rope_and_cache", *[_ptr] * 8, *[_i64] * 6, _int)
    status = fn(
        qkv.data_ptr(),
        cos_sin.data_ptr(),
        positions.data_ptr(),
        slots.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        rows,
        num_heads,
        num_kv_heads,
        head_dim,
        cos_sin.shape[0],
        k_cache.shape[0],
        kv_format(k_cache.dtype),
    )
    if status == 2:
        raise ValueError("this build cannot write a float16 or fp8 KV cache (no F16C)")
    if status != 0:
        raise IndexError("a token position or cache slot is out of range")
    return q, k
