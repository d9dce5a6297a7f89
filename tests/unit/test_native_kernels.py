"""The native CPU kernels: results equal torch's reference, the build is cached, and a
missing compiler or TOKENMILL_NATIVE_KERNELS=0 falls back instead of failing."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import tokenmill.kernels as kernels
from tokenmill.kernels import layer_ops, paged_attention, quant_matmul, sampling_ops

needs_kernel = pytest.mark.skipif(
    not paged_attention.available(), reason="no C compiler: the torch fallback is used"
)


def reference(q, k_cache, v_cache, tables, lens, block_size):
    """SDPA over each sequence's keys, gathered slot by slot."""
    out = torch.empty_like(q)
    for b, n in enumerate(lens.tolist()):
        slots = torch.tensor(
            [int(tables[b, i // block_size]) * block_size + i % block_size for i in range(n)]
        )
        keys, values = k_cache[slots].transpose(0, 1), v_cache[slots].transpose(0, 1)
        out[b] = F.scaled_dot_product_attention(
            q[b].unsqueeze(1), keys, values, enable_gqa=True
        ).squeeze(1)
    return out


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "lens"),
    [
        (9, 3, 64, [1]),
        (9, 3, 64, [16, 17, 190, 5]),
        (4, 4, 48, [33, 2]),  # no GQA, a head size that is not a multiple of 32
        (2, 1, 20, [5, 40]),  # a head size that is not a multiple of 8 (portable loops)
        (8, 2, 128, [300]),
        (6, 1, 32, [64, 64, 64, 1, 100, 7, 31]),
    ],
)
@pytest.mark.parametrize(
    "cache_dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn],
)
def test_paged_decode_attention_matches_sdpa(heads, kv_heads, head_dim, lens, cache_dtype):
    torch.manual_seed(0)
    block_size, num_blocks = 16, 64
    k_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim).to(cache_dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim).to(cache_dtype)
    if not paged_attention.supports(k_cache):
        pytest.skip(
            "float16, bfloat16 and fp8 caches need the F16C vector loops (head sizes that "
            "are a multiple of 8)"
        )
    width = max(-(-n // block_size) for n in lens)
    # each sequence gets distinct, scattered blocks; unused table entries stay 0
    order = torch.randperm(num_blocks)
    tables = torch.zeros(len(lens), width, dtype=torch.long)
    used = 0
    for b, n in enumerate(lens):
        count = -(-n // block_size)
        tables[b, :count] = order[used : used + count]
        used += count
    lens_t = torch.tensor(lens, dtype=torch.long)
    q = torch.randn(len(lens), heads, head_dim) * 3  # peaked softmax too
    got = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens_t, block_size)
    # float16, bfloat16 and fp8 caches: the same math over the values they hold
    want = reference(q, k_cache.float(), v_cache.float(), tables, lens_t, block_size)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize(
    "cache_dtype", [torch.float16, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn]
)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "window"),
    [(9, 3, 64, None), (9, 3, 64, 40), (8, 2, 128, 13), (6, 3, 72, None), (4, 1, 256, None)],
)
def test_narrow_caches_attend_as_float32_holding_the_same_values(
    cache_dtype, heads, kv_heads, head_dim, window
):
    """Decode rows of grouped heads over a narrow cache convert each block once for all
    the query heads that read it (staged_item); the result is the same bits as over a
    float32 cache holding the same values (read in place, one head at a time)."""
    torch.manual_seed(7)
    block_size, num_blocks = 16, 256
    k_cache = (torch.randn(num_blocks * block_size, kv_heads, head_dim) * 3).to(cache_dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, head_dim).to(cache_dtype)
    if not paged_attention.supports(k_cache):
        pytest.skip("narrow caches need the F16C vector loops")
    lens = torch.tensor([1, 7, 16, 17, 100, 199, 230])
    tables = torch.stack([torch.randperm(num_blocks)[:15] for _ in lens])
    q = torch.randn(len(lens), heads, head_dim)
    got = paged_attention.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, block_size, window=window
    )
    want = paged_attention.paged_decode_attention(
        q, k_cache.float(), v_cache.float(), tables, lens, block_size, window=window
    )
    assert torch.equal(got, want)


