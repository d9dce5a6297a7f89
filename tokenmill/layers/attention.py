"""Attention over the paged KV cache: the backend interface and the torch reference.

The runner lays out a step's tokens as [decode rows | prefill chunks] (a `StepLayout`);
the attention backend chosen at load turns that into its own metadata once per step,
and every layer's attention reads it. The reference (`TorchAttention`, any device):
decode rows take one padded, masked SDPA call over their gathered keys, and each prefill
chunk its own causal call (against the new keys directly when the chunk starts at
position 0, else against its cached keys gathered through its block table).

A sliding-window layer (`window` w) lets a query at position p see keys (p - w, p] only;
its keys are gathered from the window's first block on, so blocks behind it (freed by the
KV cache manager where every layer slides) are never read.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

KVCache = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each [S, Hkv, D]


@dataclass(slots=True)
class ScheduledChunk:
    """One sequence's new tokens in the step: rows [row, row + num_tokens) of the batch,
    its positions [start, start + num_tokens)."""

    row: int
    start: int
    num_tokens: int
    block_table: array[int]  # int64

    @property
    def is_decode(self) -> bool:
        return self.num_tokens == 1 and self.start > 0


@dataclass(slots=True)
class StepLayout:
    """A step's tokens as the runner flattened them: decode chunks first."""

    chunks: list[ScheduledChunk]
    num_decodes: int  # chunks [0, num_decodes) are single-token decodes
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64, the cache slot of each new token's K/V
    block_size: int


@dataclass(slots=True)
class AttentionMetadata:
    """What every attention backend's metadata has; backends add their own fields."""

    slot_mapping: torch.Tensor  # [T]
    num_decodes: int  # rows [0, num_decodes) are single-token decodes


class AttentionBackend(Protocol):
    name: str

    def build_metadata(self, layout: StepLayout) -> AttentionMetadata: ...

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,  # [T, Hkv, D]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        cache_written: bool = False,  # k and v are in the cache already (ops.rope_and_cache)
        scale: float | None = None,  # of q.k; None = D ** -0.5
        softcap: float | None = None,  # scores -> tanh(scores / softcap) * softcap
        window: int | None = None,  # keys (p - window, p] for a query at p; None: all
    ) -> torch.Tensor: ...  # [T, H, D]


@dataclass(slots=True)
class PrefillChunk:
    q_start: int  # first row of this chunk in the flattened batch
    q_len: int  # new tokens in the chunk
    # [keys] cache slots of the keys its queries see; None: the chunk starts at 0 (its own)
    slots: torch.Tensor | None
    mask: torch.Tensor | None  # [q_len, keys] bool, True = may attend; None: plain causal


@dataclass(slots=True)
class StepKeys:
    """Which cached keys each query of a step reads, for one window."""

    decode_slots: torch.Tensor | None  # [Bd, L] cache slots of each decode's keys
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, L] bool, False on padding; None: none
    prefills: list[PrefillChunk]


@dataclass(slots=True)
class TorchAttentionMetadata(AttentionMetadata):
    layout: StepLayout
    keys: dict[int | None, StepKeys] = field(default_factory=dict)  # by window, built once

    def keys_for(self, window: int | None) -> StepKeys:
        keys = self.keys.get(window)
        if keys is None:
            keys = self.keys[window] = _step_keys(self.layout, window)
        return keys


class TorchAttention:
    """SDPA over keys gathered from the paged cache (the reference; any device)."""

    name = "torch"

    def build_metadata(self, layout: StepLayout) -> TorchAttentionMetadata:
        return TorchAttentionMetadata(layout.slot_mapping, layout.num_decodes, layout)

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
        assert isinstance(meta, TorchAttentionMetadata)
        k_cache, v_cache = kv_cache
        if not cache_written:
            write_cache(k, v, kv_cache, meta.slot_mapping)
        step = meta.keys_for(window)
        out = torch.empty_like(q)
        n = meta.num_decodes
        if n:
            assert step.decode_slots is not None
            keys = _gather(k_cache, step.decode_slots, q.dtype).transpose(1, 2)  # [Bd, Hkv, L, D]
            values = _gather(v_cache, step.decode_slots, q.dtype).transpose(1, 2)
            attn = _attend(
                q[:n].unsqueeze(2), keys, values, step.decode_mask, False, scale, softcap
            )  # [Bd, H, 1, D]
            out[:n] = attn.squeeze(2)
        for chunk in step.prefills:
            rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
            query = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
            if chunk.slots is None:  # as the cache holds them (rounded, if it is narrower)
                keys = cache_values(k[rows], k_cache.dtype).to(q.dtype)
                values = cache_values(v[rows], v_cache.dtype).to(q.dtype)
            else:
                keys = _gather(k_cache, chunk.slots, q.dtype)
                values = _gather(v_cache, chunk.slots, q.dtype)
            attn = _attend(
                query,
                keys.transpose(0, 1).unsqueeze(0),
                values.transpose(0, 1).unsqueeze(0),
                chunk.mask,
                chunk.mask is None,
                scale,
                softcap,
            )  # [1, H, q_len, D]
            out[rows] = attn.squeeze(0).transpose(0, 1)
        return out


