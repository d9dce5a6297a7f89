"""The Triton paged-attention kernel (the CUDA backend's attention), run here by Triton's
interpreter on CPU tensors, against the torch reference on the same steps: decodes of
different lengths, prompts from position 0, chunks after a cached prefix, speculative
verify rows, grouped and ungrouped heads, sliding windows and soft-capped scores."""

from __future__ import annotations

import random
from array import array

import pytest
import torch

pytest.importorskip("triton")  # the CUDA backend's kernels; pip installs it beside torch on Linux

from tokenmill.backends.cuda_attention import TritonAttention
from tokenmill.layers.attention import ScheduledChunk, StepLayout, TorchAttention

BLOCK = 16


def _step(
    sequences: list[tuple[int, int]],  # (tokens cached before the step, new tokens)
    num_blocks: int,
    seed: int,
) -> StepLayout:
    """A step over `sequences`, each with its own shuffled blocks; decodes first."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    ordered = sorted(sequences, key=lambda s: s[1] != 1 or s[0] == 0)  # decodes first
    chunks, positions, slots, row = [], [], [], 0
    for cached, new in ordered:
        table = array("q", [free.pop() for _ in range(-(-(cached + new) // BLOCK))])
        chunks.append(ScheduledChunk(row, cached, new, table))
        for position in range(cached, cached + new):
            positions.append(position)
            slots.append(table[position // BLOCK] * BLOCK + position % BLOCK)
        row += new
    num_decodes = sum(1 for c in chunks if c.is_decode)
    return StepLayout(chunks, num_decodes, torch.tensor(positions), torch.tensor(slots), BLOCK)


def _run(
    attention,
    layout: StepLayout,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    seed: int,
    cache_dtype: torch.dtype | None = None,
    **kwargs,
) -> torch.Tensor:
    """The step's attention with random queries, new keys and cached keys (the cache is
    random everywhere: the sequences' earlier keys and whatever other slots hold)."""
    generator = torch.Generator().manual_seed(seed)
    num_tokens = int(layout.positions.shape[0])
    cache_shape = (64 * BLOCK, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=generator).to(cache_dtype or dtype)
    v_cache = torch.randn(cache_shape, generator=generator).to(cache_dtype or dtype)
    q = torch.randn(num_tokens, heads, head_dim, generator=generator).to(dtype)
    k = torch.randn(num_tokens, kv_heads, head_dim, generator=generator).to(dtype)
    v = torch.randn(num_tokens, kv_heads, head_dim, generator=generator).to(dtype)
    meta = attention.build_metadata(layout)
    return attention.forward(q, k, v, (k_cache, v_cache), meta, **kwargs)


STEPS = {
    "decodes": [(5, 1), (40, 1), (16, 1), (1, 1)],
    "prompts": [(0, 7), (0, 33)],
    "after a prefix": [(32, 9), (17, 40)],
    "mixed": [(70, 1), (3, 1), (0, 20), (48, 5), (31, 1)],
}


@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 16), (6, 2, 24), (8, 1, 64)])
def test_the_kernel_matches_the_reference(step, heads, kv_heads, head_dim):
    layout = _step(STEPS[step], 64, seed=1)
    got = _run(TritonAttention(), layout, heads, kv_heads, head_dim, torch.float32, seed=2)
    want = _run(TorchAttention(), layout, heads, kv_heads, head_dim, torch.float32, seed=2)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [None, 40, 100])
def test_decodes_split_over_their_keys_match_the_reference(window):
    """Few programs for long sequences: each decode's keys are shared out over programs
    (one split holds nothing for the shortest sequence) and the partial sums combined."""
    layout = _step([(200, 1), (70, 1), (129, 1)], 64, seed=15)
    attention = TritonAttention(min_programs=64)
    meta = attention.build_metadata(layout)
    (launch,) = meta.launches_for(2, 2, window, attention.min_programs)
    # blocks of keys at most: 13 (position 200: 3 splits of 4 or more, so 2); in a window
    # of 100, 8 (its 7 blocks' worth, starting inside one); of 40, 4: too few to split.
    # Each decode's own blocks are shared out, from the window's first block.
    assert launch.splits == {None: 2, 100: 2, 40: 1}[window]
    kwargs = dict(window=window)
    got = _run(attention, layout, 4, 2, 16, torch.float32, seed=16, **kwargs)
    want = _run(TorchAttention(), layout, 4, 2, 16, torch.float32, seed=16, **kwargs)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [4, 16, 23])