@needs_kernel
def test_each_sequence_is_independent_of_its_batch():
    torch.manual_seed(1)
    k_cache, v_cache = torch.randn(512, 2, 64), torch.randn(512, 2, 64)
    tables = torch.arange(32).view(4, 8)
    lens = torch.tensor([100, 128, 7, 64])
    q = torch.randn(4, 6, 64)
    together = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 16)
    for b in range(4):
        alone = paged_attention.paged_decode_attention(
            q[b : b + 1], k_cache, v_cache, tables[b : b + 1], lens[b : b + 1], 16
        )
        assert torch.equal(alone[0], together[b])


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "cache_dtype"),
    [(9, 3, 64, torch.float32), (4, 4, 48, torch.float32), (2, 1, 20, torch.float32),
     (9, 3, 64, torch.float16), (9, 3, 64, torch.float8_e5m2), (4, 2, 40, torch.float8_e5m2),
     (9, 3, 64, torch.float8_e4m3fn), (4, 2, 40, torch.float8_e4m3fn),
     (9, 3, 64, torch.bfloat16)],
)  # fmt: skip
def test_prefill_rows_equal_the_same_rows_alone(heads, kv_heads, head_dim, cache_dtype):
    """A prefill chunk's rows (one block table, consecutive lengths) are attended in tiles
    that share key and value reads; each row still equals its own call, i.e. the decode
    that token would have had: no result depends on how a prompt was chunked."""
    torch.manual_seed(2)
    block_size = 16
    k_cache = torch.randn(512, kv_heads, head_dim).to(cache_dtype)
    v_cache = torch.randn(512, kv_heads, head_dim).to(cache_dtype)
    if not paged_attention.supports(k_cache):
        pytest.skip("float16 caches need the F16C vector loops")
    table = torch.randperm(32)[None]
    lens = torch.cat([torch.arange(90, 131), torch.tensor([7, 300])])  # a chunk, then 2 decodes
    tables = torch.cat([table.expand(41, -1), torch.randperm(32)[None], table]).contiguous()
    q = torch.randn(len(lens), heads, head_dim)
    together = paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size)
    for b in range(len(lens)):
        alone = paged_attention.paged_decode_attention(
            q[b : b + 1], k_cache, v_cache, tables[b : b + 1], lens[b : b + 1], block_size
        )
        assert torch.equal(alone[0], together[b]), b


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "cache_dtype"),
    [(9, 3, 64, torch.float32), (2, 1, 20, torch.float32), (8, 2, 128, torch.float16),
     (9, 3, 64, torch.float8_e5m2), (4, 2, 40, torch.float8_e4m3fn), (4, 2, 40, torch.bfloat16)],
)  # fmt: skip
@pytest.mark.parametrize("window", [1, 13, 40])
def test_a_sliding_window_reads_only_its_keys(heads, kv_heads, head_dim, cache_dtype, window):
    """Rows see their last `window` keys (SDPA over just those); the blocks before a row's
    window hold NaN in the cache (freed, reused), and no result is touched by them; a row
    of a prefill tile still equals the same row alone."""
    torch.manual_seed(3)
    block_size = 16
    k_cache = torch.randn(80 * block_size, kv_heads, head_dim).to(cache_dtype)
    v_cache = torch.randn(80 * block_size, kv_heads, head_dim).to(cache_dtype)
    if not paged_attention.supports(k_cache):
        pytest.skip("float16 caches need the F16C vector loops")
    poisoned = 79  # every table entry before a window's first block points here
    k_cache[poisoned * block_size :] = float("nan")
    v_cache[poisoned * block_size :] = float("nan")
    lens = torch.cat([torch.arange(70, 90), torch.tensor([1, 5, 33, 200])])  # a chunk, decodes
    tables = torch.full((len(lens), 13), poisoned, dtype=torch.long)
    order = torch.randperm(poisoned)[:78].view(6, 13)  # 6 sets of 13 distinct blocks
    for b, n in enumerate(lens.tolist()):
        first, last = max(0, n - window) // block_size, (n - 1) // block_size
        blocks = order[0 if b < 20 else b - 19]  # the chunk's rows share a table
        tables[b, first : last + 1] = blocks[first : last + 1]
    q = torch.randn(len(lens), heads, head_dim) * 3
    got = paged_attention.paged_decode_attention(
        q, k_cache, v_cache, tables, lens, block_size, window=window
    )
    want = torch.empty_like(q)
    for b, n in enumerate(lens.tolist()):
        keys = range(max(0, n - window), n)
        slots = torch.tensor([int(tables[b, i // block_size]) * block_size + i % block_size
                              for i in keys])  # fmt: skip
        k = k_cache[slots].float().transpose(0, 1)
        v = v_cache[slots].float().transpose(0, 1)
        want[b] = F.scaled_dot_product_attention(q[b].unsqueeze(1), k, v, enable_gqa=True).squeeze(
            1
        )
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)
    for b in range(len(lens)):
        alone = paged_attention.paged_decode_attention(
            q[b : b + 1], k_cache, v_cache, tables[b : b + 1], lens[b : b + 1], block_size,
            window=window,
        )  # fmt: skip
        assert torch.equal(alone[0], got[b]), b


@needs_kernel
def test_empty_sequence_is_an_error_not_garbage():
    k_cache = v_cache = torch.zeros(32, 1, 64)
    with pytest.raises(RuntimeError):
        paged_attention.paged_decode_attention(
            torch.zeros(1, 1, 64),
            k_cache,
            v_cache,
            torch.zeros(1, 1, dtype=torch.long),
            torch.zeros(1, dtype=torch.long),
            16,
        )


def test_build_is_cached_and_a_failed_build_falls_back(tmp_path, monkeypatch, caplog):
    """A compiler that only writes its output and counts its runs (a real first build is
    tests/e2e/test_server_first_run.py's): the library lands in the cache directory, once."""
    runs = tmp_path / "runs"
    compiler = tmp_path / "cc"
    compiler.write_text(
        f'#!/bin/sh\necho run >> "{runs}"\nwhile [ "$1" != -o ]; do shift; done\n: > "$2"\n'
    )
    compiler.chmod(0o755)
    monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path))
    kernels.load.cache_clear()
    try:
        with monkeypatch.context() as fake:
            fake.setattr(kernels, "_compiler", lambda: str(compiler))
            first = kernels._build("all")
            assert first.parent == tmp_path / "kernels" and first.exists()
            assert kernels._build("all") == first  # no second compile
        assert runs.read_text() == "run\n"
        assert [p.name for p in first.parent.iterdir()] == [first.name]  # no partial file left
        kernels.load.cache_clear()
        monkeypatch.setattr(kernels, "_compiler", lambda: "/bin/false")
        monkeypatch.setenv("TOKENMILL_CACHE_DIR", str(tmp_path / "other"))
        assert kernels.load() is None
        assert "using the torch fallback" in caplog.text
    finally:
        kernels.load.cache_clear()


