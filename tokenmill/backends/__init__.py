"""Backends: how a model runs on a device (base.py: the torch reference; cpu.py: the
native CPU kernels), the weight and cache formats they run (formats.py), and the machine
(device.py)."""

from __future__ import annotations

import torch

from tokenmill.backends.base import Backend
from tokenmill.errors import ModelLoadError


def select_backend(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    kv_cache_dtype: torch.dtype,
    head_dim: int,
) -> Backend:
    """The backend for `device`: "auto" picks the CPU backend on a CPU (native kernels
    where they run) and torch elsewhere; "torch" is the reference everywhere."""
    if name == "torch" or (name == "auto" and device.type != "cpu"):
        return Backend()
    if name in ("auto", "cpu"):
        if device.type != "cpu":
            raise ModelLoadError(f"backend 'cpu' runs on a CPU, not {device.type}")
        from tokenmill.backends.cpu import CpuBackend

        return CpuBackend(dtype, kv_cache_dtype, head_dim)
    raise ModelLoadError(f"unknown backend {name!r}; use auto, cpu or torch")
