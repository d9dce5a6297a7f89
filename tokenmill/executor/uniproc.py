"""One worker, in this process."""

from __future__ import annotations

import torch

from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.executor.base import Executor, ModelInfo
from tokenmill.model.source import ModelSource
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.worker.inputs import ModelOutput, ScheduledSequence
from tokenmill.worker.worker import Worker


class UniprocExecutor(Executor):
    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        source: ModelSource,
        grammars: StructuredOutputManager | None = None,
        draft: tuple[ModelSource, str | None] | None = None,  # a draft model, its quantization
    ):
        draft_source, draft_quantization = draft or (None, None)
        self.worker = Worker(
            model_config, cache_config, source, grammars,
            draft_source=draft_source, draft_quantization=draft_quantization,
        )  # fmt: skip
        self.info = ModelInfo.of(self.worker)

    def execute(self, scheduled: list[ScheduledSequence]) -> ModelOutput:
        return self.worker.execute(scheduled)

    def logits_for(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        return self.worker.runner.logits_for(scheduled)

    def forget(self, request_id: str) -> None:
        self.worker.forget(request_id)

    def shutdown(self) -> None:
        """Nothing to release: the worker lives and ends with this process."""
