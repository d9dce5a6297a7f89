"""Python side of paged_attention.c: decode attention that reads the paged cache in place."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from tokenmill.kernels import KV_FORMATS, function, kv_format

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
# (query head x key) pairs per thread: below it a thread's start-up outweighs its share
# (docs/benchmarks.md, "Paged attention")
_MIN_WORK_PER_THREAD = 1024


def _function() -> Callable[..., int] | None:
    args = [_ptr] * 6 + [_i64] * 6 + [ctypes.c_float, _i64, _i64, ctypes.c_int]
    return function("tm_paged_decode_attention", *args)


def available() -> bool:
    return _function() is not None


def reads_f16(head_dim: int) -> bool:
    """Whether float16, bfloat16 and fp8 caches of this head size can be read (an F16C
    build's vector loops)."""
    fn = function("tm_paged_attention_reads_f16", _i64)
    return fn is not None and bool(fn(head_dim))


def supports(cache: torch.Tensor) -> bool:
    """Whether the kernel reads this cache [S, Hkv, D]: CPU float32, or float16, bfloat16
    or fp8 (float8_e5m2, float8_e4m3fn) where it can."""
    if cache.device.type != "cpu" or not available():
        return False
    return cache.dtype == torch.float32 or (
        cache.dtype in KV_FORMATS and reads_f16(cache.shape[-1])
    )


def attention_threads(num_heads: int, lens: torch.Tensor, window: int | None = None) -> int:
    """Threads for one call: one per _MIN_WORK_PER_THREAD (query head x key) pairs, at most
    torch's thread count."""
    keys = lens if window is None else lens.clamp(max=window)
    work = num_heads * int(keys.sum())
    return max(1, min(torch.get_num_threads(), work // _MIN_WORK_PER_THREAD))


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D] float32
    k_cache: torch.Tensor,  # [S, Hkv, D] float32, float16, bfloat16 or fp8 (see supports)
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int64
    lens: torch.Tensor,  # [B] int64, keys per sequence (>= 1)
    block_size: int,
    scale: float | None = None,  # of q.k; None = head_dim ** -0.5
    window: int | None = None,  # a row sees its last `window` keys only; None: all
) -> torch.Tensor:  # [B, H, D]
    fn = _function()
    assert fn is not None, "check supports() first"
    q = q.contiguous()
    batch, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    threads = attention_threads(num_heads, lens, window)
    status = fn(
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        lens.data_ptr(),
        out.data_ptr(),
        batch,
        num_heads,
        k_cache.shape[1],
        head_dim,
        block_size,
        block_tables.shape[1],
        head_dim**-0.5 if scale is None else scale,
        window or 0,
        threads,
        kv_format(k_cache.dtype),
    )
    if status != 0:
        raise RuntimeError("paged decode attention failed (empty sequence or out of memory)")
    return out
