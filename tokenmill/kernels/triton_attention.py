"""Paged attention as one Triton kernel: each query reads its keys and values straight from
the paged KV cache through its sequence's block table (no gather into a padded copy).

The step's tokens come as chunks (a sequence's new tokens: a decode is a chunk of one),
cut into tiles of whole tokens. A program takes one tile and one KV head: its rows are the
tile's (token, query head) pairs of that KV head's group, so a grouped-query model reads
each KV block once for the whole group, and a decode's group fills the rows a decode would
leave empty. The program walks the tile's keys one KV block at a time with an online
softmax (flash attention), causal with the chunk's offset, optionally inside a sliding
window and with soft-capped scores.

On a CUDA device the kernel is compiled. A process started with TRITON_INTERPRET=1 (set
before Triton is imported) runs it in Triton's interpreter on CPU tensors instead (numpy,
slow): that is how the test suite checks it on machines without a GPU (tests/conftest.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HEAD_DIM = 256  # wider heads need more registers than a program has


# integers that change from step to step: not specialized on (a compile for each of 1,
# multiples of 16 and the rest would stall a step the first time each occurs)
@triton.jit(do_not_specialize=["table_width", "num_chunks"])
def _paged_attention(
    q_ptr, k_ptr, v_ptr, out_ptr,
    tables_ptr,  # [C, table_width] int64: each chunk's block table
    chunks_ptr,  # [3, C] int64: first row in q, new tokens, position of the first new token
    tiles_ptr,  # [2, P] int64: chunk, first token of the tile within it
    partials_ptr,  # SPLITS > 1: [SPLITS, P, Hkv, BLOCK_M, HEAD_PAD + 2] float32, written
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh, stride_ot, stride_oh,
    table_width, num_chunks, scale, softcap, window,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # HEAD_DIM up to a power of two
    GROUP: tl.constexpr,  # query heads per KV head
    BLOCK_M: tl.constexpr,  # rows of a program: (token, head) pairs, BLOCK_M // GROUP tokens
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block
    SOFTCAP: tl.constexpr,
    WINDOW: tl.constexpr,
    PRECISION: tl.constexpr,  # of float32 dot products: "ieee" (exact) or "tf32"
    SPLITS: tl.constexpr,  # programs that share a tile's KV blocks, in runs of equal length
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    chunk = tl.load(tiles_ptr + tile)
    first_token = tl.load(tiles_ptr + tl.num_programs(0) + tile)
    q_row = tl.load(chunks_ptr + chunk)
    q_len = tl.load(chunks_ptr + num_chunks + chunk)
    start = tl.load(chunks_ptr + 2 * num_chunks + chunk)

    rows = tl.arange(0, BLOCK_M)
    token = first_token + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < (BLOCK_M // GROUP) * GROUP) & (token < q_len)
    dims = tl.arange(0, HEAD_PAD)
    dim_ok = dims < HEAD_DIM
    q_at = (q_row + token).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
    q = tl.load(q_ptr + q_at + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    q_pos = start + token

    last = tl.minimum(first_token + BLOCK_M // GROUP, q_len) - 1  # the tile's last token
    key_end = start + last + 1  # the tile sees keys [key_start, key_end)
    key_start = 0
    if WINDOW:
        key_start = tl.maximum(start + first_token - window + 1, 0)

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    offsets = tl.arange(0, BLOCK_SIZE)
    first_block = key_start // BLOCK_SIZE
    end_block = tl.cdiv(key_end, BLOCK_SIZE)
    if SPLITS > 1:  # this program's share of the tile's blocks (none, for a short tile's last)
        per_split = tl.cdiv(end_block - first_block, SPLITS)
        first_block = first_block + split * per_split
        end_block = tl.minimum(end_block, first_block + per_split)
    for block in range(first_block, end_block):
        physical = tl.load(tables_ptr + chunk * table_width + block).to(tl.int64)
        slots = physical * BLOCK_SIZE + offsets
        k_pos = block * BLOCK_SIZE + offsets
        # keys outside [key_start, key_end) may be stale or never written: not even loaded
        load_ok = ((k_pos >= key_start) & (k_pos < key_end))[:, None] & dim_ok[None, :]
        k = tl.load(k_ptr + slots[:, None] * stride_ks + kv_head * stride_kh + dims[None, :],
                    mask=load_ok, other=0.0)  # fmt: skip
        v = tl.load(v_ptr + slots[:, None] * stride_vs + kv_head * stride_vh + dims[None, :],
                    mask=load_ok, other=0.0)  # fmt: skip
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale
        if SOFTCAP:  # softcap * tanh(scores / softcap), tanh written with exp
            scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
        visible = row_ok[:, None] & (k_pos[None, :] <= q_pos[:, None])
        if WINDOW:
            visible &= k_pos[None, :] > q_pos[:, None] - window
        scores = tl.where(visible, scores, float("-inf"))
        new_best = tl.maximum(best, tl.max(scores, 1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # a row that sees nothing yet
        weights = tl.exp(scores - shift[:, None])
        rescale = tl.exp(best - shift)
        total = total * rescale + tl.sum(weights, 1)
        acc = acc * rescale[:, None] + tl.dot(
            weights.to(q.dtype), v.to(q.dtype), input_precision=PRECISION
        )
        best = new_best

    if SPLITS > 1:  # the unnormalized sums and their softmax state, for _combine_splits
        width = HEAD_PAD + 2
        at = (((split * tl.num_programs(0) + tile) * tl.num_programs(1) + kv_head) * BLOCK_M
              + rows).to(tl.int64) * width  # fmt: skip
        tl.store(partials_ptr + at[:, None] + dims[None, :], acc)
        tl.store(partials_ptr + at + HEAD_PAD, best)
        tl.store(partials_ptr + at + HEAD_PAD + 1, total)
    else:
        out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
        out_at = (q_row + token).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(out_ptr + out_at + dims[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dim_ok[None, :])  # fmt: skip


@triton.jit(do_not_specialize=["num_chunks"])
def _combine_splits(
    partials_ptr, out_ptr, chunks_ptr, tiles_ptr, stride_ot, stride_oh, num_chunks,
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    SPLITS: tl.constexpr,
):  # fmt: skip
    """Each row's output from its splits' partial sums: rescaled to the largest score."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    num_tiles = tl.num_programs(0)
    num_kv_heads = tl.num_programs(1)
    chunk = tl.load(tiles_ptr + tile)
    first_token = tl.load(tiles_ptr + num_tiles + tile)
    q_row = tl.load(chunks_ptr + chunk)
    q_len = tl.load(chunks_ptr + num_chunks + chunk)
    rows = tl.arange(0, BLOCK_M)
    token = first_token + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < (BLOCK_M // GROUP) * GROUP) & (token < q_len)
    dims = tl.arange(0, HEAD_PAD)
    width = HEAD_PAD + 2

    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for split in range(SPLITS):
        at = ((((split * num_tiles + tile) * num_kv_heads + kv_head) * BLOCK_M + rows)
              .to(tl.int64) * width)  # fmt: skip
        best = tl.maximum(best, tl.load(partials_ptr + at + HEAD_PAD))
    shift = tl.where(best == float("-inf"), 0.0, best)
    total = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    for split in range(SPLITS):
        at = ((((split * num_tiles + tile) * num_kv_heads + kv_head) * BLOCK_M + rows)
              .to(tl.int64) * width)  # fmt: skip
        weight = tl.exp(tl.load(partials_ptr + at + HEAD_PAD) - shift)
        total += weight * tl.load(partials_ptr + at + HEAD_PAD + 1)
        acc += weight[:, None] * tl.load(partials_ptr + at[:, None] + dims[None, :])
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
    out_at = (q_row + token).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
    tl.store(out_ptr + out_at + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dims < HEAD_DIM)[None, :])  # fmt: skip