def test_disabled_by_environment():
    code = "from tokenmill.kernels import paged_attention as p; print(p.available())"
    env = {"TOKENMILL_NATIVE_KERNELS": "0", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


needs_layer_ops = pytest.mark.skipif(not layer_ops.available(), reason="no C compiler")


@needs_layer_ops
@pytest.mark.parametrize("add", [True, False])
def test_add_rms_norm_matches_torch(add):
    torch.manual_seed(2)
    x, residual, weight = torch.randn(5, 576), torch.randn(5, 576) * 4, torch.randn(576)
    want_sum = x + residual if add else residual.clone()
    want = weight * F.rms_norm(want_sum, (576,), eps=1e-5)
    got = layer_ops.add_rms_norm(x, residual, weight, 1e-5, add)
    torch.testing.assert_close(residual, want_sum, atol=0, rtol=0)  # summed in place
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_layer_ops
def test_silu_mul_matches_torch():
    gate_up = torch.cat([torch.linspace(-100, 100, 3001), torch.randn(3001) * 3]).view(1, -1)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(layer_ops.silu_mul(gate_up), F.silu(gate) * up, atol=1e-5, rtol=1e-5)


@needs_layer_ops
def test_threaded_element_wise_calls_equal_row_by_row():
    """Prefill-sized calls split rows over threads; each row's result stays bit-identical."""
    torch.manual_seed(7)
    rows = 300  # 300 x 576 and 300 x 1536 values: past the one-thread limit
    gate_up = torch.randn(rows, 2 * 1536) * 3
    whole = layer_ops.silu_mul(gate_up)
    assert all(
        torch.equal(layer_ops.silu_mul(gate_up[t : t + 1])[0], whole[t]) for t in range(rows)
    )
    x, residual, weight = torch.randn(rows, 576), torch.randn(rows, 576), torch.randn(576)
    each = residual.clone()
    got = layer_ops.add_rms_norm(x, residual, weight, 1e-5)
    for t in range(rows):
        row = each[t : t + 1].clone()
        assert torch.equal(layer_ops.add_rms_norm(x[t : t + 1], row, weight, 1e-5)[0], got[t])
        assert torch.equal(row[0], residual[t])


@needs_layer_ops
def test_threaded_rope_and_cache_equals_row_by_row():
    from tokenmill.layers.rotary import RotaryEmbedding

    torch.manual_seed(8)
    heads, kv_heads, dim, rows = 9, 3, 64, 200  # 200 x 960 values: past the one-thread limit
    rotary = RotaryEmbedding(dim, 512, 10000.0, None)
    rotary.build(torch.device("cpu"))
    positions, slots = torch.randperm(512)[:rows], torch.randperm(1024)[:rows]
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * dim)
    caches = torch.zeros(1024, kv_heads, dim), torch.zeros(1024, kv_heads, dim)
    q, k = layer_ops.rope_and_cache(qkv, rotary.cos_sin, positions, slots, *caches, heads)
    alone = torch.zeros(1024, kv_heads, dim), torch.zeros(1024, kv_heads, dim)
    for t in range(rows):
        row = slice(t, t + 1)
        q_t, k_t = layer_ops.rope_and_cache(
            qkv[row], rotary.cos_sin, positions[row], slots[row], *alone, heads
        )
        assert torch.equal(q_t[0], q[t]) and torch.equal(k_t[0], k[t])
    assert torch.equal(alone[0], caches[0]) and torch.equal(alone[1], caches[1])


@needs_layer_ops
def test_rope_and_cache_matches_torch_and_writes_the_slots():
    from tokenmill.layers.rotary import RotaryEmbedding

    torch.manual_seed(3)
    heads, kv_heads, dim = 6, 2, 64
    rotary = RotaryEmbedding(dim, 128, 10000.0, None)
    rotary.build(torch.device("cpu"))
    positions, slots = torch.tensor([0, 5, 127]), torch.tensor([3, 40, 7])
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim)
    k_cache, v_cache = torch.zeros(64, kv_heads, dim), torch.zeros(64, kv_heads, dim)
    q, k = layer_ops.rope_and_cache(qkv, rotary.cos_sin, positions, slots, k_cache, v_cache, heads)
    tables = rotary.cos_sin_for(positions, torch.float32)
    qk = tables.rotate(qkv[:, : (heads + kv_heads) * dim].view(3, heads + kv_heads, dim))
    torch.testing.assert_close(q, qk[:, :heads], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache[slots], qk[:, heads:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, qk[:, heads:], atol=1e-5, rtol=1e-5)
    v = qkv[:, (heads + kv_heads) * dim :].view(3, kv_heads, dim)
    assert torch.equal(v_cache[slots], v)
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache[untouched].any() and not v_cache[untouched].any()


@needs_layer_ops
def test_rope_and_cache_writes_float16_caches_rounded():
    if not layer_ops.writes_f16():
        pytest.skip("no F16C")
    torch.manual_seed(4)
    heads, kv_heads, dim = 6, 2, 64
    cos_sin = torch.randn(16, 2, dim)
    positions, slots = torch.tensor([0, 5, 15]), torch.tensor([3, 40, 7])
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim) * 100
    wide = torch.zeros(64, kv_heads, dim), torch.zeros(64, kv_heads, dim)
    half = tuple(torch.zeros(64, kv_heads, dim, dtype=torch.float16) for _ in range(2))
    q32, k32 = layer_ops.rope_and_cache(qkv, cos_sin, positions, slots, *wide, heads)
    q16, k16 = layer_ops.rope_and_cache(qkv, cos_sin, positions, slots, *half, heads)
    assert torch.equal(q16, q32) and torch.equal(k16, k32)  # q and k stay float32
    assert torch.equal(half[0], wide[0].half()) and torch.equal(half[1], wide[1].half())


