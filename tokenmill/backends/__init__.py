"""Backends: how a model runs on a device (base.py: the torch reference; cpu.py: the
native CPU kernels; cuda.py: Triton paged attention), the weight and cache formats they run
(formats.py), and the machine (device.py)."""

from __future__ import annotations

import logging

import torch

from tokenmill.backends.base import Backend
from tokenmill.errors import ModelLoadError

logger = logging.getLogger(__name__)


def select_backend(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    kv_cache_dtype: torch.dtype,
    head_dim: int,
) -> Backend:
    """The backend for `device`: "auto" picks the CPU backend on a CPU (native kernels
    where they run) and the CUDA backend on a GPU (the reference where Triton does not
    import); "torch" is the reference everywhere."""
    if name == "torch":
        return Backend()
    if name == "cuda" or (name == "auto" and device.type == "cuda"):
        if device.type != "cuda":
            raise ModelLoadError(f"backend 'cuda' runs on a CUDA device, not {device.type}")
        try:
            from tokenmill.backends.cuda import CudaBackend
        except ImportError as error:
            if name == "cuda":
                raise ModelLoadError(f"backend 'cuda' needs Triton: {error}") from error
            logger.warning("Triton does not import (%s): attention runs as SDPA", error)
            return Backend()
        return CudaBackend()
    if name == "auto" and device.type != "cpu":
        return Backend()
    if name in ("auto", "cpu"):
        if device.type != "cpu":
            raise ModelLoadError(f"backend 'cpu' runs on a CPU, not {device.type}")
        from tokenmill.backends.cpu import CpuBackend

        return CpuBackend(dtype, kv_cache_dtype, head_dim)
    raise ModelLoadError(f"unknown backend {name!r}; use auto, cpu, cuda or torch")
