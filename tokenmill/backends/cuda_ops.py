"""The CUDA backend's element-wise ops: Triton kernels (kernels/triton_ops.py) in place of
the reference's chains of torch kernels; the reference where a kernel does not apply (an
fp8 cache, partial rotary), and for good after a kernel fails to compile on a GPU (one
warning)."""

from __future__ import annotations

import torch

from tokenmill.backends.cuda_attention import kernel_failure
from tokenmill.kernels import triton_ops
from tokenmill.layers.attention import KVCache
from tokenmill.layers.ops import TorchOps
from tokenmill.layers.rotary import RotaryTables

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
        self.failed = kernel_failure(error, tensor, "the Triton element-wise kernels", "torch's")
