"""Worker: one device's share of the model — it loads the weights in the format chosen
for the device (its tensor-parallel shard of them, in a group of several), allocates the
KV cache tensors, and runs steps."""

from __future__ import annotations

import logging
import time

import torch

from tokenmill.backends import formats, select_backend
from tokenmill.backends.device import (
    configure_cpu_threads,
    kv_cache_bytes,
    resolve_device,
    resolve_dtype,
)
from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.distributed import group as parallel
from tokenmill.distributed.group import SINGLE, ParallelGroup
from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import GGUFLinear, PackedLinear, TransposedHead
from tokenmill.model.config import head_shards, text_config
from tokenmill.model.interface import CausalLM
from tokenmill.model.registry import model_class
from tokenmill.model.source import ModelSource
from tokenmill.model.vision import VisionLanguageModel
from tokenmill.model.weights import load_model, stage_layers
from tokenmill.sample.sampler import Sampler
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.worker.inputs import ModelOutput, ScheduledSequence
from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class Worker:
    """Loads the model on its device and runs steps on it."""

    def __init__(
        self,
        model_config: ModelConfig,
        cache_config: CacheConfig,
        source: ModelSource,
        grammars: StructuredOutputManager | None = None,
        group: ParallelGroup = SINGLE,
        pipeline: bool = False,
    ):
        """`group`: the ranks this worker is one of; each holds a shard of every layer
        (tensor parallel) or, with `pipeline`, a run of the layers (a stage)."""
        self.group = group
        tp = SINGLE if pipeline else group
        self.device = resolve_device(model_config.device)
        self.cpu_threads = (
            configure_cpu_threads(model_config.cpu_threads) if self.device.type == "cpu" else ""
        )
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        self.quantization = formats.resolve_quantization(
            model_config.quantization, model_config.dtype, self.device, source.file_format
        )
        if model_config.backend == "torch" and self.quantization is not None:
            if model_config.quantization is not None:
                raise ModelLoadError(
                    f"quantization {self.quantization!r} runs on the cpu backend; the torch "
                    "backend runs the checkpoint's own weights (quantization none)"
                )
            self.quantization = None  # the reference: exact weights
        if self.quantization is not None:
            formats.check_quantization(self.quantization, self.device, self.dtype)
        started = time.perf_counter()
        cls = model_class(source.hf_config)
        if group.size > 1 and issubclass(cls, VisionLanguageModel):
            raise ModelLoadError(
                f"{cls.__name__}: tensor and pipeline parallelism do not run vision-language "
                "models yet"
            )
        layers = None
        if pipeline:
            num_layers = int(text_config(source.hf_config)["num_hidden_layers"])
            layers = stage_layers(num_layers, group.rank, group.size)
        with parallel.building_for(tp):
            self.model: CausalLM = load_model(
                cls, source, self.device, self.dtype, model_config.max_model_len, layers
            )
        cfg = self.model.config
        stack = self.model.get_submodule("model.layers")
        assert isinstance(stack, torch.nn.ModuleList)
        num_layers = len(stack)  # this stage's
        kv_heads = head_shards(cfg.num_heads, cfg.num_kv_heads, tp.rank, tp.size)[1][1]
        self.kv_cache_dtype = formats.resolve_kv_cache_dtype(
            cache_config.kv_cache_dtype, self.dtype, self.device, self.quantization, cfg.head_dim
        )
        self.backend = select_backend(
            model_config.backend, self.device, self.dtype, self.kv_cache_dtype, cfg.head_dim
        )
        self.backend.prepare(self.model, self.quantization, source.read_blocks)
        logger.debug("model loaded in %.1f s", time.perf_counter() - started)
        self.block_size = cache_config.block_size
        bytes_per_block = (
            2 * num_layers * self.block_size * kv_heads * cfg.head_dim
            * self.kv_cache_dtype.itemsize
        )  # fmt: skip
        budget = kv_cache_bytes(cache_config, self.device)
        # every rank holds the same blocks (of its own heads): the fewest any can
        self.num_blocks = group.min_int(max(1, budget // bytes_per_block))
        self.kv_cache_bytes = self.num_blocks * bytes_per_block
        shape = (self.num_blocks * self.block_size, kv_heads, cfg.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
                torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
            )
            for _ in range(num_layers)
        ]
        sampler = Sampler(cfg.vocab_size, self.device, model_config.seed, grammars)
        self.runner = ModelRunner(
            self.model, self.backend, self.kv_caches, sampler, self.block_size, self.device,
            group, pipeline,
        )  # fmt: skip
        logger.info("backend: %s, kernels: %s", self.backend.name, self.backend.description)

    @property
    def num_parameters(self) -> int:
        """The checkpoint's parameter count, whatever format the weights are packed in."""
        count = sum(p.numel() for p in self.model.parameters())
        tied = self.model.config.tie_word_embeddings
        for path, module in self.model.named_modules():
            if path == "lm_head" and tied:
                continue  # the embedding, counted already
            if isinstance(module, PackedLinear | GGUFLinear | TransposedHead):
                count += module.in_features * module.out_features
        return count

    def execute(self, scheduled: list[ScheduledSequence]) -> ModelOutput:
        return self.runner.execute(scheduled)

    def forget(self, request_id: str) -> None:
        """Drop what the sampler keeps for a request that ended."""
        self.runner.forget(request_id)
