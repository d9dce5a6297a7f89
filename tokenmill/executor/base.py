"""Executor: the engine's one handle on the devices that run the model.

The engine core schedules; the executor runs each step on its worker(s) and returns one
ModelOutput. An executor over several processes sends each worker the step (sequences,
their new tokens and block tables) and gathers the sampled tokens from the worker that
samples; nothing above this interface knows how many there are.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from tokenmill.config import Quantization
from tokenmill.model.config import ArchConfig
from tokenmill.worker.inputs import ModelOutput, ScheduledSequence
from tokenmill.worker.worker import Worker


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the engine needs to know of the loaded model and its KV cache."""

    arch: ArchConfig
    num_parameters: int
    device: torch.device
    dtype: torch.dtype
    quantization: Quantization | None
    cpu_threads: str  # how the CPU threads were chosen ("" off CPU)
    num_blocks: int  # KV cache blocks (each worker has this many)
    kv_cache_bytes: int  # over every rank
    kv_cache_dtype: torch.dtype
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1

    @classmethod
    def of(cls, worker: Worker, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> ModelInfo:
        """Rank 0's worker, described for the engine (the KV bytes over every rank)."""
        return cls(
            arch=worker.model.config,
            num_parameters=worker.num_parameters,
            device=worker.device,
            dtype=worker.dtype,
            quantization=worker.quantization,
            cpu_threads=worker.cpu_threads,
            num_blocks=worker.num_blocks,
            kv_cache_bytes=worker.kv_cache_bytes * tensor_parallel * pipeline_parallel,
            kv_cache_dtype=worker.kv_cache_dtype,
            tensor_parallel_size=tensor_parallel,
            pipeline_parallel_size=pipeline_parallel,
        )


class Executor(ABC):
    info: ModelInfo

    @abstractmethod
    def execute(self, scheduled: list[ScheduledSequence]) -> ModelOutput:
        """Run one step: compute the scheduled tokens, sample where asked."""

    @abstractmethod
    def logits_for(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        """The float32 logits [N, V] of the sampling rows, without sampling."""

    @abstractmethod
    def forget(self, request_id: str) -> None:
        """Drop what the workers keep for a request that ended."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release the workers."""

    def check_health(self) -> None:  # noqa: B027 - a no-op unless workers are processes
        """Raise (PeerError) once a worker is gone; nothing with one in this process."""
