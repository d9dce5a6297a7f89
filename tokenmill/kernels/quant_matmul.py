"""Python side of quant_matmul.c: x @ W^T with W kept in a compact format: its GGUF blocks
(Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), or float16 in panels of 16 output columns. GGUF
blocks multiply float32 activations, or (int8_activations) activations quantized to int8
per 32-value block with integer dot products, as llama.cpp does.

The kernel reads four formats (KERNEL_FORMAT), each GGUF type repacked at load into one:
Q4_1 (4-bit values, per-32 float16 d and m) also holds Q4_K, whose per-32 sub-block scale
d * sc and min -dmin * m are rounded to float16 (relative error at most 2^-11 each; exact
for Q4_1 itself); Q5_1 (5-bit values, per-32 float16 d and m) holds Q5_1 and Q5_0 exactly
(m = -16 d) and Q5_K with the same float16 rounding as Q4_K; Q8_0 (int8 values, per-32
float16 d; Q5_0 too, exactly); Q6_K (int8 values q - 32, per-16 float32 scale d * sc,
exact; Q8_0 and Q5_0 too). A fused projection whose parts differ in type takes the format
with the fewest bytes that holds them all (FORMATS; e.g. Q5_0 q|k with a Q8_0 v: Q8_0)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from tokenmill.kernels import function

# GGML type ids the kernel reads, and (values per block, bytes per block)
GGML_Q4_1, GGML_Q5_0, GGML_Q5_1, GGML_Q8_0 = 3, 6, 7, 8
GGML_Q4_K, GGML_Q5_K, GGML_Q6_K = 12, 13, 14
BLOCK_LAYOUT = {
    GGML_Q4_1: (32, 20),
    GGML_Q8_0: (32, 34),
    GGML_Q5_0: (32, 22),
    GGML_Q5_1: (32, 24),
    GGML_Q4_K: (256, 144),
    GGML_Q5_K: (256, 176),
    GGML_Q6_K: (256, 210),
}
# the kernel's formats (GGML type ids), fewest bytes first, and the GGUF types each holds
# (exactly, but for Q4_K/Q5_K's float16 scales): a fused projection whose parts differ in
# type takes the first format that holds them all
FORMATS = {
    GGML_Q4_1: {GGML_Q4_1, GGML_Q4_K},
    GGML_Q5_1: {GGML_Q4_1, GGML_Q4_K, GGML_Q5_0, GGML_Q5_1, GGML_Q5_K},
    GGML_Q8_0: {GGML_Q8_0, GGML_Q5_0},  # Q5_0: values q - 16
    GGML_Q6_K: {GGML_Q6_K, GGML_Q8_0, GGML_Q5_0},  # per-32 scales twice
}


def common_format(ggml_types: set[int] | list[int]) -> int | None:
    """The kernel format that holds every one of `ggml_types`, or None."""
    return next((f for f, held in FORMATS.items() if set(ggml_types) <= held), None)


# the format each GGUF type alone is repacked into
KERNEL_FORMAT = {t: common_format({t}) or 0 for t in BLOCK_LAYOUT}
INT8_ACTIVATIONS = 256  # type flag: int8 activations, values in dot-product order


def kernel_type(ggml_type: int, int8_activations: bool) -> int:
    """The kernel's type argument: the format `ggml_type` is packed in, flagged when
    activations are int8."""
    return KERNEL_FORMAT[ggml_type] | (INT8_ACTIVATIONS if int8_activations else 0)


_TYPE_NAMES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0"}
_TYPE_NAMES |= {9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
_TYPE_NAMES |= {15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S"}
_TYPE_NAMES |= {20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 29: "IQ1_M", 30: "BF16"}
_TYPE_NAMES |= {34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4"}


def type_name(ggml_type: int) -> str:
    """GGML's name of a type id ("Q4_K"), for messages."""
    return _TYPE_NAMES.get(ggml_type, f"type {ggml_type}")


def values_per_scale(ggml_type: int) -> int:
    """How many values of a packed row of this type (or format) share one scale (G in
    quant_matmul.c)."""
    return 16 if KERNEL_FORMAT[ggml_type] == GGML_Q6_K else 32


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _function() -> Callable[..., int] | None:
    args = [_ptr, _i64, _i64, _ptr, _ptr, _i64, ctypes.c_int, _ptr, _ptr, ctypes.c_int]
    return function("tm_quant_matmul", *args)