def _write_both_ways(v, cache_dtype):
    """Values v [rows, 1, 64] (and random keys) written to caches of `cache_dtype` by
    rope_and_cache (no rotation: cos 1, sin 0) and by the torch path's write_cache at the
    same shuffled slots: (native caches, torch caches, (k, v), slots)."""
    from tokenmill.layers.attention import write_cache

    heads, kv_heads, dim = 1, 1, 64
    rows = v.shape[0]
    k = torch.randn(rows, kv_heads, dim) * 1000
    qkv = torch.cat([torch.randn(rows, heads * dim), k.flatten(1), v.flatten(1)], 1)
    cos_sin = torch.stack([torch.ones(1, dim), torch.zeros(1, dim)], 1)
    positions, slots = torch.zeros(rows, dtype=torch.long), torch.randperm(rows)

    def empty():
        return tuple(torch.zeros(rows, kv_heads, dim, dtype=cache_dtype) for _ in "kv")

    native, fallback = empty(), empty()
    layer_ops.rope_and_cache(qkv, cos_sin, positions, slots, *native, heads)
    write_cache(k, v, fallback, slots)
    return native, fallback, (k, v), slots


@needs_layer_ops
@pytest.mark.parametrize("cache_dtype", [torch.float8_e5m2, torch.float8_e4m3fn])
def test_rope_and_cache_writes_fp8_caches_through_float16(cache_dtype):
    """An fp8 cache holds each value rounded to float16, then to 8 bits (ties to even; e5m2
    past 57344 to infinity, e4m3 saturating at 448): the bytes torch's conversion gives
    from that float16, for every float16 there is (written as values, which are not
    rotated; NaN and infinities included), and the torch path's write_cache stores the
    same bytes."""
    if not layer_ops.writes_f16():
        pytest.skip("no F16C")
    halves = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    every_half = halves.view(torch.float16).float().view(-1, 1, 64)
    native, fallback, inputs, slots = _write_both_ways(every_half, cache_dtype)
    for written, x in zip(native, inputs, strict=True):
        want = x.half().to(cache_dtype)  # NaN too: the same sign, torch's payload
        assert torch.equal(written[slots].view(torch.uint8), want.view(torch.uint8))
    for a, b in zip(native, fallback, strict=True):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@needs_layer_ops
def test_rope_and_cache_writes_bfloat16_caches_rounded_to_nearest_even():
    """A bfloat16 cache holds each value rounded to nearest even: torch's bytes for random
    bit patterns (every exponent, NaN and infinities among them) and for exact ties, and
    the torch path's write_cache stores the same; NaN stays NaN."""
    if not layer_ops.writes_f16():
        pytest.skip("no F16C")
    torch.manual_seed(6)
    patterns = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), dtype=torch.int64).to(torch.int32)
    ties = (torch.randint(0, 1 << 15, (1 << 12,), dtype=torch.int32) << 16) | 0x8000
    values = torch.cat([patterns, ties]).view(torch.float32).view(-1, 1, 64)
    native, fallback, inputs, slots = _write_both_ways(values, torch.bfloat16)
    for written, stored, x in zip(native, fallback, inputs, strict=True):
        want = x.to(torch.bfloat16)
        nan = want.isnan()
        for got in (written[slots], stored[slots]):
            assert torch.equal(got.isnan(), nan)
            assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


@needs_layer_ops
def test_rope_and_cache_rejects_out_of_range_positions_and_slots():
    from tokenmill.layers.rotary import RotaryEmbedding

    rotary = RotaryEmbedding(64, 16, 10000.0, None)
    rotary.build(torch.device("cpu"))
    cache = torch.zeros(8, 1, 64)
    qkv = torch.ones(2, 3 * 64)
    for position, slot in [(16, 0), (0, 8), (-1, 0)]:
        with pytest.raises(IndexError):
            layer_ops.rope_and_cache(
                qkv,
                rotary.cos_sin,
                torch.tensor([1, position]),  # a good row first: nothing is written at all
                torch.tensor([1, slot]),
                cache,
                cache,
                1,
            )
        assert not cache.any()


needs_quant = pytest.mark.skipif(not quant_matmul.available(), reason="no C compiler")


def gguf_blocks(weight: torch.Tensor, ggml_type: int) -> torch.Tensor:
    import gguf

    blocks = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType(ggml_type))
    return torch.from_numpy(blocks).view(weight.shape[0], -1)


def dequantized(blocks: torch.Tensor, ggml_type: int) -> torch.Tensor:
    import gguf

    values = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType(ggml_type))
    return torch.from_numpy(values).float()


