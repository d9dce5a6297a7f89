"""Python side of decode_step.c: a decode-only step's decoder layers in one native call.

At batch 1 a decode step is ~10 kernel calls per layer, each a few microseconds of Python
and ctypes around a few tens of the kernel itself; this runs the same kernels in the same
order from C (bit-identical results). Built once per model and KV cache: the structs hold
raw pointers, so the weights and caches they point at must outlive it (the model does).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from tokenmill.kernels import function, kv_format
from tokenmill.kernels.paged_attention import attention_threads

_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int


class Projection(NamedTuple):
    """A bias-free projection as the kernel reads it: float16 panels (type 0, no scales) or
    GGUF values and scales (type = the GGML type)."""

    values: torch.Tensor
    scales: torch.Tensor | None
    type: int
    out_features: int


class LayerWeights(NamedTuple):
    input_norm: torch.Tensor  # [C] float32
    post_attention_norm: torch.Tensor
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    window: int | None = None  # its attention's sliding window; None: the whole context


class _Projection(ctypes.Structure):
    _fields_ = [("values", _ptr), ("scales", _ptr), ("type", _i64), ("out_features", _i64)]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr),
        ("post_attention_norm", _ptr),
        ("qkv", _Projection),
        ("o", _Projection),
        ("gate_up", _Projection),
        ("down", _Projection),
        ("k_cache", _ptr),
        ("v_cache", _ptr),
        ("window", _i64),
    ]


class _Shape(ctypes.Structure):
    _fields_ = [
        (name, _i64)
        for name in (
            "hidden",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate",
            "num_positions",
            "num_slots",
            "block_size",
            "cache_format",
        )
    ] + [("eps", _f32), ("scale", _f32)]


def _function() -> Callable[..., int] | None:
    args = [_ptr, _i64, _ptr, _ptr, _ptr, _i64, *[_ptr] * 5, _i64, _int, _int]
    return function("tm_decode_layers", *args)


def available() -> bool:
    return _function() is not None


def _projection(p: Projection) -> _Projection:
    scales = None if p.scales is None else p.scales.data_ptr()
    return _Projection(p.values.data_ptr(), scales, p.type, p.out_features)


class DecodeLayers:
    """Every decoder layer of a model over its KV caches, for decode-only steps."""

    def __init__(
        self,
        layers: Sequence[LayerWeights],
        kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]],
        *,
        hidden: int,
        num_heads: int,
        intermediate: int,
        eps: float,
        cos_sin: torch.Tensor,  # [P, 2, D] float32, the whole rotary table
        block_size: int,
    ):
        fn = _function()
        assert fn is not None, "check available() first"
        self._fn = fn
        k_cache = kv_caches[0][0]
        num_slots, num_kv_heads, head_dim = k_cache.shape
        self.num_heads, self.cos_sin = num_heads, cos_sin
        self._layers = (_Layer * len(layers))(
            *(
                _Layer(
                    w.input_norm.data_ptr(),
                    w.post_attention_norm.data_ptr(),
                    _projection(w.qkv),
                    _projection(w.o),
                    _projection(w.gate_up),
                    _projection(w.down),
                    k.data_ptr(),
                    v.data_ptr(),
                    w.window or 0,
                )
                for w, (k, v) in zip(layers, kv_caches, strict=True)
            )
        )
        self._num_layers = len(layers)
        windows = {w.window for w in layers}
        self._window = windows.pop() if len(windows) == 1 else None  # for the thread count
        self._shape = _Shape(
            hidden, num_heads, num_kv_heads, head_dim, intermediate,
            cos_sin.shape[0], num_slots, block_size, kv_format(k_cache.dtype),
            eps, head_dim**-0.5,
        )  # fmt: skip
        self._keep = (layers, kv_caches)  # the pointers above stay valid while these live

    def __call__(
        self,
        x: torch.Tensor,  # [T, C] float32 embeddings; the last layer's MLP output on return
        positions: torch.Tensor,  # [T] int64
        slots: torch.Tensor,  # [T] int64 cache slot of each row's new key
        tables: torch.Tensor,  # [T, max_blocks] int64 block tables
        lens: torch.Tensor,  # [T] int64 keys per row, the new one included
    ) -> torch.Tensor:  # the residual sum before x [T, C]
        assert x.is_contiguous() and tables.is_contiguous()
        rows = x.shape[0]
        residual = torch.empty_like(x)
        status = self._fn(
            self._layers, self._num_layers, ctypes.byref(self._shape), x.data_ptr(),
            residual.data_ptr(), rows, self.cos_sin.data_ptr(), positions.data_ptr(),
            slots.data_ptr(), tables.data_ptr(), lens.data_ptr(), tables.shape[1],
            torch.get_num_threads(), attention_threads(self.num_heads, lens, self._window),
        )  # fmt: skip
        if status != 0:
            raise RuntimeError("decode step failed (position or slot out of range, or no memory)")
        return residual
