"""Paged attention for the CUDA backend: the Triton kernel (kernels/triton_attention.py)
where it runs, the torch reference where not.

`TritonAttention` reads each query's keys and values through its block table in the
kernel where the reference gathers them into padded copies first. It takes the cases the
kernel is written for (KV blocks of a power of two from 16 tokens, heads up to 256 wide; a
cache of any float type, fp8 included) and hands the rest to the reference. A kernel that
fails to compile on a GPU it was never run on logs why, once, and the reference takes over
for good: the server keeps serving.
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from tokenmill.kernels import triton_attention
from tokenmill.layers.attention import (
    AttentionMetadata,
    KVCache,
    StepLayout,
    TorchAttention,
    TorchAttentionMetadata,
    write_cache,
)

logger = logging.getLogger(__name__)

# what the kernel reads (converting to the queries' dtype as it loads)
_CACHE_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float8_e5m2,
    torch.float8_e4m3fn,
)


_MIN_BLOCKS_PER_SPLIT = 4  # KV blocks a decode's program reads at least, when split
_MAX_SPLITS = 16


@dataclass(slots=True)
class Launch:
    tiles: torch.Tensor  # [2, P] int64: each tile's chunk, and its first token in the chunk
    block_m: int  # rows a program: (token, query head) pairs
    decodes: bool  # the single-token chunks' launch (the one whose keys may split)
    splits: int = 1  # programs sharing each tile's keys (flash decoding)


@dataclass(slots=True)
class TritonAttentionMetadata(TorchAttentionMetadata):
    """The step's chunks as the kernel reads them, built on first use; the reference's own
    metadata (inherited) for the cases the kernel leaves to it."""

    tables: torch.Tensor | None = None  # [C, W] int64: each chunk's block table, padded
    chunks: torch.Tensor | None = None  # [3, C] int64: first rows, new tokens, first positions
    tiled: dict[int, list[Launch]] = field(default_factory=dict)  # by group, unsplit
    # by (query heads per KV head, KV heads, window)
    launches: dict[tuple[int, int, int | None], list[Launch]] = field(default_factory=dict)

    def launches_for(
        self, group: int, kv_heads: int, window: int | None, min_programs: int
    ) -> list[Launch]:
        """The kernel launches for heads in groups of `group` over `kv_heads` KV heads, keys
        in `window`; decodes split their keys over more programs while fewer than
        `min_programs` run."""
        key = (group, kv_heads, window)
        launches = self.launches.get(key)
        if launches is None:
            tiled = self.tiled.get(group)
            if tiled is None:
                tiled = self.tiled[group] = self._build(group)
            launches = [self._split(t, kv_heads, window, min_programs) for t in tiled]
            self.launches[key] = launches
        return launches

    def _split(
        self, launch: Launch, kv_heads: int, window: int | None, min_programs: int
    ) -> Launch:
        """The decodes' launch with its keys shared out as `min_programs` asks; the others
        as they are."""
        if not launch.decodes:
            return launch
        bs = self.layout.block_size
        blocks = -(-self.longest_decode() // bs)  # of keys a decode reads, at most
        if window is not None:
            blocks = min(blocks, -(-window // bs) + 1)
        splits = _splits(launch.tiles.shape[1] * kv_heads, min_programs, blocks)
        return replace(launch, splits=splits)

    def longest_decode(self) -> int:
        """Keys the longest single-token chunk reads (its position + 1)."""
        return max(c.start for c in self.layout.chunks if c.num_tokens == 1) + 1

    def _build(self, group: int) -> list[Launch]:
        """One launch for the single-token chunks (decodes), one for the longer ones, each
        with the fewest rows a program that fits them; with the tables and chunks (the first
        time) in one host-to-device copy."""
        chunks = self.layout.chunks
        width = max((len(c.block_table) for c in chunks), default=0) or 1
        with_tables = self.tables is None
        # each part starts 16 bytes in (an even count of int64s before it): Triton compiles
        # a kernel per pointer alignment, so a part that moved by 8 would compile another
        table_size = len(chunks) * width
        table_size += table_size % 2
        chunks_size = 3 * len(chunks) + len(chunks) % 2
        # (int64 bytes throughout: tensors from lists cost ~10x more)
        data = array("q", bytes(8 * (table_size + chunks_size) if with_tables else 0))
        num_tokens = [c.num_tokens for c in chunks]
        if with_tables:
            at = 0
            for chunk in chunks:  # the tables, zero-padded
                table = chunk.block_table
                data[at : at + len(table)] = table
                at += width
            at = table_size
            for column in ([c.row for c in chunks], num_tokens, [c.start for c in chunks]):
                data[at : at + len(chunks)] = array("q", column)
                at += len(chunks)
        singles: Sequence[int]
        longer: list[int]
        if len(chunks) == sum(num_tokens):  # decodes only: a tile each
            singles, longer = range(len(chunks)), []
        else:
            singles = [i for i, n in enumerate(num_tokens) if n == 1]
            longer = [i for i, n in enumerate(num_tokens) if n > 1]
        plans: list[tuple[int, int, bool]] = []  # (tiles, block_m, decodes)
        if singles:
            data.extend(singles)
            data += array("q", bytes(8 * len(singles)))  # each from its first token
            plans.append((len(singles), triton_attention.rows_per_program(1, group), True))
        if longer:
            block_m = triton_attention.rows_per_program(
                max(chunks[i].num_tokens for i in longer), group
            )
            per_tile = block_m // group
            tiles = [(i, first) for i in longer for first in range(0, num_tokens[i], per_tile)]
            data.extend([i for i, _ in tiles])
            data.extend([first for _, first in tiles])
            plans.append((len(tiles), block_m, False))
        flat = torch.frombuffer(data, dtype=torch.int64).to(self.slot_mapping.device)
        at = 0
        if with_tables:
            self.tables = flat[: len(chunks) * width].view(len(chunks), width)
            self.chunks = flat[table_size : table_size + 3 * len(chunks)].view(3, len(chunks))
            at = table_size + chunks_size
        launches = []
        for count, block_m, decodes in plans:
            launches.append(Launch(flat[at : at + 2 * count].view(2, count), block_m, decodes))
            at += 2 * count
        return launches


def _splits(programs: int, min_programs: int, blocks: int) -> int:
    """Splits for decodes that run `programs` programs over up to `blocks` KV blocks each
    (each tile's own blocks are shared out evenly, in the kernel): enough to reach
    min_programs, none shorter than _MIN_BLOCKS_PER_SPLIT for the longest, a power of two
    (each count is a kernel compiled on first use)."""
    if programs >= min_programs or blocks < 2 * _MIN_BLOCKS_PER_SPLIT:
        return 1
    splits = min(-(-min_programs // programs), blocks // _MIN_BLOCKS_PER_SPLIT, _MAX_SPLITS)
    return 1 << (splits.bit_length() - 1)


class TritonAttention:
    """Paged attention in one Triton kernel (kernels/triton_attention.py); the reference for
    what the kernel does not take."""

    name = "triton"

    def __init__(self, min_programs: int | None = None) -> None:
        self.reference = TorchAttention()
        self.failed: str | None = None  # why the kernel stopped being used (a GPU compile error)
        # decodes split their keys while fewer programs than this would run; None: twice the
        # GPU's multiprocessors (none in Triton's interpreter)
        self.min_programs = min_programs

    def build_metadata(self, layout: StepLayout) -> TritonAttentionMetadata:
        return TritonAttentionMetadata(layout.slot_mapping, layout.num_decodes, layout)

    def runs(self, q: torch.Tensor, k_cache: torch.Tensor, block_size: int) -> bool:
        """Whether the kernel takes this call (else the reference does)."""
        return (
            self.failed is None
            and k_cache.dtype in _CACHE_DTYPES
            and block_size >= 16
            and block_size & (block_size - 1) == 0
            and q.shape[-1] <= triton_attention.MAX_HEAD_DIM
            and q.shape[1] % k_cache.shape[1] == 0
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        cache_written: bool = False,
        scale: float | None = None,
        softcap: float | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        assert isinstance(meta, TritonAttentionMetadata)
        k_cache, v_cache = kv_cache
        block_size = meta.layout.block_size
        if not self.runs(q, k_cache, block_size):
            return self.reference.forward(
                q, k, v, kv_cache, meta, cache_written, scale, softcap, window
            )
        if not cache_written:
            write_cache(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if self.min_programs is None:
            self.min_programs = _min_programs(q.device)
        kv_heads = k_cache.shape[1]
        launches = meta.launches_for(q.shape[1] // kv_heads, kv_heads, window, self.min_programs)
        assert meta.tables is not None and meta.chunks is not None
        try:
            for launch in launches:
                triton_attention.paged_attention(
                    q, k_cache, v_cache, out, meta.tables, meta.chunks, launch.tiles,
                    launch.block_m, block_size, q.shape[-1] ** -0.5 if scale is None else scale,
                    softcap, window, launch.splits,
                )  # fmt: skip
        except Exception as error:  # noqa: BLE001 - a kernel no GPU here has compiled yet
            self.failed = kernel_failure(error, q, "the Triton attention kernel", "SDPA")
            return self.reference.forward(q, k, v, kv_cache, meta, True, scale, softcap, window)
        return out


def kernel_failure(error: Exception, tensor: torch.Tensor, kernel: str, instead: str) -> str:
    """Why a Triton kernel stops being used, logged once: a GPU's compile error. Raises
    `error` again where hiding it would be wrong: the interpreter (CPU tensors) is what the
    tests check, and a capture that failed gives up its graphs, not the kernel."""
    if tensor.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        raise error
    why = f"{type(error).__name__}: {error}"
    logger.warning("%s failed (%s); using %s", kernel, why, instead)
    return why


def _min_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count
