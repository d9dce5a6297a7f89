"""Worker: one device's share of the model — it loads the weights in the format chosen
for the device (its tensor-parallel shard of them, in a group of several), allocates the
KV cache tensors, and runs steps."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tokenmill.backends import formats, select_backend
from tokenmill.backends.base import Backend, GraphSettings
from tokenmill.backends.device import (
    check_kv_cache_fits,
    configure_cpu_threads,
    kv_cache_bytes,
    resolve_device,
    resolve_dtype,
    zeros,
)
from tokenmill.config import (
    CacheConfig,
    ModelConfig,
    Quantization,
    SchedulerConfig,
    capture_sizes,
)
from tokenmill.distributed import group as parallel
from tokenmill.distributed.group import SINGLE, ParallelGroup
from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import GGUFLinear, PackedLinear, TransposedHead
from tokenmill.layers.ops import KVCache
from tokenmill.layers.vocab import GGUFEmbedding
from tokenmill.model.config import head_shards, text_config
from tokenmill.model.interface import CausalLM
from tokenmill.model.registry import model_class
from tokenmill.model.source import ModelSource
from tokenmill.model.vision import VisionLanguageModel
from tokenmill.model.weights import build_model, fill_model, stage_layers
from tokenmill.sample.sampler import Sampler
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.worker.draft_runner import DraftRunner
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
        draft_source: ModelSource | None = None,
        draft_quantization: str | None = None,
    ):
        """`group`: the ranks this worker is one of; each holds a shard of every layer
        (tensor parallel) or, with `pipeline`, a run of the layers (a stage).
        `draft_source`: a draft model that guesses the next tokens (speculative decoding),
        run beside the model on KV caches with the same blocks (one worker only)."""
        self.group = group
        tp = SINGLE if pipeline else group
        self.device = resolve_device(model_config.device)
        self.cpu_threads = (
            configure_cpu_threads(model_config.cpu_threads) if self.device.type == "cpu" else ""
        )
        self.dtype = resolve_dtype(model_config.dtype, self.device)
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
        loaded = load_on_device(
            model_config, cache_config, source, self.device, self.dtype,
            model_config.quantization, tp, layers,
        )  # fmt: skip
        self.model, self.backend = loaded.model, loaded.backend
        self.quantization = loaded.quantization
        self.kv_cache_dtype = loaded.kv_cache_dtype
        draft = None
        if draft_source is not None:
            if self.model.config.kv_window is not None:
                raise ModelLoadError(
                    "speculative_config: every layer of the model attends a sliding window, "
                    "whose old KV blocks are freed; a draft model would read them"
                )
            draft = load_on_device(
                model_config, cache_config, draft_source, self.device, self.dtype,
                draft_quantization,
            )  # fmt: skip
        self.block_size = cache_config.block_size
        bytes_per_block = loaded.bytes_per_block(self.block_size)
        if draft is not None:  # the draft's cache has the same blocks: their bytes share
            bytes_per_block += draft.bytes_per_block(self.block_size)
        budget = kv_cache_bytes(cache_config, self.device)
        # every rank holds the same blocks (of its own heads): the fewest any can
        self.num_blocks = group.min_int(max(1, budget // bytes_per_block))
        self.kv_cache_bytes = self.num_blocks * bytes_per_block
        check_kv_cache_fits(self.kv_cache_bytes, self.device)
        self.kv_caches = loaded.kv_caches(
            self.num_blocks + self.backend.extra_blocks, self.block_size, self.device
        )
        if group.size == 1:
            self.backend.ready(self.model, self.kv_caches, graph_settings(
                model_config, self.num_blocks, self.block_size, self.backend.extra_blocks
            ))  # fmt: skip
        self.draft = None
        if draft is not None:
            self.draft = DraftRunner(
                draft.model, draft.backend,
                draft.kv_caches(self.num_blocks, self.block_size, self.device),
                self.block_size, self.device, self.model.config.vocab_size,
            )  # fmt: skip
            assert draft_source is not None
            logger.info(
                "draft model %s: %.1fM parameters, weights %s",
                draft_source.name, draft.num_parameters / 1e6,
                draft.quantization or "unquantized",
            )  # fmt: skip
        cfg = self.model.config
        sampler = Sampler(cfg.vocab_size, self.device, model_config.seed, grammars)
        self.runner = ModelRunner(
            self.model, self.backend, self.kv_caches, sampler, self.block_size, self.device,
            group, pipeline,
        )  # fmt: skip
        logger.info("backend: %s, kernels: %s", self.backend.name, self.backend.description)

    @property
    def num_parameters(self) -> int:
        """The checkpoint's parameter count, whatever format the weights are packed in."""
        return parameter_count(self.model)

    def execute(self, scheduled: list[ScheduledSequence]) -> ModelOutput:
        output = self.runner.execute(scheduled)
        if self.draft is not None:
            output.draft_token_ids = self.draft.propose(scheduled, output.sampled_token_ids)
        return output

    def forget(self, request_id: str) -> None:
        """Drop what the sampler (and a draft model) keeps for a request that ended."""
        self.runner.forget(request_id)
        if self.draft is not None:
            self.draft.forget(request_id)


