"""The CUDA backend's element-wise ops: Triton kernels (kernels/triton_ops.py) in place of
the reference's chains of torch kernels; the reference where a kernel does not apply (an
fp8 cache, partial rotary), and for good after a kernel fails to compile on a GPU (one
warning)."""

from __future__ import annotations

import logging

import torch

from tokenmill.kernels import triton_ops
from tokenmill.layers.attention import KVCache
from tokenmill.layers.ops import TorchOps
from tokenmill.layers.rotary import RotaryTables

logger = logging.getLogger(__name__)

_CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what rope_and_cache writes


class TritonOps(TorchOps):
    name = "triton"

    def __init__(self) -> None:
        self.failed: str | None = None  # why the kernels stopped being used

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.failed is None:
            try:
                return triton_ops.silu_and_mul(gate_up)
            except Exception as error:  # noqa: BLE001 - kernels no GPU here has compiled
                self._give_up(error, gate_up)
        return super().silu_and_mul(gate_up)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.failed is None and (
            residual is None or (residual.is_contiguous() and residual.dtype == x.dtype)
        ):
            try:
                return triton_ops.add_rms_norm(x, residual, weight, eps)
            except Exception as error:  # noqa: BLE001
                self._give_up(error, x)
        return super().add_rms_norm(x, residual, weight, eps)

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        rotary: RotaryTables,
        slots: torch.Tensor,
        kv_cache: KVCache,
        num_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        k_cache, v_cache = kv_cache
        if (
            self.failed is not None
            or rotary.table.shape[-1] != k_cache.shape[-1]  # partial rotary
            or k_cache.dtype not in _CACHE_DTYPES
            or v_cache.dtype not in _CACHE_DTYPES
        ):
            return None  # (the layer rotates; attention writes the cache)
        try:
            return triton_ops.rope_and_cache(
                qkv, rotary.table, rotary.positions, slots, k_cache, v_cache, num_heads
            )
        except Exception as error:  # noqa: BLE001
            self._give_up(error, qkv)
            return None

    def _give_up(self, error: Exception, tensor: torch.Tensor) -> None:
        if tensor.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            # the interpreter (CPU tensors) is what the tests check: never hide it; a capture
            # that failed gives up its graphs, not the kernels
            raise error
        self.failed = f"{type(error).__name__}: {error}"
        logger.warning("the Triton element-wise kernels failed (%s); using torch's", self.failed)
