"""K-quant and 5-bit GGUF blocks (Q4_K, Q5_K, Q6_K, Q5_0, Q5_1) through the native kernel
(quant_matmul.c): y = x W^T equals gguf's dequantize-then-matmul, alone and batched, in
float32 math and with int8 activations, bit-identical per row whatever the batch, the
thread count or the build; and a GGUF file of K-quant linears keeps its blocks.

Tolerances (mag = |x| @ |W|^T, the sum the rounding scales with):
- float32 activations: Q5_0, Q5_1, Q6_K repack exactly, so only the summation order
  differs: 1e-5 * mag. Q4_K and Q5_K's sub-block scale d * sc and min dmin * m are rounded
  to float16 (relative error <= 2^-11 each, absolute <= 2^-25 below float16's normal
  range), so a weight moves by at most 2^-11 (|w| + 2 |min|) + 2^-25 * 33: that bound
  summed over x, plus the float term.
- int8 activations: as the Q4_1/Q8_0 tests, the kernel equals x quantized per 32-value
  block (int8_reference) times the weight up to the float term (and the Q4_K/Q5_K scale
  bound), and stays near the float32 product.
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import tokenmill.kernels as kernels
from tests.model.test_gguf_archs import PROMPT, engine, greedy_and_logits
from tests.model.test_gguf_archs import tokenizer_cache as tokenizer_cache  # private cache
from tokenmill.kernels import quant_matmul
from tokenmill.layers.linear import GGUFLinear, SplitGGUFLinear, gguf_linear

needs_quant = pytest.mark.skipif(not quant_matmul.available(), reason="no C compiler")
NEW_TYPES = [Q.Q4_K, Q.Q6_K, Q.Q5_K, Q.Q5_0, Q.Q5_1]
ROUNDED_SCALES = {Q.Q4_K, Q.Q5_K}  # scales rounded to float16 when repacked


# ---- K-quant blocks: a plain quantizer (gguf-py only dequantizes K-quants) ----


def _f16_bytes(values: np.ndarray) -> np.ndarray:  # [n] -> [n, 2]
    return values.astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """[rows, K] float -> Q6_K rows: per 16 values an int8 scale of d, values q - 32."""
    blocks = w.reshape(-1, 16, 16).astype(np.float32)  # [n, sub-block, value]
    n = blocks.shape[0]
    scale = np.abs(blocks).max(-1) / 31  # [n, 16]
    d = (scale.max(-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.where(d[:, None] > 0, np.round(scale / np.where(d > 0, d, 1)[:, None]), 0)
    sc = np.clip(sc, -127, 127).astype(np.int8)
    step = d[:, None] * sc.astype(np.float32)
    q = np.where(step[..., None] > 0, np.round(blocks / np.where(step > 0, step, 1)[..., None]), 0)
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(n, 2, 128)  # halves of 128
    ql = (q[:, :, :64] & 15) | ((q[:, :, 64:] & 15) << 4)  # [n, 2, 64]
    high = (q >> 4).reshape(n, 2, 4, 32)  # 32 values per 2-bit field
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    parts = [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)]
    return np.concatenate(parts, axis=1).reshape(w.shape[0], -1)


def quantize_q4_k(w: np.ndarray, five_bits: bool = False) -> np.ndarray:
    """[rows, K] float -> Q4_K (or Q5_K) rows: per 32 values a 6-bit scale of d and a 6-bit
    min of dmin, w = d * sc * q - dmin * m."""
    blocks = w.reshape(-1, 8, 32).astype(np.float32)
    n, top = blocks.shape[0], 31 if five_bits else 15
    low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    scale, minimum = (high - low) / top, -low
    d = (scale.max(-1) / 63).astype(np.float16).astype(np.float32)
    dmin = (minimum.max(-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / np.where(d > 0, d, 1)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.round(minimum / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    step, offset = d[:, None] * sc, dmin[:, None] * m
    q = np.round((blocks + offset[..., None]) / np.where(step > 0, step, 1)[..., None])
    q = np.where(step[..., None] > 0, np.clip(q, 0, top), 0).astype(np.uint8)  # [n, 8, 32]
    scales = np.zeros((n, 12), dtype=np.uint8)
    scales[:, :4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    pairs = (q & 15).reshape(n, 4, 2, 32)
    qs = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, 128)
    parts = [_f16_bytes(d), _f16_bytes(dmin), scales]
    if five_bits:  # bit j of byte i: sub-block j's value i, 16
        fifth = (q >> 4).astype(np.uint8)
        parts.append(sum((fifth[:, j] << j) for j in range(8)).astype(np.uint8))
    parts.append(qs)
    return np.concatenate(parts, axis=1).reshape(w.shape[0], -1)


def quantize(w: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """GGUF rows [N, row_bytes] of w [N, K] in `ggml_type`."""
    array = w.numpy()
    if ggml_type == Q.Q6_K:
        blocks = quantize_q6_k(array)
    elif ggml_type in (Q.Q4_K, Q.Q5_K):
        blocks = quantize_q4_k(array, five_bits=ggml_type == Q.Q5_K)
    else:
        blocks = gguf.quants.quantize(array, Q(ggml_type))
    return torch.from_numpy(np.ascontiguousarray(blocks)).view(w.shape[0], -1)


def random_blocks(rows: int, in_features: int, ggml_type: int, seed: int) -> torch.Tensor:
    """Random bytes with sane float16 scales (1e-4..2e-3): every bit pattern of the values
    and the 6-bit scales and mins."""
    per_block, block_bytes = quant_matmul.BLOCK_LAYOUT[ggml_type]
    n = rows * in_features // per_block
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n, block_bytes), dtype=torch.uint8, generator=g)
    fields = {Q.Q6_K: [208], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2]}
    fields |= {Q.Q4_1: [0, 2], Q.Q8_0: [0]}
    for at in fields[Q(ggml_type)]:
        scale = (torch.rand(n, generator=g) * 1.9e-3 + 1e-4).half()
        raw[:, at : at + 2] = scale.view(torch.uint8).view(n, 2)
    return raw.view(rows, -1)


def dequantized(blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    values = gguf.quants.dequantize(blocks.numpy(), Q(ggml_type))
    return torch.from_numpy(values).float()


def scale_bound(blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """Per weight, how far float16 scales move it: 2^-11 (|w| + 2 |min|) + 2^-25 * 33
    (0 for the exact repacks). The min is the weight of a zero value: the block with its
    values cleared."""
    weight = dequantized(blocks, ggml_type)
    if ggml_type not in ROUNDED_SCALES:
        return torch.zeros_like(weight)
    per_block, block_bytes = quant_matmul.BLOCK_LAYOUT[ggml_type]
    cleared = blocks.clone().view(-1, block_bytes)
    cleared[:, 16:] = 0  # Q4_K/Q5_K: values (and fifth bits) after d, dmin and the scales
    minimum = dequantized(cleared.view(blocks.shape), ggml_type).abs()
    return 2.0**-11 * (weight.abs() + 2 * minimum) + 2.0**-25 * 33


def int8_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x quantized to int8 per 32-value block and dequantized, times the weight."""
    rows, in_features = x.shape
    blocks = x.view(rows, in_features // 32, 32)
    top = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    q = torch.round(blocks * inv)
    return (q * (top / 127)).view(rows, in_features) @ weight.t()


def assert_near(got, want, x, weight, bound):
    """|got - want| <= 1e-5 mag + |x| @ bound^T (the module docstring's tolerance)."""
    limit = 1e-5 * (x.abs() @ weight.abs().t()) + x.abs() @ bound.t() + 1e-6
    excess = (got - want).abs() - limit
    assert excess.max() <= 0, f"off by {excess.max():.3g} over the bound"


def assert_rows_independent(x, values, scales, ggml_type, out_features, bias, int8, got):
    """Every tile gives a row the same floats: alone, in any slice, on one thread."""
    rows = x.shape[0]
    starts = range(rows) if rows <= 17 else (0, 1, 5, rows - 5, rows - 1)
    for start in starts:
        for size in (1, 2, 3, 4, 5, 7):
            part = x[start : start + size]
            alone = quant_matmul.quant_matmul(part, values, scales, ggml_type, out_features, bias, int8)  # fmt: skip
            assert torch.equal(alone, got[start : start + size]), (start, size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = quant_matmul.quant_matmul(x, values, scales, ggml_type, out_features, bias, int8)
        assert torch.equal(one, got)
    finally:
        torch.set_num_threads(threads)


@needs_quant
@pytest.mark.parametrize("ggml_type", NEW_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("source", ["quantized", "random"])
@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
@pytest.mark.parametrize("rows", [1, 3, 17, 64])
def test_kernel_matches_the_dequantized_weights(ggml_type, source, int8, rows):
    out_features, in_features = 40, 512  # 3 panels, the last partial; 2 K-quant blocks
    torch.manual_seed(rows)
    if source == "quantized":
        blocks = quantize(torch.randn(out_features, in_features) * 0.1, ggml_type)
    else:
        blocks = random_blocks(out_features, in_features, ggml_type, seed=rows)
    per_block, block_bytes = quant_matmul.BLOCK_LAYOUT[ggml_type]
    assert blocks.shape[1] == in_features // per_block * block_bytes
    values, scales = quant_matmul.pack_blocks(blocks, ggml_type, in_features, int8)
    weight, bound = dequantized(blocks, ggml_type), scale_bound(blocks, ggml_type)
    x, bias = torch.randn(rows, in_features), torch.randn(out_features)
    got = quant_matmul.quant_matmul(x, values, scales, ggml_type, out_features, bias, int8)
    if int8:
        assert_near(got, int8_reference(x, weight) + bias, x, weight, bound)
        mag = x.abs() @ weight.abs().t()  # the activations' rounding: ~0.4% of a block's max
        assert ((got - x @ weight.t() - bias).abs() <= 0.02 * mag + 1e-4).all()
    else:
        assert_near(got, x @ weight.t() + bias, x, weight, bound)
    assert_rows_independent(x, values, scales, ggml_type, out_features, bias, int8, got)


@needs_quant
@pytest.mark.parametrize("ggml_type", [Q.Q5_0, Q.Q5_1, Q.Q6_K], ids=lambda t: t.name)
def test_exact_repacks_equal_gguf_weights_in_float32(ggml_type):
    """One input feature at a time (x = e_k) reads back each weight: Q5_0, Q5_1 and Q6_K
    are gguf's dequantized values to the bit."""
    in_features, out_features = 256, 20
    blocks = random_blocks(out_features, in_features, ggml_type, seed=3)
    values, scales = quant_matmul.pack_blocks(blocks, ggml_type, in_features)
    got = quant_matmul.quant_matmul(torch.eye(in_features), values, scales, ggml_type, out_features)  # fmt: skip
    assert torch.equal(got.t(), dequantized(blocks, ggml_type))


@needs_quant
@pytest.mark.parametrize("ggml_type", [Q.Q4_K, Q.Q5_K], ids=lambda t: t.name)
def test_rounded_scales_are_float16_of_the_products(ggml_type):
    """Q4_K/Q5_K repacked: each weight is fma(float16(d sc), q, float16(-dmin m)), within
    the stated bound of gguf's value (and not always equal: the rounding is real)."""
    in_features, out_features = 256, 20
    blocks = random_blocks(out_features, in_features, ggml_type, seed=4)
    values, scales = quant_matmul.pack_blocks(blocks, ggml_type, in_features)
    assert scales.dtype == torch.float16
    got = quant_matmul.quant_matmul(torch.eye(in_features), values, scales, ggml_type, out_features)  # fmt: skip
    want = dequantized(blocks, ggml_type)
    assert ((got.t() - want).abs() <= scale_bound(blocks, ggml_type)).all()
    assert not torch.equal(got.t(), want)


@needs_quant
@pytest.mark.parametrize("ggml_type", [Q.Q5_1, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
def test_int8_activations_do_not_overflow_at_the_extremes(ggml_type):
    """Largest values times +-127 activations, all of one sign: the 16-bit partial sums of
    5-bit values (4 products of 31 x 127) and Q6_K's 32-bit ones stay exact."""
    in_features, out_features = 512, 16
    per_block, block_bytes = quant_matmul.BLOCK_LAYOUT[ggml_type]
    raw = torch.zeros(out_features * in_features // per_block, block_bytes, dtype=torch.uint8)
    one = torch.tensor([1.0], dtype=torch.float16).view(torch.uint8)
    if ggml_type == Q.Q6_K:  # q = 0 - 32 everywhere, scales 127
        raw[:, 192:208] = 127
        raw[:, 208:210] = one
    elif ggml_type == Q.Q5_1:  # q = 31, d = 1, m = 0
        raw[:, 0:2], raw[:, 4:] = one, 255
    else:  # Q5_K: every sc = 63 (6 bits: low 6 of bytes 4-7; their top 2 bits and bytes
        # 12-15's low nibbles for the second four), m = 0, q = 31
        raw[:, 0:2], raw[:, 4:8], raw[:, 12:16], raw[:, 16:] = one, 255, 15, 255
    blocks = raw.view(out_features, -1)
    weight = dequantized(blocks, ggml_type)
    assert weight.abs().min() == weight.abs().max() > 0
    x = torch.stack([torch.full((in_features,), 3.0), torch.full((in_features,), -3.0)])
    values, scales = quant_matmul.pack_blocks(blocks, ggml_type, in_features, True)
    got = quant_matmul.quant_matmul(x, values, scales, ggml_type, out_features, None, True)
    torch.testing.assert_close(got, x @ weight.t(), atol=1e-3, rtol=1e-6)


@needs_quant
def test_every_thread_count_gives_the_same_bits():
    torch.manual_seed(12)
    xs = [torch.randn(rows, 512) for rows in (1, 5, 70)]
    before = torch.get_num_threads()
    cases = []
    for ggml_type in NEW_TYPES:
        blocks = random_blocks(200, 512, ggml_type, seed=ggml_type)
        for int8 in (False, True):
            values, scales = quant_matmul.pack_blocks(blocks, ggml_type, 512, int8)
            cases.append((values, scales, ggml_type, int8))

    def run() -> list[torch.Tensor]:
        return [
            quant_matmul.quant_matmul(x, v, s, t, 200, None, int8)
            for v, s, t, int8 in cases
            for x in xs
        ]

    try:
        kernels.set_cpu_threads(1)
        alone = run()
        for threads in (2, 3, 8):
            kernels.set_cpu_threads(threads)
            for got, want in zip(run(), alone, strict=True):
                assert torch.equal(got, want), threads
    finally:
        kernels.set_cpu_threads(before)
        kernels.set_cpu_threads(None)


@needs_quant
def test_portable_build_computes_the_same_chains(tmp_path):
    """Built without AVX2 (scalar fallback), every new format gives bit-identical outputs."""
    if not quant_matmul.vectorized():
        pytest.skip("this machine already runs the portable path")
    source = Path(kernels.__file__).with_name("quant_matmul.c")
    target = tmp_path / "portable.so"
    build = [kernels._compiler(), "-O2", "-shared", "-fPIC", "-o", str(target), str(source), "-lm"]
    done = subprocess.run(build, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(target))
    assert lib.tm_matmul_vectorized() == 0
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tm_quant_matmul.argtypes = [ptr, i64, i64, ptr, ptr, i64, c_int, ptr, ptr, c_int]
    torch.manual_seed(6)
    x, got = torch.randn(7, 256), torch.empty(7, 40)
    for ggml_type in NEW_TYPES:
        blocks = random_blocks(40, 256, ggml_type, seed=9)
        for int8 in (False, True):
            values, scales = quant_matmul.pack_blocks(blocks, ggml_type, 256, int8)
            kernel_type = quant_matmul.kernel_type(ggml_type, int8)
            args = (values.data_ptr(), scales.data_ptr(), 40, kernel_type, None, got.data_ptr(), 2)
            assert lib.tm_quant_matmul(x.data_ptr(), 7, 256, *args) == 0
            want = quant_matmul.quant_matmul(x, values, scales, ggml_type, 40, None, int8)
            assert torch.equal(got, want), (ggml_type.name, int8)


@needs_quant
@pytest.mark.parametrize(
    ("types", "fmt"),
    [
        ([Q.Q5_0, Q.Q5_0, Q.Q8_0], Q.Q8_0),  # Q4_K_M's q|k|v where K is not a multiple of 256
        ([Q.Q6_K, Q.Q8_0, Q.Q5_0], Q.Q6_K),
        ([Q.Q4_K, Q.Q5_K, Q.Q4_1, Q.Q5_0, Q.Q5_1], Q.Q5_1),
        ([Q.Q4_1, Q.Q4_K], Q.Q4_1),
    ],
    ids=lambda v: "|".join(t.name for t in v) if isinstance(v, list) else v.name,
)
@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_fused_parts_of_different_types_share_a_format(types, fmt, int8):
    """A fused projection's parts in several types: one format that holds them all, rows
    in order, each part's weights as gguf dequantizes them (exact for what converts
    exactly; Q4_K/Q5_K within their scale bound)."""
    in_features, sizes = 512, [16, 40, 24, 32, 8][: len(types)]
    parts = [
        (t, random_blocks(size, in_features, t, seed=i))
        for i, (t, size) in enumerate(zip(types, sizes, strict=True))
    ]
    assert quant_matmul.common_format(set(types)) == fmt
    got_fmt, values, scales = quant_matmul.pack_parts(parts, in_features, int8)
    assert got_fmt == fmt
    weight = torch.cat([dequantized(b, t) for t, b in parts])
    bound = torch.cat([scale_bound(b, t) for t, b in parts])
    torch.manual_seed(2)
    x = torch.randn(5, in_features)
    got = quant_matmul.quant_matmul(x, values, scales, fmt, len(weight), None, int8)
    want = int8_reference(x, weight) if int8 else x @ weight.t()
    assert_near(got, want, x, weight, bound)
    if not int8 and not set(types) & ROUNDED_SCALES:  # exact: read every weight back
        eye = torch.eye(in_features)
        assert torch.equal(quant_matmul.quant_matmul(eye, values, scales, fmt, len(weight)).t(), weight)  # fmt: skip


def test_no_format_holds_k_quants_with_and_without_a_min():
    assert quant_matmul.common_format({Q.Q4_K, Q.Q6_K}) is None
    assert quant_matmul.common_format({Q.Q8_0, Q.Q4_1}) is None
    with pytest.raises(ValueError):
        quant_matmul.pack_parts(
            [
                (Q.Q4_K, random_blocks(16, 256, Q.Q4_K, 1)),
                (Q.Q6_K, random_blocks(16, 256, Q.Q6_K, 1)),
            ],
            256,
        )


@pytest.mark.parametrize("int8", [False, True], ids=["float32", "int8"])
def test_parts_no_one_format_holds_run_as_a_split_projection(int8):
    """Q4_K q|k beside a Q6_K v (larger models' Q4_K_M): gguf_linear keeps each run of
    parts in its own format and concatenates the outputs (bias rows split with them)."""
    in_features = 256
    parts = [
        (Q.Q4_K, random_blocks(16, in_features, Q.Q4_K, seed=1)),
        (Q.Q4_K, random_blocks(8, in_features, Q.Q4_K, seed=2)),
        (Q.Q6_K, random_blocks(8, in_features, Q.Q6_K, seed=3)),
    ]
    linear = torch.nn.Linear(in_features, 32, bias=True)
    split = gguf_linear(linear, list(parts), int8)
    assert isinstance(split, SplitGGUFLinear)
    assert [p.ggml_type for p in split.pieces] == [Q.Q4_K, Q.Q6_K]
    assert [p.out_features for p in split.pieces] == [24, 8]
    weight = torch.cat([dequantized(b, t) for t, b in parts])
    bound = torch.cat([scale_bound(b, t) for t, b in parts])
    torch.manual_seed(3)
    x = torch.randn(5, in_features)
    want = (int8_reference(x, weight) if int8 else x @ weight.t()) + linear.bias.detach()
    assert_near(split(x), want, x, weight, bound)


def test_pack_rejects_what_it_cannot_read():
    with pytest.raises(ValueError):  # K-quants need whole 256-value blocks
        quant_matmul.pack_blocks(torch.zeros(4, 72, dtype=torch.uint8), Q.Q4_K, 128)
    with pytest.raises(ValueError):  # Q3_K: not read
        quant_matmul.pack_blocks(torch.zeros(4, 110, dtype=torch.uint8), Q.Q3_K, 256)
    blocks = random_blocks(4, 256, Q.Q4_K, seed=1)
    blocks.view(-1, 144)[:, 0:2] = torch.tensor([60000.0], dtype=torch.float16).view(torch.uint8)
    blocks.view(-1, 144)[:, 4:8] = 63  # d * sc = 3.8e6: beyond float16
    with pytest.raises(ValueError):
        quant_matmul.pack_blocks(blocks, Q.Q4_K, 256)


# ---- end to end: a tiny GGUF of K-quant linears ----

# gguf tensor name -> its type; blk.1's q/k (Q4_K) and v (Q6_K) have no common format, so
# its fused q|k|v is split in two runs; its gate (Q5_0) and up (Q8_0) share Q8_0's
LAYER_TYPES = {
    "blk.0.attn_q": Q.Q4_K,
    "blk.0.attn_k": Q.Q4_K,
    "blk.0.attn_v": Q.Q4_K,
    "blk.0.attn_output": Q.Q4_K,
    "blk.0.ffn_gate": Q.Q4_K,
    "blk.0.ffn_up": Q.Q4_K,
    "blk.0.ffn_down": Q.Q6_K,
    "blk.1.attn_q": Q.Q4_K,
    "blk.1.attn_k": Q.Q4_K,
    "blk.1.attn_v": Q.Q6_K,
    "blk.1.attn_output": Q.Q5_K,
    "blk.1.ffn_gate": Q.Q5_0,
    "blk.1.ffn_up": Q.Q8_0,
    "blk.1.ffn_down": Q.Q5_1,
    "output": Q.Q6_K,
}


@pytest.fixture(scope="module")
def kquant_gguf(tiny_hf_model_dir, tmp_path_factory) -> Path:
    return _write_kquant_gguf(tiny_hf_model_dir, tmp_path_factory, LAYER_TYPES)


@pytest.fixture(scope="module")
def unsplit_kquant_gguf(tiny_hf_model_dir, tmp_path_factory) -> Path:
    """The same with blk.1's v in Q4_K: every projection one the fused decode step reads."""
    types = LAYER_TYPES | {"blk.1.attn_v": Q.Q4_K}
    return _write_kquant_gguf(tiny_hf_model_dir, tmp_path_factory, types)


def _write_kquant_gguf(tiny_hf_model_dir, tmp_path_factory, layer_types) -> Path:
    from tests.model import gguf_writing

    directory = tiny_hf_model_dir(
        "llama",
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
    )

    def stored(gguf_name: str, w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q]:
        ggml_type = layer_types.get(gguf_name.removesuffix(".weight"))
        if ggml_type is None or w.ndim != 2:
            return w.astype(np.float32), Q.F32
        return quantize(torch.from_numpy(w * 0.1), ggml_type).numpy(), ggml_type

    path = tmp_path_factory.mktemp("kquant") / "tiny-kquant.gguf"
    saved = gguf_writing._stored
    gguf_writing._stored = stored
    try:
        gguf_writing.write_llama_cpp_gguf(directory, path)
    finally:
        gguf_writing._stored = saved
    return path


@needs_quant
def test_kquant_gguf_keeps_its_blocks_with_the_dequantized_greedy_tokens(kquant_gguf, caplog):
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        blocks_llm = engine(kquant_gguf, quantization="gguf-float32")
    model = blocks_llm.engine.core.executor.worker.model
    layers = model.model.layers
    kept = {name: m.ggml_type for name, m in model.named_modules() if isinstance(m, GGUFLinear)}
    assert kept == {
        "model.layers.0.self_attn.qkv_proj": Q.Q4_K,
        "model.layers.0.self_attn.o_proj": Q.Q4_K,
        "model.layers.0.mlp.gate_up_proj": Q.Q4_K,
        "model.layers.0.mlp.down_proj": Q.Q6_K,
        # Q4_K q|k beside a Q6_K v: no one format holds them, each run keeps its blocks
        "model.layers.1.self_attn.qkv_proj.pieces.0": Q.Q4_K,
        "model.layers.1.self_attn.qkv_proj.pieces.1": Q.Q6_K,
        "model.layers.1.self_attn.o_proj": Q.Q5_K,
        "model.layers.1.mlp.gate_up_proj": Q.Q8_0,  # the format of Q5_0 | Q8_0
        "model.layers.1.mlp.down_proj": Q.Q5_1,
        "lm_head": Q.Q6_K,
    }
    assert isinstance(layers[1].self_attn.qkv_proj, SplitGGUFLinear)
    assert not any("loaded dequantized" in r.getMessage() for r in caplog.records)

    ids = blocks_llm.tokenizer.encode(PROMPT)
    tokens, logits = greedy_and_logits(blocks_llm, ids)
    exact_tokens, exact_logits = greedy_and_logits(engine(kquant_gguf), ids)
    assert tokens == exact_tokens
    assert torch.allclose(logits, exact_logits, atol=2e-3 * exact_logits.abs().max())

    int8_llm = engine(kquant_gguf, quantization="gguf")
    int8_model = int8_llm.engine.core.executor.worker.model
    int8_kept = {n: m for n, m in int8_model.named_modules() if isinstance(m, GGUFLinear)}
    assert len(int8_kept) == len(kept)
    # int8 activations but in the first layer (formats.FLOAT_ACTIVATION_LAYERS)
    assert all(m.int8_activations != n.startswith("model.layers.0.") for n, m in int8_kept.items())
    int8_tokens, _ = greedy_and_logits(int8_llm, ids)
    assert len(int8_tokens) == len(tokens)

    from tests.model.test_quantized import LOGPROBS, PROMPTS, generate_fused_and_layered

    _, _, calls = generate_fused_and_layered(int8_llm, PROMPTS[:1], LOGPROBS)
    assert calls == 0  # a split q|k|v is no projection the fused decode step reads


@needs_quant
def test_kquant_decode_steps_in_one_native_call_equal_layer_by_layer(unsplit_kquant_gguf):
    """decode_step.c over every K-quant format, float32 and int8 activations."""
    from tests.model.test_quantized import (
        LOGPROBS,
        PROMPTS,
        assert_same_tokens_and_logprobs,
        generate_fused_and_layered,
    )

    for quantization in ("gguf-float32", "gguf"):
        llm = engine(unsplit_kquant_gguf, quantization=quantization)
        fused, layered, calls = generate_fused_and_layered(llm, PROMPTS[:3], LOGPROBS)
        assert calls >= LOGPROBS.max_tokens - 2
        assert_same_tokens_and_logprobs(fused, layered)
