"""Token bitmasks: the batched apply masks exactly the disallowed tokens of the chosen rows."""

from __future__ import annotations

import pytest
import torch

from tokenmill.structured import StructuredOutputManager, allocate_bitmask, apply_bitmask
from tokenmill.structured.bitmask import apply_bitmask_torch, unpack_bitmask

VOCAB = 1000  # not a multiple of 32: the last word is partly padding


def random_bitmask(num_rows: int, vocab_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mask = allocate_bitmask(num_rows, vocab_size)
    mask.copy_(torch.randint(-(2**31), 2**31, mask.shape, generator=generator, dtype=torch.int64))
    return mask


def reference_apply(logits: torch.Tensor, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """One row and one token at a time, straight from the layout's definition."""
    out = logits.clone()
    for row in rows:
        for token in range(logits.shape[1]):
            word = token // 32
            allowed = word < mask.shape[1] and (int(mask[row, word]) >> (token % 32)) & 1
            if not allowed:
                out[row, token] = float("-inf")
    return out


def test_allocate_is_all_allowed_int32_words() -> None:
    mask = allocate_bitmask(3, VOCAB)
    assert mask.shape == (3, 32) and mask.dtype == torch.int32
    assert bool(unpack_bitmask(mask, VOCAB).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rows", [[0, 2, 5], [4], list(range(6))])
def test_apply_matches_the_per_row_reference(dtype: torch.dtype, rows: list[int]) -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(1)).to(dtype)
    mask = random_bitmask(6, VOCAB, seed=2)
    expected = reference_apply(logits, mask, rows)
    apply_bitmask(logits, mask, torch.tensor(rows))
    assert torch.equal(logits, expected)


def test_torch_fallback_matches_too_and_masks_columns_past_the_bitmask() -> None:
    logits = torch.randn(4, VOCAB + 40)
    mask = random_bitmask(4, VOCAB, seed=3)  # covers 1024 columns of 1040
    rows = [1, 3]
    expected = reference_apply(logits, mask, rows)
    apply_bitmask_torch(logits, mask, torch.tensor(rows))
    assert torch.equal(logits, expected)
    assert bool(torch.isinf(logits[rows, 1024:]).all())


def test_bitmask_with_more_rows_than_logits_and_untouched_rows() -> None:
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    mask = random_bitmask(8, VOCAB, seed=4)
    apply_bitmask(logits, mask, torch.tensor([1]))
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert torch.equal(logits, reference_apply(before, mask, [1]))


def test_no_rows_is_a_no_op() -> None:
    logits = torch.randn(2, VOCAB)
    before = logits.clone()
    StructuredOutputManager.apply_bitmask(logits, random_bitmask(2, VOCAB, 5), torch.tensor([]))
    assert torch.equal(logits, before)
