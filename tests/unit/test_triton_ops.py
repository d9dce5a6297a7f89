"""The CUDA backend's element-wise Triton kernels (kernels/triton_ops.py), run here by
Triton's interpreter on CPU tensors, against the torch reference's ops: the residual add
with RMSNorm, SiLU times up, and rotary embedding with the KV cache write, in float32 and in
the narrower dtypes a GPU runs (where they must round as the reference rounds)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # the CUDA backend's kernels; pip installs it beside torch on Linux

from tokenmill.backends.cuda_ops import TritonOps
from tokenmill.layers.attention import write_cache
from tokenmill.layers.ops import TorchOps
from tokenmill.layers.rotary import RotaryEmbedding

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _close(got: torch.Tensor, want: torch.Tensor, rounded_by: torch.dtype | None = None) -> None:
    """float32: to rounding of the sums; float16: the same values, or one unit apart where
    a float32 statistic rounded the other way. bfloat16 (the tensor's dtype or
    `rounded_by`, a dtype it went through): a few units apart, since Triton's interpreter
    truncates float32 to bfloat16 where a GPU (and torch) round to nearest."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if rounded_by == torch.bfloat16:
        torch.testing.assert_close(got.float(), want.float(), atol=4e-2, rtol=4e-2)
    elif got.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    elif got.dtype == torch.float16:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2, rtol=1e-2)
        assert (got == want).float().mean() > 0.97
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [64, 576])  # (576: not a power of two, SmolLM2's)
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_matches_the_reference(dtype, size, with_residual):
    generator = torch.Generator().manual_seed(size)
    x = (torch.randn(7, size, generator=generator) * 3).to(dtype)
    residual = torch.randn(7, size, generator=generator).to(dtype) if with_residual else None
    weight = torch.randn(size, generator=generator).to(dtype)
    want, want_sum = TorchOps().add_rms_norm(
        x, None if residual is None else residual.clone(), weight, 1e-6
    )
    got, got_sum = TritonOps().add_rms_norm(x, residual, weight, 1e-6)
    _close(got, want)
    if dtype != torch.bfloat16:  # (one rounded add: exactly the reference's)
        assert torch.equal(got_sum, want_sum)
    _close(got_sum, want_sum)
    if residual is not None:
        assert got_sum is residual  # the sum written over the residual, as the op may


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [48, 1536, 2100])  # (2100: past one program's block)
def test_silu_and_mul_matches_the_reference(dtype, width):
    gate_up = (torch.randn(5, 2 * width, generator=torch.Generator().manual_seed(width)) * 4).to(
        dtype
    )
    _close(TritonOps().silu_and_mul(gate_up), TorchOps().silu_and_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "cache_dtype"),
    [
        (4, 2, 16, None),
        (9, 3, 64, None),  # SmolLM2's heads
        (6, 6, 24, None),  # a head width that is not a power of two
        (4, 1, 32, torch.float16),
        (4, 2, 32, torch.bfloat16),
    ],
)
def test_rope_and_cache_matches_rotating_then_writing(
    dtype, heads, kv_heads, head_dim, cache_dtype
):
    """q and k rotated as RotaryTables.rotate does, k and v at their slots as write_cache
    puts them; every other slot left alone."""
    generator = torch.Generator().manual_seed(heads * head_dim)
    T, slots_total = 11, 64
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None)
    rotary.build(torch.device("cpu"))
    positions = torch.randint(0, 500, (T,), generator=generator)
    tables = rotary.cos_sin_for(positions, dtype)
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    slots = torch.randperm(slots_total, generator=generator)[:T]
    cache_shape = (slots_total, kv_heads, head_dim)
    fill = torch.randn(cache_shape, generator=generator).to(cache_dtype or dtype)
    got_cache = (fill.clone(), fill.clone() * 2)
    want_cache = (fill.clone(), fill.clone() * 2)

    got = TritonOps().rope_and_cache(qkv, tables, slots, got_cache, heads)
    assert got is not None
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qk = tables.rotate(qkv[:, : q_size + kv_size].view(T, heads + kv_heads, head_dim))
    v = qkv[:, q_size + kv_size :].view(T, kv_heads, head_dim)
    write_cache(qk[:, heads:], v, want_cache, slots)
    _close(got[0], qk[:, :heads])
    _close(got[1], qk[:, heads:])
    narrowed = torch.bfloat16 if torch.bfloat16 in (dtype, cache_dtype) else None
    for got_part, want_part in zip(got_cache, want_cache, strict=True):
        if narrowed is None:  # (rounded as the reference rounds: exactly its values)
            assert torch.equal(got_part, want_part)
        _close(got_part, want_part, narrowed)


def test_what_the_kernels_do_not_take_goes_to_the_reference():
    """An fp8 cache and partial rotary: None, so the layer rotates and attention writes."""
    rotary = RotaryEmbedding(32, 64, 10000.0, None, rotary_dim=16)
    rotary.build(torch.device("cpu"))
    tables = rotary.cos_sin_for(torch.arange(3), torch.float32)
    qkv = torch.randn(3, 4 * 32)
    cache = (torch.zeros(8, 1, 32), torch.zeros(8, 1, 32))
    assert TritonOps().rope_and_cache(qkv, tables, torch.arange(3), cache, 2) is None
    full = RotaryEmbedding(32, 64, 10000.0, None)
    full.build(torch.device("cpu"))
    fp8 = tuple(torch.zeros(8, 1, 32, dtype=torch.float8_e4m3fn) for _ in range(2))
    tables = full.cos_sin_for(torch.arange(3), torch.float32)
    assert TritonOps().rope_and_cache(qkv, tables, torch.arange(3), fp8, 2) is None
