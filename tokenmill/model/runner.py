"""ModelRunner: owns the model and the KV tensors; flattens a step's batch, runs it, samples."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from tokenmill.config import CacheConfig, ModelConfig
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import ScheduledRequest, SchedulerOutput
from tokenmill.kernels import layer_ops
from tokenmill.kernels import paged_attention as paged_attention_kernel
from tokenmill.layers.attention import AttentionMetadata, PrefillChunk
from tokenmill.layers.linear import GGUFLinear, PackedLinear
from tokenmill.model.device import (
    configure_cpu_threads,
    kv_cache_bytes,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
    resolve_quantization,
)
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.loader import ModelSource
from tokenmill.model.registry import model_class
from tokenmill.model.weights import load_model
from tokenmill.sample.logprobs import PromptChunk, record_prompt_logprobs
from tokenmill.sample.sampler import Sampler

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchInputs:
    """The flattened step: [decode rows | prefill chunks]."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [N] rows whose hidden state is turned into logits
    sampling_requests: list[Request]  # the N requests, in sample_rows order
    prompt_chunks: list[PromptChunk]  # prefill chunks of requests that want prompt logprobs


class ModelRunner:
    """Runs a SchedulerOutput through the model and returns the sampled token of each request."""

    def __init__(self, model_config: ModelConfig, cache_config: CacheConfig, source: ModelSource):
        self.device = resolve_device(model_config.device)
        self.cpu_threads = (
            configure_cpu_threads(model_config.cpu_threads) if self.device.type == "cpu" else ""
        )
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        self.block_size = cache_config.block_size
        started = time.perf_counter()
        self.quantization = resolve_quantization(
            model_config.quantization, model_config.dtype, self.device, source.file_format
        )
        self.model: LlamaForCausalLM = load_model(
            model_class(source.hf_config), source, self.device, self.dtype, self.quantization
        )
        self.load_seconds = time.perf_counter() - started
        cfg = self.model.config
        self.kv_cache_dtype = resolve_kv_cache_dtype(
            cache_config.kv_cache_dtype, self.dtype, self.device, self.quantization, cfg.head_dim
        )
        bytes_per_block = (
            2
            * cfg.num_layers
            * self.block_size
            * cfg.num_kv_heads
            * cfg.head_dim
            * self.kv_cache_dtype.itemsize
        )
        budget = kv_cache_bytes(cache_config, self.device, self.model)
        self.num_blocks = max(1, budget // bytes_per_block)
        self.kv_cache_bytes = self.num_blocks * bytes_per_block
        shape = (self.num_blocks * self.block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
                torch.zeros(shape, dtype=self.kv_cache_dtype, device=self.device),
            )
            for _ in range(cfg.num_layers)
        ]
        self.sampler = Sampler(cfg.vocab_size, self.device, model_config.seed)
        # both kernel libraries, for CPU float32; tests switch native_kernels off and on
        self._native_supported = (
            paged_attention_kernel.supports(self.kv_caches[0][0]) and layer_ops.available()
        )
        self.native_kernels = True
        logger.info(
            "kernels: %s",
            "native (element-wise ops, decode attention over the paged cache)"
            if self.native_kernels
            else "torch (no C compiler, TOKENMILL_NATIVE_KERNELS=0, or not CPU float32)",
        )

    @property
    def native_kernels(self) -> bool:
        """Whether the step uses tokenmill/kernels (CPU float32) instead of torch ops."""
        return self.model.native_kernels

    @native_kernels.setter
    def native_kernels(self, enabled: bool) -> None:
        self.model.native_kernels = enabled and self._native_supported

    @property
    def num_parameters(self) -> int:
        packed = (
            m for m in self.model.layers.modules() if isinstance(m, PackedLinear | GGUFLinear)
        )
        return sum(p.numel() for p in self.model.parameters()) + sum(
            m.in_features * m.out_features for m in packed
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, block_tables: dict[str, list[int]]) -> dict[str, int]:
        """Forward every scheduled token; sample for the requests that reached their end."""
        batch = self._prepare(out.scheduled, block_tables)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        if batch.prompt_chunks:
            vocab_size = self.sampler.vocab_size
            record_prompt_logprobs(
                self.model.compute_logits, hidden, batch.prompt_chunks, vocab_size
            )
        if not batch.sampling_requests:
            return {}
        logits = self.model.compute_logits(hidden[batch.sample_rows])
        token_ids = self.sampler(logits, batch.sampling_requests)
        return {r.request_id: t for r, t in zip(batch.sampling_requests, token_ids, strict=True)}

    @torch.inference_mode()
    def logits_for(self, out: SchedulerOutput, block_tables: dict[str, list[int]]) -> torch.Tensor:
        """The float32 logits [N, V] the sampler would see (for parity tests)."""
        batch = self._prepare(out.scheduled, block_tables)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        return self.model.compute_logits(hidden[batch.sample_rows])

    def _prepare(
        self, scheduled: list[ScheduledRequest], block_tables: dict[str, list[int]]
    ) -> BatchInputs:
        decodes = [s for s in scheduled if s.num_new_tokens == 1 and s.start > 0]
        prefills = [s for s in scheduled if not (s.num_new_tokens == 1 and s.start > 0)]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []  # the cache slot of each new token
        sample_rows: list[int] = []
        sampling: list[Request] = []
        chunks: list[PrefillChunk] = []
        prompt_chunks: list[PromptChunk] = []
        bs, native = self.block_size, self.native_kernels
        for is_prefill, item in [(False, d) for d in decodes] + [(True, p) for p in prefills]:
            request, start, n = item.request, item.start, item.num_new_tokens
            table = block_tables[request.request_id]
            row = len(ids)
            ids.extend(request.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if is_prefill and not native:
                chunks.append(self._prefill_chunk(row, start, n, table))
            if request.params.prompt_logprobs is not None:
                prompt_chunks.append(PromptChunk(request, row, start, n))
            if item.samples:
                sample_rows.append(row + n - 1)
                sampling.append(request)
        device = self.device
        position_ids = torch.tensor(positions, dtype=torch.long, device=device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decodes=len(decodes),
            decode_slots=None,
            decode_mask=None,
            prefills=chunks,
            block_size=bs,
        )
        if native:  # (native kernels run on CPU: the tensors are there)
            meta.row_tables = self._row_tables(decodes + prefills, block_tables)
            meta.row_lens = position_ids + 1  # every row attends its keys up to its own
        else:
            meta.decode_slots, meta.decode_mask = self._decode_layout(decodes, block_tables)
        return BatchInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=position_ids,
            meta=meta,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=device),
            sampling_requests=sampling,
            prompt_chunks=prompt_chunks,
        )

    def _prefill_chunk(self, row: int, start: int, n: int, table: list[int]) -> PrefillChunk:
        if start == 0:
            return PrefillChunk(row, n, None, None)
        bs = self.block_size
        blocks = torch.tensor(table, dtype=torch.long)
        ctx_slots = (blocks[:, None] * bs + torch.arange(bs)).flatten()[: start + n]
        query_pos = torch.arange(start, start + n)[:, None]
        mask = torch.arange(start + n)[None, :] <= query_pos  # [n, ctx] causal with offset
        return PrefillChunk(row, n, ctx_slots.to(self.device), mask.to(self.device))

    @staticmethod
    def _row_tables(
        items: list[ScheduledRequest], block_tables: dict[str, list[int]]
    ) -> torch.Tensor:
        """Every row's block table [T, max_blocks] (zero-padded), the items' rows in order:
        a prefill chunk's rows share their sequence's."""
        tables = [block_tables[item.request.request_id] for item in items]
        width = max(len(t) for t in tables)
        padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        counts = [item.num_new_tokens for item in items]
        if sum(counts) == len(items):  # decodes only: a row per item
            return padded
        return padded.repeat_interleave(torch.tensor(counts), dim=0)

    def _decode_layout(
        self, decodes: list[ScheduledRequest], block_tables: dict[str, list[int]]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Padded cache slots [Bd, L] of every decode's keys and the mask of real ones."""
        if not decodes:
            return None, None
        bs = self.block_size
        lengths = torch.tensor([s.start + 1 for s in decodes])
        max_blocks = -(-int(lengths.max()) // bs)
        tables = torch.zeros(len(decodes), max_blocks, dtype=torch.long)
        for i, item in enumerate(decodes):
            table = block_tables[item.request.request_id][:max_blocks]
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)
        slots = (tables[:, :, None] * bs + torch.arange(bs)).view(len(decodes), -1)
        max_len = int(lengths.max())
        slots = slots[:, :max_len].to(self.device)
        if bool((lengths == max_len).all()):
            return slots, None  # no padding (always so for one request): SDPA needs no mask
        mask = torch.arange(max_len)[None, :] < lengths[:, None]
        return slots, mask[:, None, None, :].to(self.device)