@needs_quant
@pytest.mark.parametrize("ggml_type", [quant_matmul.GGML_Q4_1, quant_matmul.GGML_Q8_0])
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"),
    [(1, 7, 64), (2, 40, 96), (5, 96, 160), (33, 64, 32), (50, 17, 64)],
)
def test_quant_matmul_matches_the_dequantized_weights(ggml_type, rows, out_features, in_features):
    torch.manual_seed(4)
    blocks = gguf_blocks(torch.randn(out_features, in_features) * 0.1, ggml_type)
    assert blocks.shape[1] == in_features // 32 * quant_matmul.BLOCK_LAYOUT[ggml_type][1]
    values, scales = quant_matmul.pack_blocks(blocks, ggml_type, in_features)
    x, bias = torch.randn(rows, in_features), torch.randn(out_features)
    want = x @ dequantized(blocks, ggml_type).t() + bias
    got = quant_matmul.quant_matmul(x, values, scales, ggml_type, out_features, bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # in registers (1-2 rows) or from an unpacked panel (more), in any tile: a row gives
    # bit-identical results alone, in any slice of the batch, and on any number of threads
    for start in range(rows):
        for size in (1, 2, 3, 4):
            part = x[start : start + size]
            alone = quant_matmul.quant_matmul(part, values, scales, ggml_type, out_features, bias)
            assert torch.equal(alone, got[start : start + size])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = quant_matmul.quant_matmul(x, values, scales, ggml_type, out_features, bias)
        assert torch.equal(one, got)
    finally:
        torch.set_num_threads(threads)


def int8_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x quantized to int8 per 32-value block (q = round(x * 127 / max|x|), d = max|x| / 127)
    and dequantized, times the weight: the int8 kernel's result up to float rounding."""
    rows, in_features = x.shape
    blocks = x.view(rows, in_features // 32, 32)
    top = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(top > 0, 127.0 / top, torch.zeros_like(top))
    q = torch.round(blocks * inv)
    assert q.abs().max() <= 127
    return (q * (top / 127)).view(rows, in_features) @ weight.t()


@needs_quant
@pytest.mark.parametrize("ggml_type", [quant_matmul.GGML_Q4_1, quant_matmul.GGML_Q8_0])
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"),
    # 130 x 576: 2,340 activation blocks, quantized on two threads
    [
        (1, 7, 64),
        (2, 40, 96),
        (5, 96, 160),
        (9, 33, 576),
        (33, 64, 32),
        (50, 17, 64),
        (130, 24, 576),
    ],
)
def test_int8_activations_match_the_quantized_reference(ggml_type, rows, out_features, in_features):
    torch.manual_seed(7)
    blocks = gguf_blocks(torch.randn(out_features, in_features) * 0.1, ggml_type)
    values, scales = quant_matmul.pack_blocks(blocks, ggml_type, in_features, True)
    x, bias = torch.randn(rows, in_features), torch.randn(out_features)
    weight = dequantized(blocks, ggml_type)
    got = quant_matmul.quant_matmul(x, values, scales, ggml_type, out_features, bias, True)
    want = int8_reference(x, weight) + bias
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and near the float32 product: the activations' rounding is ~0.4% of a block's maximum
    torch.testing.assert_close(got, x @ weight.t() + bias, atol=0.1, rtol=0.05)
    # every tile (1 row x 2 panels, 1-4 rows x 1 panel) gives a row the same floats
    for start in range(rows):
        for size in (1, 2, 3, 4, 5):
            part = x[start : start + size]
            alone = quant_matmul.quant_matmul(part, values, scales, ggml_type, out_features, bias, True)  # fmt: skip
            assert torch.equal(alone, got[start : start + size])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = quant_matmul.quant_matmul(x, values, scales, ggml_type, out_features, bias, True)
        assert torch.equal(one, got)
    finally:
        torch.set_num_threads(threads)


@needs_quant
@pytest.mark.parametrize("ggml_type", [quant_matmul.GGML_Q4_1, quant_matmul.GGML_Q8_0])
def test_int8_activations_do_not_overflow_at_the_extremes(ggml_type):
    """Every weight and activation at its largest magnitude, all products of one sign: the
    16-bit partial sums (Q4_1: 16 products of 15 x 127 per lane; Q8_0: pairs of 127 x 127)
    stay below 32767, so nothing saturates."""
    in_features = 128
    weight = torch.ones(16, in_features)
    weight[:, ::32] = 0.0  # Q4_1: m = 0, d = 1/15, so the ones are nibbles of 15
    weight[8:] *= -1.0  # Q8_0: -127
    blocks = gguf_blocks(weight, ggml_type)
    values, scales = quant_matmul.pack_blocks(blocks, ggml_type, in_features, True)
    largest = 15 if ggml_type == quant_matmul.GGML_Q4_1 else 127
    assert (values.view(torch.int8).abs() if largest == 127 else values & 15).max() == largest
    x = torch.stack([torch.full((in_features,), 3.0), torch.full((in_features,), -3.0)])
    got = quant_matmul.quant_matmul(x, values, scales, ggml_type, 16, None, True)
    want = x @ dequantized(blocks, ggml_type).t()
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-5)


@needs_quant
def test_quant_matmul_rejects_what_it_cannot_read():
    blocks = torch.zeros(4, 18, dtype=torch.uint8)
    with pytest.raises(ValueError):
        quant_matmul.pack_blocks(blocks, 2, 32)  # Q4_0: not read
    with pytest.raises(ValueError):  # rows of the wrong size for Q8_0
        quant_matmul.pack_blocks(blocks, quant_matmul.GGML_Q8_0, 32)
    values, scales = quant_matmul.pack_blocks(
        torch.zeros(4, 34, dtype=torch.uint8), quant_matmul.GGML_Q8_0, 32
    )
    with pytest.raises(ValueError):  # x does not have the weight's features
        quant_matmul.quant_matmul(torch.zeros(1, 64), values, scales, quant_matmul.GGML_Q8_0, 4)


