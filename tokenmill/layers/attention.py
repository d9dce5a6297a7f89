"""Paged attention over the KV cache.

The runner lays out the flattened batch as [decode rows | prefill chunks].
Where the native kernel runs (CPU, float32: tokenmill/kernels/paged_attention.c), it
attends every row, decode or prefill, over the paged cache in place: a prefill row is a
query over its sequence's first position + 1 keys, computed exactly as that token's
decode would be. So a token's attention, and with the batch-invariant matmuls its logits,
never depend on how its prompt was chunked, batched or served from the prefix cache.
Elsewhere decode rows take one padded, masked SDPA call over gathered keys, and each
prefill chunk its own causal call (against the new keys directly when the chunk starts at
position 0, else against its cached keys gathered through its block table).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from tokenmill.kernels.paged_attention import paged_decode_attention


@dataclass(slots=True)
class PrefillChunk:
    q_start: int  # first row of this chunk in the flattened batch
    q_len: int  # new tokens in the chunk
    slots: torch.Tensor | None  # [ctx] cache slots of all its keys; None when the chunk starts at 0
    mask: torch.Tensor | None  # [q_len, ctx] bool, True = may attend; None when slots is None


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step layout, built once by the runner and shared by every layer."""

    slot_mapping: torch.Tensor  # [T] cache slot of each new token's K/V
    num_decodes: int  # rows [0, num_decodes) are single-token decodes
    decode_slots: torch.Tensor | None  # [Bd, L] cache slots of each decode's keys (padded)
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, L] bool, False on padding; None if no padding
    # for the native kernel, instead of decode_slots/decode_mask and prefills: every row's
    row_tables: torch.Tensor | None = None  # [T, max_blocks] int64 block table
    row_lens: torch.Tensor | None = None  # [T] int64 keys it attends (its position + 1)
    block_size: int = 0
    prefills: list[PrefillChunk] = field(default_factory=list)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [S, Hkv, D], S = num_blocks * block_size
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    cache_written: bool = False,  # k and v are in the cache already (native rope_and_cache)
) -> torch.Tensor:  # [T, H, D]
    if not cache_written:
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    if meta.row_tables is not None:
        assert meta.row_lens is not None
        return paged_decode_attention(
            q, k_cache, v_cache, meta.row_tables, meta.row_lens, meta.block_size
        )
    out = torch.empty_like(q)
    n = meta.num_decodes
    if n:
        assert meta.decode_slots is not None
        keys = _gather(k_cache, meta.decode_slots, q.dtype).transpose(1, 2)  # [Bd, Hkv, L, D]
        values = _gather(v_cache, meta.decode_slots, q.dtype).transpose(1, 2)
        attn = F.scaled_dot_product_attention(
            q[:n].unsqueeze(2), keys, values, attn_mask=meta.decode_mask, enable_gqa=True
        )  # [Bd, H, 1, D]
        out[:n] = attn.squeeze(2)
    for chunk in meta.prefills:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        query = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        if chunk.slots is None:  # as the cache holds them (rounded, if it is narrower)
            keys = k[rows].to(k_cache.dtype).to(q.dtype)
            values = v[rows].to(v_cache.dtype).to(q.dtype)
        else:
            keys = _gather(k_cache, chunk.slots, q.dtype)
            values = _gather(v_cache, chunk.slots, q.dtype)
        attn = F.scaled_dot_product_attention(
            query,
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            enable_gqa=True,
        )  # [1, H, q_len, D]
        out[rows] = attn.squeeze(0).transpose(0, 1)
    return out


def _gather(cache: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """cache [S, Hkv, D] rows at slots [...] -> [..., Hkv, D] in dtype.

    index_select on the flat slots is several times faster on CPU than advanced indexing.
    """
    rows = cache.index_select(0, slots.reshape(-1)).view(*slots.shape, *cache.shape[1:])
    return rows.to(dtype)
