"""`--quantization rtn`: vLLM's online round-to-nearest weight quantization, for float
checkpoints (safetensors) on CPU.

At load, every linear's float weights are rounded to GGUF blocks, then run exactly as a
GGUF file's (GGUFLinear: the native kernel, activations quantized to int8 per 32 values,
the first layer's in float32; formats.py). As vLLM, `RTN_NUM_BITS` picks the width:
- 8 (the default): Q8_0, per 32 weights one float16 scale d = max|w| / 127 and
  q = round(w / d) in [-127, 127];
- 4: Q4_1, per 32 weights a float16 scale d = (max - min) / 15 and minimum m, and
  q = round((w - min) / d) in [0, 15].
The rounding is llama.cpp's own (quantize_row_q8_0_ref / quantize_row_q4_1_ref: halves
away from zero), so the blocks equal what llama-quantize writes for the same float weights.
vLLM groups `RTN_GROUP_SIZE` weights (default 128) under one scale; GGUF blocks are 32,
finer (a logged line says so when the variable asks for another size). The output
projection is always Q8_0 (as llama.cpp keeps it wider than 4 bits), and so is the token
embedding (a GGUFEmbedding, where nothing else reads its table); a linear whose input
size is not a multiple of 32, and a mixture of experts' router (as vLLM), are packed as
"fp16" instead. A mixture's experts are rounded expert by expert (PackedExperts).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from tokenmill.backends import formats
from tokenmill.errors import ModelLoadError
from tokenmill.kernels.quant_matmul import BLOCK_LAYOUT, GGML_Q4_1, GGML_Q8_0, type_name
from tokenmill.layers.linear import GGUFLinear
from tokenmill.layers.moe import Router

logger = logging.getLogger(__name__)

GROUP = 32  # weights per GGUF block of Q8_0 and Q4_1
_TYPES = {8: GGML_Q8_0, 4: GGML_Q4_1}  # RTN_NUM_BITS -> GGML type


def weight_type() -> int:
    """The GGML type RTN_NUM_BITS asks for (Q8_0 by default)."""
    setting = os.environ.get("RTN_NUM_BITS", "8").strip()
    if setting not in ("4", "8"):
        raise ModelLoadError(f"RTN_NUM_BITS must be 4 or 8 for --quantization rtn, got {setting!r}")
    group = os.environ.get("RTN_GROUP_SIZE")
    if group is not None and group.strip() != str(GROUP):
        logger.warning(
            "quantization rtn: RTN_GROUP_SIZE=%s not used; GGUF blocks group %d weights",
            group,
            GROUP,
        )
    return _TYPES[int(setting)]


def quantize(weight: torch.Tensor, ggml_type: int) -> torch.Tensor:
    """[N, K] float weights (K a multiple of 32) as [N, K / 32 * block bytes] uint8 GGUF
    blocks of `ggml_type` (Q8_0 or Q4_1)."""
    rows, cols = weight.shape
    if cols % GROUP:
        raise ValueError(f"{cols} inputs is not a multiple of {GROUP}")
    x = weight.detach().float().reshape(rows, cols // GROUP, GROUP)
    if ggml_type == GGML_Q8_0:
        d = x.abs().amax(dim=-1, keepdim=True) / 127
        q = _round_away(x * _inverse(d)).to(torch.int8)
        parts = [_f16_bytes(d), q.view(torch.uint8)]
    elif ggml_type == GGML_Q4_1:
        low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
        d = (high - low) / 15
        q = ((x - low) * _inverse(d) + 0.5).trunc().clamp(max=15).to(torch.uint8)
        packed = q[..., : GROUP // 2] | (q[..., GROUP // 2 :] << 4)
        parts = [_f16_bytes(d), _f16_bytes(low), packed]
    else:
        raise ValueError(f"rtn does not write {type_name(ggml_type)}")
    blocks = torch.cat(parts, dim=-1)
    assert blocks.shape[-1] == BLOCK_LAYOUT[ggml_type][1]
    return blocks.reshape(rows, -1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, and 0 where d is 0 (an all-zero block stays zero)."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _round_away(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round takes them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """[..., 1] float32 as [..., 2] uint8: float16, little-endian as GGUF stores it."""
    return values.to(torch.float16).view(torch.uint8)


def rounds(linear: nn.Linear) -> bool:
    """Whether "rtn" rounds this linear: its input size a multiple of 32, and not a router
    (MoE's gates keep their float weights)."""
    return linear.in_features % GROUP == 0 and not isinstance(linear, Router)


def rounded(
    path: str, weight: torch.Tensor, bias: torch.Tensor | None, ggml_type: int
) -> GGUFLinear:
    """The GGUFLinear of the linear at `path` with its weights rounded to `ggml_type`
    blocks (the output projection, "lm_head", to Q8_0); int8 activations but in the
    layers formats.py keeps in float32."""
    kind = GGML_Q8_0 if path == "lm_head" else ggml_type
    int8 = not path.startswith(formats.FLOAT_ACTIVATION_LAYERS)
    return GGUFLinear([(kind, quantize(weight, kind))], weight.shape[1], bias, int8)