@needs_quant
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"),
    [(1, 7, 64), (2, 100, 17), (7, 33, 64), (13, 16, 1), (97, 70, 40)],
)
def test_f16_matmul_matches_the_float16_weights(rows, out_features, in_features):
    torch.manual_seed(5)
    weight = torch.randn(out_features, in_features) * 0.1
    panels = quant_matmul.pack_f16(weight)
    assert panels.dtype == torch.float16 and panels.shape[0] * quant_matmul.PANEL >= out_features
    x, bias = torch.randn(rows, in_features), torch.randn(out_features)
    want = x @ weight.half().float().t() + bias
    got = quant_matmul.f16_matmul(x, panels, out_features, bias)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # every tile shape (1..6 rows, 1..4 panels) sums an output in the same order: a row is
    # bit-identical alone, in any slice of the batch, and on any number of threads
    for start in range(rows):
        for size in (1, 2, 3, 6):
            part = quant_matmul.f16_matmul(x[start : start + size], panels, out_features, bias)
            assert torch.equal(part, got[start : start + size])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(quant_matmul.f16_matmul(x, panels, out_features, bias), got)
    finally:
        torch.set_num_threads(threads)


@needs_quant
def test_f16_matmul_rejects_mismatched_shapes():
    panels = quant_matmul.pack_f16(torch.zeros(20, 32))
    with pytest.raises(ValueError):  # x does not have the weight's features
        quant_matmul.f16_matmul(torch.zeros(1, 64), panels, 20)
    with pytest.raises(ValueError):  # more outputs than the panels hold
        quant_matmul.f16_matmul(torch.zeros(1, 32), panels, 33)
    assert quant_matmul.f16_matmul(torch.zeros(0, 32), panels, 20).shape == (0, 20)


@pytest.fixture
def thread_count():
    """Set the CPU thread count for a test (pinned), and restore the default after it."""
    before = torch.get_num_threads()

    def set_count(threads: int) -> None:
        kernels.set_cpu_threads(threads)

    try:
        yield set_count
    finally:
        kernels.set_cpu_threads(before)
        kernels.set_cpu_threads(None)


@needs_quant
def test_every_thread_count_gives_the_same_bits(thread_count):
    """The pool hands out parts, not thread ranges: however many threads a call gets (more
    than the cores included, as when the pool adapts or threads are descheduled), every
    kernel's result is the same to the bit."""
    torch.manual_seed(11)
    weight = torch.randn(200, 576) * 0.1
    values, scales = quant_matmul.pack_blocks(gguf_blocks(weight, quant_matmul.GGML_Q4_1),
                                              quant_matmul.GGML_Q4_1, 576, True)  # fmt: skip
    xs = [torch.randn(rows, 576) for rows in (1, 5, 130)]
    gate_up, logits = torch.randn(300, 2 * 1536), torch.randn(32, 5003)
    temperature, uniforms = torch.full((32,), 0.8), torch.rand(32)
    block_size, heads, kv_heads, head_dim = 16, 9, 3, 64
    k_cache = torch.randn(64 * block_size, kv_heads, head_dim)
    v_cache = torch.randn(64 * block_size, kv_heads, head_dim)
    lens = torch.tensor([16, 17, 150, 5, 1, 64])
    tables = torch.randperm(64)[: 6 * 10].reshape(6, 10)
    q = torch.randn(6, heads, head_dim)

    def run() -> list[torch.Tensor]:
        outs = [
            quant_matmul.quant_matmul(x, values, scales, quant_matmul.GGML_Q4_1, 200, None, True)
            for x in xs
        ]
        outs.append(layer_ops.silu_mul(gate_up))
        outs.append(
            paged_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, block_size)
        )
        outs.append(sampling_ops.argmax_rows(logits))
        outs.append(sampling_ops.sample_rows(logits, temperature, uniforms))
        return outs

    thread_count(1)
    alone = run()
    for threads in (2, 3, 8, 32):
        thread_count(threads)
        for got, want in zip(run(), alone, strict=True):
            assert torch.equal(got, want), threads


@needs_quant
def test_the_pool_uses_fewer_threads_while_waiting_for_them_costs_more(thread_count):
    """Parts that take long on a pool thread (as if it were descheduled in the middle of
    one) make the pool run calls on one thread fewer; once they do not, a probe brings the
    thread back. Pinned (--cpu-threads), it never adapts."""
    import ctypes
    import time

    lib = kernels.load()
    lib.tm_pool_selftest.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    kernels.set_cpu_threads(None)  # adaptive, no limit yet
    lib.tm_pool_selftest(60, 2, 200_000, 2_000_000)
    stats = kernels.pool_stats()
    assert stats["limit"] == 1 and stats["reductions"] >= 1, stats
    deadline = time.monotonic() + 10  # the first probe comes after a 0.25 s back-off
    while kernels.pool_stats()["limit"] != 0 and time.monotonic() < deadline:
        lib.tm_pool_selftest(20, 2, 200_000, 0)
    lib.tm_pool_selftest(200, 2, 200_000, 0)  # the probe's window passes: it held
    stats = kernels.pool_stats()
    assert stats["limit"] == 0 and stats["probes"] >= 1, stats

    thread_count(2)  # pinned
    lib.tm_pool_selftest(60, 2, 200_000, 2_000_000)
    assert kernels.pool_stats()["limit"] == 0