def _f16_function() -> Callable[..., int] | None:
    args = [_ptr, _i64, _i64, _ptr, _i64, _ptr, _ptr, ctypes.c_int]
    return function("tm_f16_matmul", *args)


def available() -> bool:
    return _function() is not None


def vectorized() -> bool:
    """Whether the kernels run their vector tiles here (x86 with AVX2, FMA, F16C); elsewhere
    a portable scalar path computes the same chains, far slower."""
    fn = function("tm_matmul_vectorized")
    return fn is not None and fn() == 1


PANEL = 16  # output columns per panel (float16 and GGUF layouts)


def pack_f16(weight: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> float16 panels [ceil(N/16), K, 16] (output columns zero-padded)."""
    out_features, in_features = weight.shape
    panels = -(-out_features // PANEL)
    padded = weight.new_zeros(panels * PANEL, in_features, dtype=torch.float16)
    padded[:out_features] = weight
    return padded.view(panels, PANEL, in_features).transpose(1, 2).contiguous()


def f16_matmul(
    x: torch.Tensor,  # [M, K] float32
    panels: torch.Tensor,  # from pack_f16
    out_features: int,
    bias: torch.Tensor | None = None,  # [N] float32
) -> torch.Tensor:  # [M, N]
    """x W^T (+ bias) in float32 math over float16 weights; every output is one fused
    multiply-add chain over k in order, so a row's result never depends on its batch."""
    fn = _f16_function()
    assert fn is not None, "check available() first"
    return _run(
        "float16 matmul",
        fn,
        x,
        panels.shape[1],
        panels.shape[0],
        (panels.data_ptr(),),
        (),
        out_features,
        bias,
    )


def _halves(raw: torch.Tensor) -> torch.Tensor:  # [n, 2] bytes -> [n] float32
    return raw.contiguous().view(torch.float16).squeeze(-1).float()


def _bits(words: torch.Tensor, count: int) -> torch.Tensor:  # [n, 4] bytes -> [n, count] 0/1
    word = words.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((word >> torch.arange(count)) & 1).to(torch.uint8)


def _k_scales(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    d, m, md = raw.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=-1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=-1)
    return sc.float(), mn.float()


def _decode(
    raw: torch.Tensor, ggml_type: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Blocks [n, block_bytes] -> (q [n, values] integers, d [n, values/G] and m (or None)
    float32) with w = d * q + m per G values, as the kernel's format stores them."""
    n = raw.shape[0]
    if ggml_type == GGML_Q8_0:
        return raw[:, 2:].contiguous().view(torch.int8), _halves(raw[:, :2]).unsqueeze(1), None
    if ggml_type in (GGML_Q4_1, GGML_Q5_0, GGML_Q5_1):
        start = {GGML_Q4_1: 4, GGML_Q5_0: 6, GGML_Q5_1: 8}[ggml_type]
        qs = raw[:, start:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1)  # value j: low nibble of byte j, j + 16: high
        if ggml_type != GGML_Q4_1:
            q |= _bits(raw[:, start - 4 : start], 32) << 4
        d = _halves(raw[:, :2]).unsqueeze(1)
        m = -16.0 * d if ggml_type == GGML_Q5_0 else _halves(raw[:, 2:4]).unsqueeze(1)
        return q, d, m
    if ggml_type in (GGML_Q4_K, GGML_Q5_K):
        d, dmin = _halves(raw[:, :2]).unsqueeze(1), _halves(raw[:, 2:4]).unsqueeze(1)
        sc, mn = _k_scales(raw[:, 4:16])
        qs = raw[:, -128:].reshape(n, 4, 1, 32)  # 64 values per 32 bytes: low nibbles first
        q = torch.cat([qs & 15, qs >> 4], dim=2).reshape(n, 8, 32)
        if ggml_type == GGML_Q5_K:  # bit j of qh byte i: the fifth bit of sub-block j's value i
            q |= (
                (raw[:, 16:48].unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)[:, None]) & 1
            ) << 4
        return q.reshape(n, 256), d * sc, -(dmin * mn)
    if ggml_type == GGML_Q6_K:
        ql = raw[:, :128].reshape(n, 2, 1, 64)
        ql = torch.cat([ql & 15, ql >> 4], dim=2).reshape(n, 8, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)[:, None]
        qh = ((raw[:, 128:192].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
        q = (ql | (qh << 4)).to(torch.int8) - 32
        sc = raw[:, 192:208].contiguous().view(torch.int8).float()
        return q.reshape(n, 256), _halves(raw[:, 208:210]).unsqueeze(1) * sc, None
    raise ValueError(f"quant_matmul cannot read type {ggml_type}")


def _words(bits: torch.Tensor, width: int) -> torch.Tensor:
    """0/1 [..., width] -> [..., width / 8] little-endian bytes of sum(bit_j << j)."""
    word = (bits.to(torch.int64) << torch.arange(width)).sum(-1)
    return word.unsqueeze(-1).view(torch.uint8)[..., : width // 8]


def _decode_rows(
    blocks: torch.Tensor, ggml_type: int, in_features: int, fmt: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GGUF rows [N, row_bytes] -> (q [N, K], d [N, K/G], m or None) in format `fmt`."""
    values_per_block, block_bytes = BLOCK_LAYOUT.get(ggml_type, (32, 0))
    if block_bytes == 0 or in_features % values_per_block or ggml_type not in FORMATS[fmt]:
        raise ValueError(f"quant_matmul reads {sorted(BLOCK_LAYOUT)} rows, not type {ggml_type}")
    num_blocks = in_features // values_per_block
    if blocks.dtype != torch.uint8 or blocks.shape[1] != num_blocks * block_bytes:
        raise ValueError(
            f"quant_matmul: rows of {blocks.shape[1]} bytes for {in_features} "
            f"type-{ggml_type} values"
        )
    rows = blocks.shape[0]
    q, d, m = _decode(blocks.reshape(rows * num_blocks, block_bytes), ggml_type)
    if fmt in (GGML_Q8_0, GGML_Q6_K) and ggml_type == GGML_Q5_0:  # signed: w = d (q - 16)
        q, m = q.to(torch.int8) - 16, None
    if fmt == GGML_Q6_K and ggml_type != GGML_Q6_K:  # one scale per 16 values
        d = d.repeat_interleave(2, dim=1)
    group = values_per_scale(fmt)
    d = d.reshape(rows, in_features // group)
    return q.reshape(rows, in_features), d, None if m is None else m.reshape(rows, -1)


def pack_blocks(
    blocks: torch.Tensor, ggml_type: int, in_features: int, int8_activations: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF rows [N, row_bytes] -> (values, scales) in the kernel's panels of 16 output
    columns, in KERNEL_FORMAT[ggml_type] (see quant_matmul.c; int8_activations: values in
    dot-product order); output columns zero-padded to a whole panel. Raises ValueError for
    a type the kernel does not read, rows of the wrong size, or a K-quant scale that does
    not fit float16."""
    if ggml_type not in BLOCK_LAYOUT:
        raise ValueError(f"quant_matmul reads {sorted(BLOCK_LAYOUT)} rows, not type {ggml_type}")
    return pack_parts([(ggml_type, blocks)], in_features, int8_activations)[1:]


def pack_parts(
    parts: list[tuple[int, torch.Tensor]], in_features: int, int8_activations: bool = False
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """pack_blocks of the row-wise concatenation of GGUF rows of several types (a fused
    projection's parts) in common_format of their types: (format, values, scales)."""
    fmt = common_format({t for t, _ in parts})
    if fmt is None:
        raise ValueError(f"quant_matmul: no format holds types {sorted({t for t, _ in parts})}")
    decoded = [_decode_rows(b, t, in_features, fmt) for t, b in parts]
    q = torch.cat([p[0] for p in decoded])
    d = torch.cat([p[1] for p in decoded])
    ms = [p[2] for p in decoded]
    m = None if ms[0] is None else torch.cat([x for x in ms if x is not None])
    return (fmt, *_pack(q, d, m, fmt, in_features, int8_activations))


def _pack(
    q: torch.Tensor,
    d: torch.Tensor,
    m: torch.Tensor | None,
    fmt: int,
    in_features: int,
    int8_activations: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [N, K], d and m [N, K/G]) in format `fmt` -> the kernel's (values, scales)."""
    rows, group, ggml_type = q.shape[0], values_per_scale(fmt), fmt
    panels, nb = -(-rows // PANEL), in_features // 32
    q = torch.cat([q, q.new_zeros(panels * PANEL - rows, in_features)])
    q = q.view(panels, PANEL, in_features)

    def scale(s: torch.Tensor) -> torch.Tensor:  # [rows, K/G] -> [panels, K/G, 16]
        s = s.reshape(rows, in_features // group)
        s = torch.cat([s, s.new_zeros(panels * PANEL - rows, s.shape[1])])
        s = s.view(panels, PANEL, -1).transpose(1, 2)
        if fmt == GGML_Q6_K:
            return s
        if (torch.isfinite(s) & ~torch.isfinite(s.half())).any():  # rounded past float16
            raise ValueError(f"quant_matmul: type-{ggml_type} scales beyond float16")
        return s.half()

    scales = torch.stack([scale(d)] + ([] if m is None else [scale(m)]), dim=2)
    if fmt in (GGML_Q8_0, GGML_Q6_K):
        if int8_activations:  # [panels, blocks, group, j, column, i]: value 4j + i
            values = q.reshape(panels, 2, 8, nb, 8, 4).permute(0, 3, 1, 4, 2, 5)
        else:
            values = q.transpose(1, 2)
        return values.contiguous(), scales.contiguous()
    low, fifth = q & 15, q >> 4
    if int8_activations:  # [panels, blocks, group, v, column, i]: values 4v+i | 16+4v+i
        nibbles = low.reshape(panels, 2, 8, nb, 2, 4, 4)
        values = (nibbles[:, :, :, :, 0] | (nibbles[:, :, :, :, 1] << 4)).permute(0, 3, 1, 4, 2, 5)
        if fmt == GGML_Q5_1:  # then a plane: byte 4c + i, bit 2v + h = value 16h + 4v + i's
            high = fifth.reshape(panels, 2, 8, nb, 2, 4, 4).permute(0, 3, 1, 2, 6, 5, 4)
            plane = _words(high.reshape(panels, nb, 2, 32, 8), 8)
            values = torch.cat(
                [values.reshape(panels, nb, 2, 128), plane.reshape(panels, nb, 2, 32)], dim=-1
            )
    else:  # byte j: columns j, j + 8 at k
        values = (low[:, :8] | (low[:, 8:] << 4)).transpose(1, 2)
        if fmt == GGML_Q5_1:  # per 32 k: the 32 x 8 bytes, then 32 uint16 of fifth bits
            words = _words(fifth.transpose(1, 2), 16)  # [panels, K, 2]
            values = torch.cat(
                [values.reshape(panels, nb, 256), words.reshape(panels, nb, 64)], dim=-1
            )
    return values.contiguous(), scales.contiguous()


def quant_matmul(
    x: torch.Tensor,  # [M, K] float32
    values: torch.Tensor,  # from pack_blocks
    scales: torch.Tensor,
    ggml_type: int,
    out_features: int,
    bias: torch.Tensor | None = None,  # [N] float32
    int8_activations: bool = False,  # as the values were packed
) -> torch.Tensor:  # [M, N]
    """x W^T (+ bias) with W the GGUF blocks packed by pack_blocks: float32 math, or x
    quantized to int8 per 32-value block and integer dot products per block."""
    fn = _function()
    assert fn is not None, "check available() first"
    weights = (values.data_ptr(), scales.data_ptr())
    in_features = scales.shape[1] * values_per_scale(ggml_type)
    return _run(
        "quantized matmul",
        fn,
        x,
        in_features,
        values.shape[0],
        weights,
        (kernel_type(ggml_type, int8_activations),),
        out_features,
        bias,
    )


def _run(
    what: str,
    fn: Callable[..., int],
    x: torch.Tensor,
    in_features: int,  # the weight's shape: K, and output columns in panels of 16
    num_panels: int,
    weights: tuple[int, ...],  # the weight's pointers
    format_args: tuple[int, ...],
    out_features: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Check the shapes, then y [M, N] = fn(x [M, K], weights, N, format, bias) on torch's
    thread count."""
    if x.shape[-1] != in_features or num_panels * PANEL < out_features:
        raise ValueError(
            f"{what}: x has {x.shape[-1]} features, the weight {in_features} "
            f"by {out_features} in {num_panels} panels"
        )
    x = x.contiguous()
    y = x.new_empty(x.shape[0], out_features)
    if x.shape[0] == 0:
        return y
    bias_ptr = None if bias is None else bias.data_ptr()
    rows, threads = x.shape[0], torch.get_num_threads()
    status = fn(x.data_ptr(), rows, in_features, *weights, out_features, *format_args, bias_ptr, y.data_ptr(), threads)  # fmt: skip
    if status != 0:
        raise RuntimeError(f"{what} failed (M {rows}, K {in_features}, format {format_args})")
    return y