def test_a_sliding_window_matches_the_reference(window):
    layout = _step(STEPS["mixed"] + [(10, 30)], 64, seed=3)
    got = _run(TritonAttention(), layout, 4, 2, 16, torch.float32, seed=4, window=window)
    want = _run(TorchAttention(), layout, 4, 2, 16, torch.float32, seed=4, window=window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_soft_capped_scores_and_a_given_scale_match_the_reference():
    layout = _step(STEPS["mixed"], 64, seed=5)
    kwargs = dict(softcap=5.0, scale=0.3)
    got = _run(TritonAttention(), layout, 4, 2, 16, torch.float32, seed=6, **kwargs)
    want = _run(TorchAttention(), layout, 4, 2, 16, torch.float32, seed=6, **kwargs)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_float16_matches_the_reference_to_float16_rounding():
    layout = _step(STEPS["mixed"], 64, seed=7)
    got = _run(TritonAttention(), layout, 6, 2, 32, torch.float16, seed=8)
    want = _run(TorchAttention(), layout, 6, 2, 32, torch.float16, seed=8)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize(
    "cache_dtype", [torch.float16, torch.bfloat16, torch.float8_e5m2, torch.float8_e4m3fn]
)
def test_a_narrower_cache_is_read_as_the_reference_reads_it(cache_dtype):
    """float32 queries over a float16, bfloat16 or fp8 cache (written through float16, as
    the reference writes it): the same values, converted as they load."""
    layout = _step(STEPS["mixed"], 64, seed=13)
    narrow = dict(cache_dtype=cache_dtype)
    got = _run(TritonAttention(), layout, 4, 2, 16, torch.float32, seed=14, **narrow)
    want = _run(TorchAttention(), layout, 4, 2, 16, torch.float32, seed=14, **narrow)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_keys_past_a_sequence_are_never_read():
    """Slots of a sequence's last block past its end hold NaN: the output stays finite."""
    layout = _step([(5, 1), (0, 3), (20, 2)], 64, seed=9)
    attention = TritonAttention()
    generator = torch.Generator().manual_seed(10)
    k_cache = torch.full((64 * BLOCK, 2, 16), float("nan"))
    v_cache = torch.full((64 * BLOCK, 2, 16), float("nan"))
    for chunk in layout.chunks:  # what each sequence wrote before this step
        for position in range(chunk.start):
            slot = chunk.block_table[position // BLOCK] * BLOCK + position % BLOCK
            k_cache[slot] = torch.randn(2, 16, generator=generator)
            v_cache[slot] = torch.randn(2, 16, generator=generator)
    q = torch.randn(6, 4, 16, generator=generator)
    k, v = torch.randn(6, 2, 16, generator=generator), torch.randn(6, 2, 16, generator=generator)
    out = attention.forward(q, k, v, (k_cache, v_cache), attention.build_metadata(layout))
    assert torch.isfinite(out).all()


def test_what_the_kernel_does_not_take_goes_to_the_reference():
    """KV blocks narrower than a tensor-core tile, or not a power of two: the reference's
    result, bit for bit."""
    attention = TritonAttention()
    q = torch.zeros(1, 4, 16)
    assert not attention.runs(q, torch.zeros(1, 2, 16), 8)
    assert not attention.runs(q, torch.zeros(1, 2, 16), 24)
    assert attention.runs(q, torch.zeros(1, 2, 16), 16)
    assert attention.runs(q, torch.zeros(1, 2, 16, dtype=torch.float8_e5m2), 32)
    layout = _step(STEPS["mixed"], 64, seed=11)
    layout.block_size = 8  # the same slots, read as blocks of 8 by the reference
    for chunk in layout.chunks:
        chunk.block_table = array("q", [b * 2 + i for b in chunk.block_table for i in (0, 1)])
    got = _run(attention, layout, 4, 2, 16, torch.float32, seed=12)
    want = _run(TorchAttention(), layout, 4, 2, 16, torch.float32, seed=12)
    assert torch.equal(got, want)


@pytest.mark.parametrize("sequences", [[(5, 1), (40, 1), (16, 1)], [(70, 1), (0, 20), (48, 5)]])
def test_every_part_of_the_metadata_starts_16_bytes_in(sequences):
    """Triton compiles a kernel per pointer alignment: tables, chunks and tiles each start
    on 16 bytes whatever the counts (3 chunks, tables 3 or 5 wide), or a step would compile
    a variant its neighbour did not need."""
    layout = _step(sequences, 64, seed=17)
    meta = TritonAttention().build_metadata(layout)
    launches = meta.launches_for(2, 2, None, 0)
    assert meta.tables is not None and meta.chunks is not None
    for part in (meta.tables, meta.chunks, *(launch.tiles for launch in launches)):
        assert part.data_ptr() % 16 == 0
    assert meta.chunks[0].tolist() == [c.row for c in layout.chunks]
    assert meta.chunks[2].tolist() == [c.start for c in layout.chunks]
