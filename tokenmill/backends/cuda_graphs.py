"""Decode steps replayed as CUDA graphs: one captured at load for each batch size of
--cuda-graph-sizes. A step whose chunks are all single tokens (plain decodes, speculative
verify rows) pads to the smallest captured size that holds it and replays that graph: one
launch for the whole forward where eager mode launches hundreds of kernels, each costing
the host more than the GPU spends on it at small batches.

A graph reads the step from buffers that never move: the token ids, positions, cache
slots and chunks ([6, S] int64, S the largest size) and the block tables ([S, W] int64,
W blocks from --max-seq-len-to-capture; a step with longer sequences runs eagerly). A step
fills them with one host-to-device copy and three on the device, then replays. Padding
rows decode at position 0 of a scratch KV block past the pool's (Backend.extra_blocks):
no request owns it, so what they write there is never read.

Without a GPU (the tests: Triton's interpreter on CPU tensors) the same function runs from
the same buffers without being captured: everything but the capture itself is checked
there. On a GPU each capture is checked once against the same step run eagerly; a graph
that fails to capture, or disagrees, leaves every step eager (one warning).
"""

from __future__ import annotations

import logging
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenmill.backends.base import GraphSettings
from tokenmill.backends.cuda_attention import Launch, TritonAttention, TritonAttentionMetadata
from tokenmill.kernels import triton_attention
from tokenmill.layers.attention import StepLayout
from tokenmill.layers.ops import ForwardContext, KVCache, TorchOps
from tokenmill.model.interface import CausalLM

logger = logging.getLogger(__name__)

_IDS, _POSITIONS, _SLOTS = 0, 1, 2  # rows of DecodeGraphs.inputs; 3-5: the chunks


@dataclass(slots=True)
class CapturedMetadata(TritonAttentionMetadata):
    """A captured step's attention metadata: its tables and chunks the graphs' buffers, its
    launches fixed at capture (decodes split for keys as long as the tables allow)."""

    max_blocks: int = 0  # the tables' width
    decode_tiles: torch.Tensor | None = None  # [2, size]: chunk i from its first token

    def longest_decode(self) -> int:
        return self.max_blocks * self.layout.block_size

    def _build(self, group: int) -> list[Launch]:
        assert self.decode_tiles is not None
        return [Launch(self.decode_tiles, triton_attention.rows_per_program(1, group), True)]


class _Eager:
    """Stands in for a CUDA graph off a GPU: replaying runs the captured function again."""

    def __init__(self, forward: Callable[[], torch.Tensor]):
        self.forward = forward

    def replay(self) -> torch.Tensor:
        return self.forward()