@needs_quant
def test_portable_build_computes_the_same_chains(tmp_path):
    """Built without AVX2 (scalar fallback), the matmuls give bit-identical outputs."""
    import ctypes

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
    lib.tm_f16_matmul.argtypes = [ptr, i64, i64, ptr, i64, ptr, ptr, c_int]
    lib.tm_quant_matmul.argtypes = [ptr, i64, i64, ptr, ptr, i64, c_int, ptr, ptr, c_int]
    torch.manual_seed(6)
    x, weight = torch.randn(7, 64), torch.randn(40, 64) * 0.1
    panels, got = quant_matmul.pack_f16(weight), torch.empty(7, 40)
    assert (
        lib.tm_f16_matmul(x.data_ptr(), 7, 64, panels.data_ptr(), 40, None, got.data_ptr(), 2) == 0
    )
    assert torch.equal(got, quant_matmul.f16_matmul(x, panels, 40))
    for ggml_type in (quant_matmul.GGML_Q4_1, quant_matmul.GGML_Q8_0):
        for int8 in (False, True):
            blocks = gguf_blocks(weight, ggml_type)
            values, scales = quant_matmul.pack_blocks(blocks, ggml_type, 64, int8)
            kernel_type = quant_matmul.kernel_type(ggml_type, int8)
            args = (values.data_ptr(), scales.data_ptr(), 40, kernel_type, None, got.data_ptr(), 2)
            assert lib.tm_quant_matmul(x.data_ptr(), 7, 64, *args) == 0
            want = quant_matmul.quant_matmul(x, values, scales, ggml_type, 40, None, int8)
            assert torch.equal(got, want)


@needs_quant
def test_vnni_and_avx2_builds_give_the_same_bits(tmp_path):
    """Where the compiler targets VNNI, the int8 dot products sum with it (one instruction for
    maddubs + madd); a build without VNNI must give bit-identical outputs, every format and
    tile shape (the integer sums are exact either way)."""
    import ctypes

    native = kernels.load()
    if native is None or not native.tm_matmul_vnni():
        pytest.skip("this machine's build has no VNNI")
    source = Path(kernels.__file__).with_name("quant_matmul.c")
    target = tmp_path / "no_vnni.so"
    build = [kernels._compiler(), *kernels._FLAGS, "-mno-avxvnni", "-mno-avx512vnni",
             "-o", str(target), str(source), "-lm"]  # fmt: skip
    done = subprocess.run(build, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(target))
    assert lib.tm_matmul_vectorized() == 1 and lib.tm_matmul_vnni() == 0
    ptr, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.tm_quant_matmul.argtypes = [ptr, i64, i64, ptr, ptr, i64, c_int, ptr, ptr, c_int]
    torch.manual_seed(7)
    weight = torch.randn(48, 128) * 0.1
    for ggml_type in (quant_matmul.GGML_Q4_1, quant_matmul.GGML_Q5_1, quant_matmul.GGML_Q8_0):
        blocks = gguf_blocks(weight, ggml_type)
        values, scales = quant_matmul.pack_blocks(blocks, ggml_type, 128, True)
        kernel_type = quant_matmul.kernel_type(ggml_type, True)
        for rows in (1, 2, 3, 4, 7, 33):  # every tile shape
            x = torch.randn(rows, 128) * 3
            got = torch.empty(rows, 48)
            args = (values.data_ptr(), scales.data_ptr(), 48, kernel_type, None, got.data_ptr(), 2)
            assert lib.tm_quant_matmul(x.data_ptr(), rows, 128, *args) == 0
            want = quant_matmul.quant_matmul(x, values, scales, ggml_type, 48, None, True)
            assert torch.equal(got, want), (ggml_type, rows)


