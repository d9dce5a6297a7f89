"""kernels/gguf_rows.c: rows of GGUF blocks decoded to float32, equal to gguf-py's
dequantization byte for byte, for every type it reads."""

import gguf
import numpy as np
import pytest
import torch
from gguf import quants

from tokenmill.kernels import gguf_rows

pytestmark = pytest.mark.skipif(not gguf_rows.available(), reason="no C compiler")

ROWS, DIM = 40, 512
IDS = torch.tensor([5, 0, ROWS - 1, 5, 17])


def blocks_of(ggml_type: int) -> np.ndarray:
    """[ROWS, row bytes]: gguf-py's quantization of random floats where it quantizes the
    type, else random bytes with finite float16 scales (the K-quants)."""
    rng = np.random.default_rng(ggml_type)
    kind = gguf.GGMLQuantizationType(ggml_type)
    x = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    x[3, :32] = 0
    try:
        return quants.quantize(x, kind)
    except NotImplementedError:
        pass
    per_block, nbytes = gguf_rows.ROW_LAYOUT[ggml_type]
    raw = rng.integers(0, 256, (ROWS, DIM // per_block, nbytes), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-1, (ROWS, DIM // per_block, 2)).astype(np.float16)
    at = {12: 0, 13: 0, 14: 208}[ggml_type]  # d (and dmin) of Q4_K, Q5_K; Q6_K's d
    count = 1 if ggml_type == 14 else 2
    raw[:, :, at : at + 2 * count] = scales[:, :, :count].view(np.uint8)
    return raw.reshape(ROWS, -1)


@pytest.mark.parametrize(
    "ggml_type", sorted(gguf_rows.ROW_LAYOUT), ids=lambda t: gguf.GGMLQuantizationType(t).name
)
def test_rows_equal_gguf_pys_dequantization(ggml_type):
    blocks = blocks_of(ggml_type)
    expected = quants.dequantize(blocks, gguf.GGMLQuantizationType(ggml_type))[IDS.numpy()]
    assert np.isfinite(expected).all()
    rows = gguf_rows.gguf_rows(torch.from_numpy(blocks), ggml_type, DIM, IDS)
    assert rows.dtype == torch.float32 and rows.shape == (len(IDS), DIM)
    assert np.array_equal(rows.numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float16_and_bfloat16_rows_are_the_tables_rows(dtype):
    """GGML's F16 and BF16 (an embedding a file stores so, or fp16's): the rows as stored,
    in float32."""
    ggml_type = {torch.float16: gguf_rows.GGML_F16, torch.bfloat16: gguf_rows.GGML_BF16}[dtype]
    table = torch.randn(ROWS, 96).to(dtype)
    assert gguf_rows.decodes(ggml_type, 96)
    rows = gguf_rows.gguf_rows(table.view(torch.uint8), ggml_type, 96, IDS)
    assert torch.equal(rows, table[IDS].float())
    with pytest.raises(IndexError, match="out of range"):
        gguf_rows.gguf_rows(table.view(torch.uint8), ggml_type, 96, torch.tensor([ROWS]))


def test_no_ids_give_no_rows():
    blocks = torch.from_numpy(blocks_of(8))
    assert gguf_rows.gguf_rows(blocks, 8, DIM, torch.tensor([], dtype=torch.int64)).shape == (
        0,
        DIM,
    )


def test_an_id_out_of_range_and_a_wrong_layout_are_refused():
    blocks = torch.from_numpy(blocks_of(8))
    with pytest.raises(IndexError, match="out of range"):
        gguf_rows.gguf_rows(blocks, 8, DIM, torch.tensor([ROWS]))
    with pytest.raises(IndexError, match="out of range"):
        gguf_rows.gguf_rows(blocks, 8, DIM, torch.tensor([-1]))
    with pytest.raises(ValueError, match="type 3 with 512 values"):
        gguf_rows.gguf_rows(blocks, 3, DIM, IDS)  # Q8_0's bytes read as Q4_1
    assert not gguf_rows.decodes(12, 96)  # a K-quant row is whole 256-value blocks
