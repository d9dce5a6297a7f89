"""A layer's element-wise work as Triton kernels, one launch where torch takes several:
the residual add with RMSNorm, SiLU times up, and rotary embedding with the KV cache write.
On a GPU with CUDA graphs a small model's decode step is a chain of short kernels, so the
count of them, not the bytes, sets its time.

Each kernel rounds where the torch reference (layers/ops.py's TorchOps) rounds: every
element-wise op of the model's dtype computed in float32 and rounded to that dtype (no
product fused into a sum where the reference rounds between them), the norm's statistics
in float32. Run by Triton's interpreter on CPU tensors in the tests
(TRITON_INTERPRET=1, tests/conftest.py), like kernels/triton_attention.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm(
    x_ptr, residual_ptr, weight_ptr, out_ptr, size, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """A row: s = x + residual (written over residual), out = weight * RMSNorm(s)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < size
    x = tl.load(x_ptr + row * size + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        total = x.to(tl.float32) + tl.load(residual_ptr + row * size + cols, mask=ok, other=0.0)
        x = total.to(x_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * size + cols, x, mask=ok)
    s = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(s * s, 0) / size + eps)
    normed = (s * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * size + cols, (weight * normed).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(
    x: torch.Tensor,  # [T, C]
    residual: torch.Tensor | None,  # [T, C], the sum written over it
    weight: torch.Tensor,  # [C]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed [T, C], the sum)
    x = x.contiguous()
    if residual is not None:
        assert residual.is_contiguous() and residual.dtype == x.dtype
    rows, size = x.shape
    out = torch.empty(rows, size, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows:
        block = triton.next_power_of_2(size)
        _add_rms_norm[(rows,)](
            x, x if residual is None else residual, weight, out, size, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(max(block // 256, 1), 8),  # (a wide row: more threads, fewer registers)
        )  # fmt: skip
    return out, x if residual is None else residual


@triton.jit
def _silu_and_mul(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr):
    """A row's silu(gate) * up, gate and up its halves."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < width
    gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=ok, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate_up_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (silu * up.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=ok)  # fmt: skip


_SILU_BLOCK = 1024


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2 I] (gate | up) -> silu(gate) * up [T, I]."""
    gate_up = gate_up.contiguous()
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, width)
    if rows:
        _silu_and_mul[(rows, triton.cdiv(width, _SILU_BLOCK))](
            gate_up, out, width, BLOCK=_SILU_BLOCK
        )
    return out


@triton.jit
def _rope_and_cache(
    qkv_ptr, table_ptr, positions_ptr, slots_ptr, q_ptr, k_ptr, k_cache_ptr, v_cache_ptr,
    stride_table, stride_kc, stride_kh, stride_vc, stride_vh,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,  # NUM_HEADS + NUM_KV_HEADS up to a power of two
    KV_PAD: tl.constexpr,  # NUM_KV_HEADS up to a power of two
    HEAD_DIM: tl.constexpr,
    HEAD_PAD: tl.constexpr,
):  # fmt: skip
    """One token: its query and key heads rotated by its position ("rotate half"), its key
    and value heads written to its slot."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_PAD)[None, :]
    dim_ok = dims < HEAD_DIM
    ok = (heads < NUM_HEADS + NUM_KV_HEADS) & dim_ok
    half: tl.constexpr = HEAD_DIM // 2
    row = qkv_ptr + token * (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    x = tl.load(row + heads * HEAD_DIM + dims, mask=ok, other=0.0)
    turned = tl.load(row + heads * HEAD_DIM + (dims + half) % HEAD_DIM, mask=ok, other=0.0)
    position = tl.load(positions_ptr + token)
    dtype = qkv_ptr.dtype.element_ty
    cos = tl.load(table_ptr + position * stride_table + dims, mask=dim_ok, other=0.0)
    sin = tl.load(table_ptr + position * stride_table + HEAD_DIM + dims, mask=dim_ok, other=0.0)
    cos = cos.to(dtype).to(tl.float32)
    sin = tl.where(dims < half, -sin, sin).to(dtype).to(tl.float32)
    a = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)
    b = (turned.to(tl.float32) * sin).to(dtype).to(tl.float32)
    rotated = (a + b).to(dtype)
    is_q = heads < NUM_HEADS
    tl.store(q_ptr + (token * NUM_HEADS + heads) * HEAD_DIM + dims, rotated, mask=ok & is_q)
    kv_head = heads - NUM_HEADS
    slot = tl.load(slots_ptr + token)
    tl.store(k_ptr + (token * NUM_KV_HEADS + kv_head) * HEAD_DIM + dims, rotated,
             mask=ok & ~is_q)  # fmt: skip
    tl.store(k_cache_ptr + slot * stride_kc + kv_head * stride_kh + dims,
             rotated.to(k_cache_ptr.dtype.element_ty), mask=ok & ~is_q)  # fmt: skip
    kv_heads = tl.arange(0, KV_PAD)[:, None]
    v_ok = (kv_heads < NUM_KV_HEADS) & dim_ok
    v = tl.load(row + (NUM_HEADS + NUM_KV_HEADS + kv_heads) * HEAD_DIM + dims, mask=v_ok,
                other=0.0)  # fmt: skip
    tl.store(v_cache_ptr + slot * stride_vc + kv_heads * stride_vh + dims,
             v.to(v_cache_ptr.dtype.element_ty), mask=v_ok)  # fmt: skip


def rope_and_cache(
    qkv: torch.Tensor,  # [T, (H + 2 Hkv) D]
    table: torch.Tensor,  # [P, 2, D] float32: cos and sin of each position
    positions: torch.Tensor,  # [T] int64, rows of the table
    slots: torch.Tensor,  # [T] int64
    k_cache: torch.Tensor,  # [S, Hkv, D], float32, float16 or bfloat16
    v_cache: torch.Tensor,
    num_heads: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # q [T, H, D], k [T, Hkv, D], rotated
    """Rotate q and k by position, write k and v into the cache slots, return q and k."""
    qkv = qkv.contiguous()
    rows = qkv.shape[0]
    num_kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2]
    assert table.is_contiguous() and table.shape[-1] == head_dim and head_dim % 2 == 0
    for cache in (k_cache, v_cache):
        assert cache.stride(-1) == 1, "the head dimension must be contiguous"
    q = qkv.new_empty(rows, num_heads, head_dim)
    k = qkv.new_empty(rows, num_kv_heads, head_dim)
    if rows:
        _rope_and_cache[(rows,)](
            qkv, table, positions, slots, q, k, k_cache, v_cache,
            table.stride(0), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0),
            v_cache.stride(1),
            NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
            HEADS_PAD=triton.next_power_of_2(num_heads + num_kv_heads),
            KV_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
            HEAD_PAD=triton.next_power_of_2(head_dim),
            enable_fp_fusion=False,  # (a product and a sum fused would skip a rounding)
        )  # fmt: skip
    return q, k
