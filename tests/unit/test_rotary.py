"""Rotary tables: partial rotary against HF's formula written out, LongRoPE's factors (chosen
by the served context) and attention factor, and the configs they refuse."""

import math

import pytest
import torch

from tokenmill.errors import ModelLoadError
from tokenmill.layers.rotary import LongRope, RotaryEmbedding

CPU = torch.device("cpu")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _hf_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb: rotate_half within the first cos.shape[-1] dims."""
    R = cos.shape[-1]
    turned, rest = x[..., :R], x[..., R:]
    return torch.cat([turned * cos + _rotate_half(turned) * sin, rest], dim=-1)


def _built(
    head_dim: int, rotary_dim: int | None = None, scaling=None, context: int | None = None
) -> RotaryEmbedding:
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, scaling, rotary_dim)
    rotary.build(CPU, context)
    return rotary


def _longrope(half: int, **extra) -> dict:
    return {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.5 * i for i in range(half)],
        "long_factor": [3.0 + 4.0 * i for i in range(half)],
        "original_max_position_embeddings": 64,
        **extra,
    }


@pytest.mark.parametrize(("head_dim", "rotary_dim"), [(16, 16), (16, 12), (64, 48), (32, 2)])
def test_rotate_turns_the_first_rotary_dims_and_passes_the_rest(head_dim, rotary_dim):
    torch.manual_seed(0)
    rotary = _built(head_dim, rotary_dim)
    positions = torch.tensor([0, 1, 7, 300, 511])
    x = torch.randn(5, 6, head_dim)  # [T, heads, D]
    tables = rotary.cos_sin_for(positions, torch.float32)
    assert tables.cos.shape == (5, 1, rotary_dim) and rotary.cos_sin is not None
    cos, sin = rotary.cos_sin[positions, 0][:, None], rotary.cos_sin[positions, 1][:, None]
    got = tables.rotate(x)
    torch.testing.assert_close(got, _hf_rotate(x, cos, sin), atol=1e-6, rtol=1e-6)
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2).double() / rotary_dim)
    angle = positions[:, None].double() * inv_freq  # [T, R/2]; the table is float32
    torch.testing.assert_close(
        cos[:, 0, : rotary_dim // 2].double(), angle.cos(), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize(("context", "kind"), [(None, "long_factor"), (65, "long_factor"),
                                              (64, "short_factor"), (10, "short_factor")])  # fmt: skip
def test_longrope_turns_every_position_with_the_factors_of_the_served_context(context, kind):
    """Serving past the original context (64; the default serves all 512): the long factors
    at every position, else the short ones."""
    rotary = _built(16, 12, _longrope(6), context)
    scaling = _longrope(6)
    attention = math.sqrt(1 + math.log(512 / 64) / math.log(64))
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 12, 2).double() / 12)
    assert rotary.cos_sin is not None
    for position in (0, 1, 63, 64, 65, 511):
        angle = position * inv_freq / torch.tensor(scaling[kind], dtype=torch.float64)
        row = rotary.cos_sin[position].double()  # [2, R]
        torch.testing.assert_close(row[0, :6], angle.cos() * attention, atol=1e-5, rtol=0)
        torch.testing.assert_close(row[1, 6:], angle.sin() * attention, atol=1e-5, rtol=0)


def test_longrope_table_equals_transformers_within_and_past_the_original_context():
    """Served up to 64 tokens, the table is transformers' for a short sequence; served
    longer, its table for a long one (Phi-4-mini's shape: partial rotary and longrope)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = _longrope(6)
    config = AutoConfig.for_model(
        "phi3", hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=512,
        partial_rotary_factor=0.75, rope_scaling=dict(scaling),
        original_max_position_embeddings=64,
    )  # fmt: skip
    for seq_len in (64, 512):
        rotary = _built(16, 12, scaling, seq_len)
        assert rotary.cos_sin is not None
        inv_freq, attention = ROPE_INIT_FUNCTIONS["longrope"](config, CPU, seq_len=seq_len)
        freqs = torch.arange(512).float()[:, None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        torch.testing.assert_close(rotary.cos_sin[:, 0], emb.cos() * attention)
        torch.testing.assert_close(rotary.cos_sin[:, 1], emb.sin() * attention)


def test_longrope_attention_factor_and_factor_when_given():
    given = LongRope.parse(_longrope(4, attention_factor=1.5), 8, 512)
    assert given.attention_factor == 1.5
    by_factor = LongRope.parse(_longrope(4, factor=4.0), 8, 512)
    assert by_factor.attention_factor == pytest.approx(math.sqrt(1 + math.log(4) / math.log(64)))
    not_extended = LongRope.parse(_longrope(4), 8, 64)  # max_positions == original
    assert not_extended.attention_factor == 1.0


@pytest.mark.parametrize("missing", ["short_factor", "long_factor"])
def test_longrope_without_its_factors_is_refused_by_name(missing):
    scaling = _longrope(4)
    del scaling[missing]
    with pytest.raises(ModelLoadError, match=missing):
        _built(8, 8, scaling)


def test_longrope_factors_must_cover_the_rotated_dims():
    with pytest.raises(ModelLoadError, match="short_factor has 8 entries.*need 6"):
        _built(16, 12, _longrope(8))  # factors for 16 dims, 12 rotate


@pytest.mark.parametrize("rotary_dim", [11, 18])
def test_rotary_dims_must_be_even_and_within_the_head(rotary_dim):
    with pytest.raises(ModelLoadError, match="even number, at most"):
        RotaryEmbedding(16, 512, 10000.0, None, rotary_dim)