def rows_per_program(num_tokens: int, group: int) -> int:
    """BLOCK_M for chunks of up to `num_tokens` tokens: their tokens' group rows, at least 16
    (the smallest tensor-core tile), at most 64 unless one token's group needs more."""
    return max(
        16, min(64, triton.next_power_of_2(num_tokens * group)), triton.next_power_of_2(group)
    )


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [S, Hkv, D], slot = block * block_size + offset
    v_cache: torch.Tensor,
    out: torch.Tensor,  # [T, H, D], written
    tables: torch.Tensor,  # [C, W] int64
    chunks: torch.Tensor,  # [3, C] int64: first rows, new tokens, first positions
    tiles: torch.Tensor,  # [2, P] int64: chunks, first tokens; a tile has BLOCK_M // group tokens
    block_m: int,
    block_size: int,
    scale: float,
    softcap: float | None,
    window: int | None,
    splits: int = 1,  # programs per tile and KV head, each over a share of its KV blocks
) -> None:
    """Attention of q's rows over their chunks' cached keys (which include the step's own).
    With splits > 1 each tile's keys are shared out (flash decoding: a few long sequences
    still fill the GPU) and a second kernel combines the partial sums."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    num_tiles = tiles.shape[1]
    if num_tiles == 0:
        return
    for x in (q, k_cache, v_cache, out):
        assert x.stride(-1) == 1, "the head dimension must be contiguous"
    head_pad = max(16, triton.next_power_of_2(head_dim))
    group = num_heads // num_kv_heads
    partials = out  # unused without splits
    if splits > 1:
        partials = torch.empty(
            splits * num_tiles * num_kv_heads * block_m * (head_pad + 2),
            dtype=torch.float32, device=q.device,
        )  # fmt: skip
    # big tiles (wide heads, many rows or keys a block) take more threads: fewer registers
    # each, where four warps would spill
    num_warps = 8 if head_pad * max(block_m, block_size) >= 8192 else 4
    _paged_attention[(num_tiles, num_kv_heads, splits)](
        q, k_cache, v_cache, out, tables, chunks, tiles, partials,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), out.stride(0), out.stride(1),
        tables.shape[1], chunks.shape[1], scale, softcap or 0.0, window or 0,
        HEAD_DIM=head_dim, HEAD_PAD=head_pad, GROUP=group, BLOCK_M=block_m,
        BLOCK_SIZE=block_size, SOFTCAP=softcap is not None, WINDOW=window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", SPLITS=splits,
        num_warps=num_warps,
    )  # fmt: skip
    if splits > 1:
        _combine_splits[(num_tiles, num_kv_heads)](
            partials, out, chunks, tiles, out.stride(0), out.stride(1), chunks.shape[1],
            HEAD_DIM=head_dim, HEAD_PAD=head_pad, GROUP=group, BLOCK_M=block_m, SPLITS=splits,
        )  # fmt: skip