@dataclass(slots=True)
class LoadedModel:
    """A model's weights on the device, in its backend's format, before its KV cache."""

    model: CausalLM
    quantization: Quantization | None
    backend: Backend
    kv_cache_dtype: torch.dtype
    num_layers: int  # this stage's
    kv_heads: int  # this rank's

    @property
    def num_parameters(self) -> int:
        return parameter_count(self.model)

    def bytes_per_block(self, block_size: int) -> int:
        """The K and V of one block of `block_size` tokens, over every layer."""
        head_dim = self.model.config.head_dim
        itemsize = self.kv_cache_dtype.itemsize
        return 2 * self.num_layers * block_size * self.kv_heads * head_dim * itemsize

    def kv_caches(self, num_blocks: int, block_size: int, device: torch.device) -> list[KVCache]:
        """Each layer's (K, V) cache: [num_blocks * block_size, kv_heads, head_dim]."""
        shape = (num_blocks * block_size, self.kv_heads, self.model.config.head_dim)
        return [
            (
                zeros(shape, self.kv_cache_dtype, device),
                zeros(shape, self.kv_cache_dtype, device),
            )
            for _ in range(self.num_layers)
        ]


def graph_settings(
    config: ModelConfig, num_blocks: int, block_size: int, scratch_blocks: int = 1
) -> GraphSettings:
    """What the backend may capture: config.cuda_graph_sizes (resolved by the engine; a
    worker made without one takes the scheduler's default batch), none with enforce_eager;
    scratch blocks from the pool's end."""
    batch = SchedulerConfig().max_num_seqs
    sizes = () if config.enforce_eager else tuple(capture_sizes(config.cuda_graph_sizes, batch))
    max_blocks = min(-(-config.max_seq_len_to_capture // block_size), num_blocks)
    return GraphSettings(sizes, max(1, max_blocks), num_blocks, block_size, scratch_blocks)


def load_on_device(
    model_config: ModelConfig,
    cache_config: CacheConfig,
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str | None,
    tp: ParallelGroup = SINGLE,
    layers: range | None = None,
) -> LoadedModel:
    """Load a checkpoint's weights (this rank's shard, this stage's `layers`) and put them in
    the format of the backend chosen for the device."""
    resolved = formats.resolve_quantization(
        quantization, model_config.dtype, device, source.file_format
    )
    if model_config.backend == "torch" and resolved is not None:
        if quantization is not None:
            raise ModelLoadError(
                f"quantization {resolved!r} runs on the cpu backend; the torch "
                "backend runs the checkpoint's own weights (quantization none)"
            )
        resolved = None  # the reference: exact weights
    if resolved is not None:
        formats.check_quantization(resolved, device, dtype)
    started = time.perf_counter()
    with parallel.building_for(tp):
        model: CausalLM = build_model(model_class(source.hf_config), source, layers)
    cfg = model.config
    stack = model.get_submodule("model.layers")
    assert isinstance(stack, torch.nn.ModuleList)
    kv_heads = head_shards(cfg.num_heads, cfg.num_kv_heads, tp.rank, tp.size)[1][1]
    kv_cache_dtype = formats.resolve_kv_cache_dtype(
        cache_config.kv_cache_dtype, dtype, device, resolved, cfg.head_dim
    )
    backend = select_backend(model_config.backend, device, dtype, kv_cache_dtype, cfg.head_dim)
    backend.check(resolved)
    kept = backend.keep_blocks(model, resolved, source.read_blocks)
    fill_model(
        model, source, device, dtype, model_config.max_model_len, layers, kept,
        lambda path: backend.pack_loaded(model, resolved, path),
    )  # fmt: skip
    backend.prepare(model, resolved)
    logger.debug("%s loaded in %.1f s", source.name, time.perf_counter() - started)
    return LoadedModel(model, resolved, backend, kv_cache_dtype, len(stack), kv_heads)


def parameter_count(model: CausalLM) -> int:
    """A checkpoint's parameter count, whatever format the weights are packed in."""
    count = sum(p.numel() for p in model.parameters())
    tied = model.config.tie_word_embeddings
    for path, module in model.named_modules():
        if path == "lm_head" and tied:
            continue  # the embedding, counted already
        if isinstance(module, PackedLinear | GGUFLinear | TransposedHead):
            count += module.in_features * module.out_features
        elif isinstance(module, GGUFEmbedding):
            count += module.num_embeddings * module.embedding_dim
    return count