def _attend(
    query: torch.Tensor,  # [B, H, L, D]
    keys: torch.Tensor,  # [B, Hkv, S, D]
    values: torch.Tensor,
    mask: torch.Tensor | None,  # bool, True = may attend, broadcast to [B, H, L, S]
    is_causal: bool,
    scale: float | None,
    softcap: float | None,
) -> torch.Tensor:  # [B, H, L, D]
    """SDPA; with soft-capped scores (which SDPA lacks) the same math written out."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=is_causal, enable_gqa=True, scale=scale
        )
    group = query.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = query @ keys.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap
    if is_causal:
        length, span = scores.shape[-2:]
        mask = torch.ones(length, span, dtype=torch.bool, device=scores.device).tril(span - length)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(values.dtype) @ values


def cache_values(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a cache of `dtype` holds it: an fp8 cache (e5m2, e4m3) rounds through float16,
    as the native kernels' writes do (kv_format.h)."""
    if dtype in (torch.float8_e5m2, torch.float8_e4m3fn):
        return x.to(torch.float16).to(dtype)
    return x.to(dtype)


def write_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slots: torch.Tensor) -> None:
    """Store the step's keys and values [T, Hkv, D] at their cache slots [T]."""
    for cache, x in zip(kv_cache, (k, v), strict=True):
        x = cache_values(x, cache.dtype)
        if cache.element_size() == 1:  # torch has no index_copy_ of fp8 on CPU: copy bytes
            cache, x = cache.view(torch.uint8), x.view(torch.uint8)
        cache.index_copy_(0, slots, x)


def _step_keys(layout: StepLayout, window: int | None) -> StepKeys:
    device, bs = layout.slot_mapping.device, layout.block_size
    decodes = layout.chunks[: layout.num_decodes]
    slots, mask = _decode_layout(decodes, bs, device, window)
    prefills = [_prefill_chunk(c, bs, device, window) for c in layout.chunks[layout.num_decodes :]]
    return StepKeys(slots, mask, prefills)


def _first_key(position: int, window: int | None) -> int:
    """The first key a query at `position` sees."""
    return 0 if window is None else max(0, position - window + 1)


def _prefill_chunk(
    chunk: ScheduledChunk, bs: int, device: torch.device, window: int | None
) -> PrefillChunk:
    row, start, n = chunk.row, chunk.start, chunk.num_tokens
    first = _first_key(start, window)
    if start == 0 and (window is None or n <= window):
        return PrefillChunk(row, n, None, None)  # plain causal over the chunk's own keys
    key_pos = torch.arange(first, start + n)
    query_pos = torch.arange(start, start + n)[:, None]
    mask = key_pos[None, :] <= query_pos  # [n, keys] causal with offset
    if window is not None:
        mask &= key_pos[None, :] > query_pos - window
    if start == 0:
        return PrefillChunk(row, n, None, mask.to(device))  # its own keys, windowed
    table = torch.tensor(chunk.block_table, dtype=torch.long)
    slots = table[key_pos // bs] * bs + key_pos % bs
    return PrefillChunk(row, n, slots.to(device), mask.to(device))


def _decode_layout(
    decodes: list[ScheduledChunk], bs: int, device: torch.device, window: int | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Padded cache slots [Bd, L] of every decode's keys and the mask of real ones."""
    if not decodes:
        return None, None
    first = torch.tensor([_first_key(c.start, window) for c in decodes])
    last = torch.tensor([c.start for c in decodes])
    lengths = last - first + 1
    max_len = int(lengths.max())
    width = max(len(c.block_table) for c in decodes)
    tables = torch.zeros(len(decodes), width, dtype=torch.long)
    for i, chunk in enumerate(decodes):
        tables[i, : len(chunk.block_table)] = torch.tensor(chunk.block_table, dtype=torch.long)
    # key positions [Bd, L] from each row's first key; padding repeats its last key
    key_pos = torch.minimum(first[:, None] + torch.arange(max_len), last[:, None])
    slots = tables.gather(1, key_pos // bs) * bs + key_pos % bs
    if bool((lengths == max_len).all()):
        return slots.to(device), None  # no padding (always so for one request): no mask
    mask = torch.arange(max_len)[None, :] < lengths[:, None]
    return slots.to(device), mask[:, None, None, :].to(device)


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache [S, Hkv, D] rows at slots [...] -> [..., Hkv, D] in dtype (index_select on the
    flat slots: far faster on CPU than advanced indexing; an fp8 cache's rows as bytes,
    which every device's index_select takes)."""
    flat = slots.reshape(-1)
    if cache.element_size() == 1:
        rows = cache.view(torch.uint8).index_select(0, flat).view(cache.dtype)
    else:
        rows = cache.index_select(0, flat)
    return rows.view(*slots.shape, *cache.shape[1:]).to(dtype)