class _Captured:
    def __init__(self, graph: torch.cuda.CUDAGraph, output: torch.Tensor):
        self.graph, self.output = graph, output

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class DecodeGraphs:
    """The captured decode steps of one model on its KV caches."""

    def __init__(
        self,
        model: CausalLM,
        ops: TorchOps,
        attention: TritonAttention,
        kv_caches: list[KVCache],
        settings: GraphSettings,
        device: torch.device,
    ):
        self.model, self.ops, self.attention, self.kv_caches = model, ops, attention, kv_caches
        self.settings = settings
        self.sizes = sorted(settings.sizes)
        self.device = device
        largest, width = self.sizes[-1], settings.max_blocks
        self.inputs = torch.zeros(6, largest, dtype=torch.long, device=device)
        self.tables = torch.zeros(largest, width, dtype=torch.long, device=device)
        self._pad_everything()
        self.graphs: dict[int, _Eager | _Captured] = {}
        self.failed: str | None = None  # why steps run eagerly after all

    def capture(self) -> None:
        """Every size, largest first (smaller graphs reuse its memory pool). On a GPU each
        is run once first (compiling its kernels), and the smallest and the largest the
        scratch blocks hold are checked against eager runs."""
        started = time.perf_counter()
        on_gpu = self.device.type == "cuda"
        pool = None
        try:
            for size in reversed(self.sizes):
                forward = self._forward(size)
                if not on_gpu:
                    self.graphs[size] = _Eager(forward)
                    continue
                side = torch.cuda.Stream(self.device)  # (as torch's docs warm up)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    forward()  # compiles; builds the launches the capture reuses
                torch.cuda.current_stream(self.device).wait_stream(side)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    output = forward()
                pool = graph.pool()
                self.graphs[size] = _Captured(graph, output)
            if on_gpu:
                self._check()
        except Exception as error:  # noqa: BLE001 - capture was never run on this GPU before
            if not on_gpu:
                raise  # what the tests check: never hide it
            self._give_up(f"{type(error).__name__}: {error}")
            return
        if self.failed is None and on_gpu:
            logger.info(
                "CUDA graphs: decode steps of %s sequences captured in %.1f s",
                _sizes_text(self.sizes), time.perf_counter() - started,
            )  # fmt: skip

    def size_for(
        self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> int:
        """The captured size that runs this step, or 0 (run it eagerly)."""
        meta = ctx.meta
        if (
            self.failed is not None
            or not self.graphs
            or positions.dim() != 1
            or ctx.kv_caches is not self.kv_caches
            or type(meta) is not TritonAttentionMetadata
        ):
            return 0
        chunks = meta.layout.chunks
        n = len(chunks)
        if n != input_ids.shape[0] or n > self.sizes[-1]:  # (n rows: each chunk one token)
            return 0
        if max(len(c.block_table) for c in chunks) > self.settings.max_blocks:
            return 0
        return next(size for size in self.sizes if size >= n)

    def run(self, size: int, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The step's hidden states [n, C], from the graph of `size` rows."""
        assert isinstance(ctx.meta, TritonAttentionMetadata)
        chunks = ctx.meta.layout.chunks
        n, bs = len(chunks), self.settings.block_size
        width = max(len(c.block_table) for c in chunks)
        pad = size - n
        scratch = self.settings.scratch_block
        starts = [c.start for c in chunks]
        tables = [c.block_table for c in chunks]
        # int64 bytes: positions, slots, chunk rows, lengths, starts ([5, size]); tables
        data = array("q", starts)
        data.frombytes(bytes(8 * pad))  # (padding: position 0 ...)
        data.extend([t[p // bs] * bs + p % bs for t, p in zip(tables, starts, strict=True)])
        data.extend([scratch * bs] * pad)  # (... of the scratch block)
        data.extend(range(size))
        data.extend([1] * size)
        data.extend(starts)
        data.frombytes(bytes(8 * pad))
        at = len(data)
        data.frombytes(bytes(8 * size * width))
        for table in tables:
            data[at : at + len(table)] = table
            at += width
        for _ in range(pad):
            data[at] = scratch
            at += width
        flat = torch.frombuffer(data, dtype=torch.long).to(self.device)
        self.inputs[_POSITIONS:, :size].copy_(flat[: 5 * size].view(5, size))
        self.tables[:size, :width].copy_(flat[5 * size :].view(size, width))
        self.inputs[_IDS, :n].copy_(input_ids)
        return self.graphs[size].replay()[:n]

    def _forward(self, size: int) -> Callable[[], torch.Tensor]:
        """The model's forward over the buffers' first `size` rows."""
        ids = self.inputs[_IDS, :size]
        positions, slots = self.inputs[_POSITIONS, :size], self.inputs[_SLOTS, :size]
        bs = self.settings.block_size
        layout = StepLayout([], size, positions, slots, bs)
        tiles = torch.zeros(2, size, dtype=torch.long, device=self.device)
        tiles[0] = torch.arange(size, device=self.device)
        meta = CapturedMetadata(
            slots, size, layout, tables=self.tables, chunks=self.inputs[3:],
            max_blocks=self.settings.max_blocks, decode_tiles=tiles,
        )  # fmt: skip
        ctx = ForwardContext(self.ops, self.attention, meta, self.kv_caches)
        model = self.model
        return lambda: model(ids, positions, ctx)

    def _pad_everything(self, distinct: int = 0) -> None:
        """Every row a padding row (position 0 of the scratch block); the first `distinct`
        rows at positions 0, 1, ... of the scratch blocks, with token ids 1, 2, ... (a step
        whose rows read each other's keys, for checks)."""
        scratch, bs = self.settings.scratch_block, self.settings.block_size
        rows = torch.arange(self.inputs.shape[1], device=self.device)
        at = torch.where(rows < distinct, rows, 0)
        self.inputs[_IDS] = torch.where(rows < distinct, rows + 1, 0)
        self.inputs[_POSITIONS] = at
        self.inputs[_SLOTS] = scratch * bs + at
        self.inputs[3] = rows
        self.inputs[4] = 1
        self.inputs[5] = at
        blocks = self._checked_blocks()
        self.tables[:, :blocks] = torch.arange(scratch, scratch + blocks, device=self.device)

    def _checked_blocks(self) -> int:
        """Scratch blocks a check's rows spread over (the tables' width allowing)."""
        return min(self.settings.scratch_blocks, self.settings.max_blocks)

    def _check(self) -> None:
        """Replays against eager runs of the same steps, on rows that read each other's keys
        in the scratch blocks: the smallest size, and the largest they hold."""
        fitting = [s for s in self.sizes if s <= self._checked_blocks() * self.settings.block_size]
        for size in {fitting[0], fitting[-1]} if fitting else set():
            self._pad_everything(distinct=size)
            want = self._forward(size)().float()
            got = self.graphs[size].replay().float()
            if not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
                difference = (got - want).abs().max().item()
                self._give_up(f"the graph of {size} rows differs from eager by {difference:.3g}")
                return
        self._pad_everything()

    def _give_up(self, why: str) -> None:
        self.failed = why
        self.graphs.clear()
        logger.warning("CUDA graphs failed (%s); decode steps run eagerly", why)


def _sizes_text(sizes: list[int]) -> str:
    return f"{sizes[0]}-{sizes[-1]} ({len(sizes)} sizes)" if len(sizes) > 2 else str(sizes)