@needs_kernel
def test_paired_and_single_row_attention_builds_give_the_same_bits(tmp_path):
    """With 32 vector registers (AVX-512 VL) a prefill tile's rows are scored and weighed
    two at a time; a build without them (one row at a time) must give the same bits, for
    float32, float16, bfloat16 and fp8 caches, with and without a window."""
    import ctypes

    native = kernels.load()
    if native is None or not native.tm_paged_attention_paired():
        pytest.skip("this machine's build scores one row at a time")
    source = Path(kernels.__file__).with_name("paged_attention.c")
    target = tmp_path / "single_rows.so"
    build = [kernels._compiler(), *kernels._FLAGS, "-mno-avx512f", "-o", str(target),
             str(source), "-lm"]  # fmt: skip
    done = subprocess.run(build, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lib = ctypes.CDLL(str(target))
    assert lib.tm_paged_attention_paired() == 0
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.tm_paged_decode_attention.argtypes = [ptr] * 6 + [i64] * 6 + [
        ctypes.c_float, i64, i64, ctypes.c_int,
    ]  # fmt: skip
    torch.manual_seed(5)
    heads, kv_heads, head_dim, block_size = 9, 3, 64, 16
    table = torch.randperm(32)[None]
    lens = torch.cat([torch.arange(90, 131), torch.tensor([7, 300])])  # a chunk, then 2 decodes
    tables = torch.cat([table.expand(41, -1), torch.randperm(32)[None], table]).contiguous()
    q = torch.randn(len(lens), heads, head_dim)
    for dtype in (
        torch.float32, torch.float16, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn,
    ):  # fmt: skip
        k_cache = torch.randn(512, kv_heads, head_dim).to(dtype)
        v_cache = torch.randn(512, kv_heads, head_dim).to(dtype)
        for window in (None, 13):
            want = paged_attention.paged_decode_attention(
                q, k_cache, v_cache, tables, lens, block_size, window=window
            )
            got = torch.empty_like(q)
            status = lib.tm_paged_decode_attention(
                q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
                lens.data_ptr(), got.data_ptr(), len(lens), heads, kv_heads, head_dim,
                block_size, tables.shape[1], head_dim**-0.5, window or 0, 2,
                kernels.kv_format(dtype),
            )  # fmt: skip
            assert status == 0
            assert torch.equal(got, want), (dtype, window)


def _torch_draw(logits, temperature, uniforms):
    """The sampler's torch rule: inverse CDF over softmax(logits / temperature)."""
    cdf = torch.softmax(logits / temperature[:, None], dim=-1).cumsum(-1)
    return torch.searchsorted(cdf, (uniforms[:, None] * cdf[:, -1:]), right=True).squeeze(1)


@needs_layer_ops
def test_sample_rows_is_the_inverse_cdf_of_the_softmax():
    """Each row's token is where its uniform falls in softmax(logits / T)'s CDF: equal to
    torch's rule except where u lands within rounding of a boundary, and never a token
    of zero probability; a row's draw does not depend on the rows around it."""
    torch.manual_seed(11)
    rows, vocab = 64, 1003  # a vocabulary that is not a multiple of 8
    logits = torch.randn(rows, vocab) * 3
    logits[:, 500:700] = float("-inf")  # masked tokens (grammar, logit bias)
    temperature = torch.rand(rows) + 0.2
    uniforms = torch.rand(rows)
    got = sampling_ops.sample_rows(logits, temperature, uniforms)
    assert got is not None
    want = _torch_draw(logits, temperature, uniforms)
    assert (got == want).float().mean() >= 0.95, (got != want).nonzero()
    assert not ((got >= 500) & (got < 700)).any()
    for t in range(0, rows, 7):
        alone = sampling_ops.sample_rows(
            logits[t : t + 1], temperature[t : t + 1], uniforms[t : t + 1]
        )
        assert alone is not None and alone[0] == got[t]
    # rows of a padded vocabulary, read in place: the same draws
    padded = torch.cat([logits, torch.full((rows, 5), 9.0)], dim=1)[:, :vocab]
    assert not padded.is_contiguous()
    assert torch.equal(sampling_ops.sample_rows(padded, temperature, uniforms), got)


@needs_layer_ops
def test_sample_rows_frequencies_follow_the_probabilities():
    torch.manual_seed(12)
    vocab, draws = 10, 40000
    logits = torch.randn(1, vocab).expand(draws, vocab).contiguous()
    logits[:, 3] = float("-inf")
    temperature = torch.full((draws,), 0.7)
    got = sampling_ops.sample_rows(logits, temperature, torch.rand(draws))
    assert got is not None
    counts = torch.bincount(got, minlength=vocab).float() / draws
    probs = torch.softmax(logits[0] / 0.7, dim=-1)
    assert counts[3] == 0
    # binomial standard error at 40,000 draws is <= 0.0025: 5 sigma
    assert (counts - probs).abs().max() < 0.0125, (counts, probs)


@needs_layer_ops
def test_sample_rows_edges():
    vocab = 16
    one_hot = torch.full((2, vocab), float("-inf"))
    one_hot[0, 15], one_hot[1, 0] = 0.0, 0.0  # a single token with mass, at either end
    nearly_one = torch.tensor([1.0 - 2**-24, 1.0 - 2**-24])
    got = sampling_ops.sample_rows(one_hot, torch.ones(2), nearly_one)
    assert got is not None and got.tolist() == [15, 0]
    assert sampling_ops.sample_rows(one_hot, torch.ones(2), torch.zeros(2)).tolist() == [15, 0]
    no_mass = torch.full((1, vocab), float("-inf"))
    assert sampling_ops.sample_rows(no_mass, torch.ones(1), torch.zeros(1)) is None
    nan_row = torch.full((1, vocab), float("nan"))
    assert sampling_ops.sample_rows(nan_row, torch.ones(1), torch.zeros(1)) is None


@needs_layer_ops
@pytest.mark.parametrize("vocab", [1, 5, 8, 1003, 49152])
def test_argmax_rows_is_torch_argmax(vocab):
    """The first maximum of each row (ties, -inf rows), or its first NaN, as torch.argmax;
    also over a slice of wider rows."""
    torch.manual_seed(13)
    logits = torch.randn(37, vocab + 3)
    logits[0] = float("-inf")  # nothing allowed: torch says 0
    logits[1, : vocab // 2 + 1] = 7.0  # a tie: the first one wins
    logits[2, vocab // 3] = float("nan")
    logits[2, -4] = float("nan")
    logits[3, vocab - 1] = 50.0  # the last token, past the vector loop's end
    logits[4] = 0.0
    logits[5, vocab // 2] = float("inf")
    rows = logits[:, :vocab]  # strided rows, as the sampler's slice of a padded vocabulary
    assert torch.equal(sampling_ops.argmax_rows(rows), rows.argmax(dim=-1))
    assert torch.equal(sampling_ops.argmax_rows(rows.contiguous()), rows.argmax(dim=-1))
