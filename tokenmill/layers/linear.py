"""Linear layers: the ones models build (shard-aware, several checkpoint projections
fused into one), and the compact forms a backend swaps in at load (tokenmill/backends/
formats.py says which runs where).

A model's fused projection (q|k|v, gate|up) is a `ColumnLinear` with one output size per
checkpoint part; its `weight_loader` copies each part into its rows. Both column and row
layers know their tensor-parallel rank and size (the group the model is built for,
tokenmill/distributed): a checkpoint tensor is narrowed to the rank's share as it loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed import group as parallel
from tokenmill.errors import ModelLoadError
from tokenmill.kernels import quant_matmul

# HF weight name -> (GGML type, [N, row_bytes] uint8 blocks), or None when not stored quantized
BlockLookup = Callable[[str], "tuple[int, torch.Tensor] | None"]
# a module's copy of a checkpoint tensor (or a fused one's shard) into one of its parameters
WeightLoader = Callable[[torch.Tensor, torch.Tensor, "int | None"], None]


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor, shard: int | None) -> None:
    """Copy a checkpoint tensor into a parameter of the same shape."""
    if shard is not None:
        raise ModelLoadError(f"a shard ({shard}) of a parameter that is not fused")
    _copy(param, loaded, "")


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ModelLoadError(
            f"weight{what}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}"
        )
    with torch.no_grad():
        dst.copy_(src)


Shard = tuple[int, int]  # (first row or column of the full tensor, how many) a rank holds


class ColumnLinear(nn.Linear):
    """y = x W^T + b, W's output rows split across tensor-parallel ranks; the checkpoint
    may store W as several projections (`output_sizes`, full sizes) fused here in order.
    `shards`: the rows of each part this rank holds (start, size); by default the rank's
    even share of each (the attention gives its own where key/value heads are replicated)."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        bias: bool,
        tp_rank: int | None = None,
        tp_size: int | None = None,
        shards: list[Shard] | None = None,
    ):
        group = parallel.current()
        tp_rank = group.rank if tp_rank is None else tp_rank
        tp_size = group.size if tp_size is None else tp_size
        if shards is None:
            if any(size % tp_size for size in output_sizes):
                raise ModelLoadError(f"output sizes {output_sizes} do not split into {tp_size}")
            shards = [(tp_rank * (s // tp_size), s // tp_size) for s in output_sizes]
        self.full_sizes, self.shards = list(output_sizes), list(shards)
        self.output_sizes = [size for _, size in shards]  # this rank's
        self.tp_rank, self.tp_size = tp_rank, tp_size
        super().__init__(in_features, sum(self.output_sizes), bias=bias)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard: int | None) -> None:
        """Part `shard` (None: the whole fused tensor) of the checkpoint's W or b."""
        parts = range(len(self.output_sizes)) if shard is None else [shard]
        full = sum(self.full_sizes[i] for i in parts)
        if loaded.shape[0] != full:
            mine = sum(self.output_sizes[i] for i in parts)
            raise ModelLoadError(
                f"weight shard {shard}: shape {tuple(loaded.shape)} does not fit "
                f"{(mine * self.tp_size, *param.shape[1:])}"
            )
        offset, source = sum(self.output_sizes[: parts[0]]), 0
        for i in parts:  # each part's slice for this rank
            start, size = self.shards[i]
            piece = loaded.narrow(0, source + start, size)
            _copy(param.narrow(0, offset, size), piece, f" shard {shard}")
            offset, source = offset + size, source + self.full_sizes[i]

    def checkpoint_slices(self) -> list[tuple[int, int, int]]:
        """Per checkpoint part: (dimension, start, size) of the full tensor this rank holds."""
        return [(0, start, size) for start, size in self.shards]


class RowLinear(nn.Linear):
    """y = x W^T + b, W's input columns split across tensor-parallel ranks (the layer after
    a ColumnLinear: o_proj, down_proj). Each rank computes a partial sum; the model adds
    them up with `tp.all_reduce` (after the backend may have swapped this module for a
    packed one, so the sum is the model's call, not this module's). The bias is the
    leader's alone (zero on the other ranks), so the sum adds it once."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        tp_rank: int | None = None,
        tp_size: int | None = None,
    ):
        group = parallel.current()
        tp_rank = group.rank if tp_rank is None else tp_rank
        tp_size = group.size if tp_size is None else tp_size
        if in_features % tp_size:
            raise ModelLoadError(f"input size {in_features} does not split into {tp_size}")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.full_in_features = in_features
        super().__init__(in_features // tp_size, out_features, bias=bias)

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard: int | None) -> None:
        if shard is not None:
            raise ModelLoadError(f"a shard ({shard}) of a parameter that is not fused")
        if param.dim() == 2:  # the weight: this rank's columns
            size = param.shape[1]
            if loaded.dim() == 2 and loaded.shape[1] == size * self.tp_size:
                loaded = loaded.narrow(1, self.tp_rank * size, size)
        elif self.tp_rank > 0:  # the bias: added once, by the leader
            loaded = torch.zeros_like(loaded)
        _copy(param, loaded, "")

    def checkpoint_slices(self) -> list[tuple[int, int, int]]:
        size = self.in_features
        return [(1, self.tp_rank * size, size)]


def shard_blocks(
    blocks: tuple[int, torch.Tensor] | None, dim: int, start: int, size: int
) -> tuple[int, torch.Tensor] | None:
    """A GGUF tensor's blocks (type, [N, row_bytes]) narrowed to this rank's rows (dim 0)
    or columns (dim 1) [start, start + size); None where there are none or the columns do
    not fall on block boundaries."""
    if blocks is None:
        return None
    ggml_type, data = blocks
    if dim == 0:
        return (ggml_type, data.narrow(0, start, size)) if start + size <= len(data) else None
    layout = quant_matmul.BLOCK_LAYOUT.get(ggml_type)
    if layout is None or start % layout[0] or size % layout[0]:
        return None
    values, nbytes = layout
    return ggml_type, data.narrow(1, start // values * nbytes, size // values * nbytes)


class TransposedHead(nn.Module):
    """The output projection W [V, C] with a copy of W^T [C, V] for few rows: a GEMM over
    W^T beats the GEMV over W at 1-3 rows on CPU BLAS, the reverse from 4 rows on
    (docs/benchmarks.md, "Weight formats"); costs V*C more floats."""

    max_rows = 3

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight.detach()
        self.weight_t = weight.detach().t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, C] -> [T, V]
        if x.shape[0] <= self.max_rows:
            return torch.mm(x, self.weight_t)
        return F.linear(x, self.weight)


class PackedLinear(nn.Module):
    """y = x W^T + b with W [N, K] frozen as float16 (CPU, float32 in and out): in panels
    for the native kernel (quant_matmul.c; `native`), else in fbgemm's packed layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, native: bool):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight, bias = weight.detach(), None if bias is None else bias.detach().float()
        self.native = native
        if native:  # (from any float dtype: a float16 weight packs without a float32 copy)
            self.panels = quant_matmul.pack_f16(weight)
            self.bias = bias
        else:
            with _fbgemm_engine():
                self.packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), bias)

    @property
    def weight_bytes(self) -> int:
        """Bytes of packed weight a forward pass reads (scales and bias not counted)."""
        return self.out_features * self.in_features * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        if self.native:
            return quant_matmul.f16_matmul(x, self.panels, self.out_features, self.bias)
        return torch.ops.quantized.linear_dynamic_fp16(x, self.packed)

    def extra_repr(self) -> str:
        kernel = "native" if self.native else "fbgemm"
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16, {kernel}"


class GGUFLinear(nn.Module):
    """y = x W^T + b with W [N, K] kept as GGUF blocks (Q4_1, Q8_0, Q5_0, Q5_1, Q4_K, Q5_K,
    Q6_K), repacked in the native kernel's panels (CPU, float32 in and out; quant_matmul.py
    says which format each type takes and what the repacking rounds: Q4_K and Q5_K's scales
    to float16). `parts`: the rows of W as (GGML type, blocks), one or several (a fused
    projection; types that differ share one format where one holds them all).
    int8_activations: x is quantized to int8 per 32-value block and each block's dot
    product is integer (llama.cpp's numerics); else float32 math over the dequantized
    weights. The bias is a float32 parameter: on a model still on the meta device, loading
    fills it through `weight_loader` (the replaced linear's: shards, ranks)."""

    def __init__(
        self,
        parts: list[tuple[int, torch.Tensor]],
        in_features: int,
        bias: torch.Tensor | None,
        int8_activations: bool = False,
        weight_loader: WeightLoader | None = None,
    ):
        super().__init__()
        types = {t for t, _ in parts}
        self.part_types = [t for t, _ in parts]
        self.format, self.values, self.scales = quant_matmul.pack_parts(
            parts, in_features, int8_activations
        )
        # the GGML type, or the kernel's format when the parts differ
        self.ggml_type = types.pop() if len(types) == 1 else self.format
        self.in_features, self.out_features = in_features, sum(len(b) for _, b in parts)
        self.int8_activations = int8_activations
        self.bias = _float_bias(bias)
        if weight_loader is not None:
            self.weight_loader = weight_loader

    @property
    def weight_bytes(self) -> int:
        values = self.values.numel() * self.values.element_size()
        return values + self.scales.numel() * self.scales.element_size()

    @property
    def kernel_type(self) -> int:
        """The type argument of the native kernel: the format the GGML type is packed in,
        with its int8 flag."""
        return quant_matmul.kernel_type(self.ggml_type, self.int8_activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        return quant_matmul.quant_matmul(
            x, self.values, self.scales, self.ggml_type, self.out_features, self.bias,
            self.int8_activations,
        )  # fmt: skip

    def extra_repr(self) -> str:
        activations = "int8" if self.int8_activations else "float32"
        types = "|".join(quant_matmul.type_name(t) for t in self.part_types)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"types={types}, format={quant_matmul.type_name(self.format)}, "
            f"activations={activations}"
        )


class SplitGGUFLinear(nn.Module):
    """A fused projection whose parts no one kernel format holds (larger models' Q4_K_M:
    Q4_K q|k beside a Q6_K v): runs of consecutive parts one format holds, each a
    GGUFLinear of its own blocks, their outputs side by side, then the bias (the whole
    projection's, loaded as GGUFLinear's is). Not a projection the fused decode step reads
    (a model with one decodes layer by layer)."""

    def __init__(
        self,
        pieces: list[GGUFLinear],
        bias: torch.Tensor | None = None,
        weight_loader: WeightLoader | None = None,
    ):
        super().__init__()
        self.pieces = nn.ModuleList(pieces)
        self.in_features = pieces[0].in_features
        self.out_features = sum(p.out_features for p in pieces)
        self.bias = _float_bias(bias)
        if weight_loader is not None:
            self.weight_loader = weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, K] -> [T, N]
        y = torch.cat([piece(x) for piece in self.pieces], dim=-1)
        return y if self.bias is None else y + self.bias


def _float_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    """A bias as a float32 parameter (a meta one stays meta until the model is allocated)."""
    if bias is None:
        return None
    return nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)


def gguf_linear(
    linear: nn.Linear | torch.Tensor,
    parts: list[tuple[int, torch.Tensor] | None],
    int8_activations: bool = False,
) -> GGUFLinear | SplitGGUFLinear | None:
    """The GGUFLinear of a layer whose weight is the row-wise concatenation of `parts`
    (fused projections; a SplitGGUFLinear where no one format holds them all), or None
    when a part is not stored in a type the kernel reads or the blocks do not pack
    (gguf_fallback_reason says which)."""
    if gguf_fallback_reason(linear, parts) is not None:
        return None
    weight = linear.weight if isinstance(linear, nn.Linear) else linear
    bias = linear.bias if isinstance(linear, nn.Linear) else None
    loader = getattr(linear, "weight_loader", None)
    kept = [p for p in parts if p is not None]
    try:
        if quant_matmul.common_format({t for t, _ in kept}) is not None:
            return GGUFLinear(kept, weight.shape[1], bias, int8_activations, loader)
        pieces = [
            GGUFLinear(run, weight.shape[1], None, int8_activations) for run in _format_runs(kept)
        ]
        return SplitGGUFLinear(pieces, bias, loader)
    except ValueError:  # e.g. a K-quant scale beyond float16
        return None


def _format_runs(
    parts: list[tuple[int, torch.Tensor]],
) -> list[list[tuple[int, torch.Tensor]]]:
    """`parts` cut into the fewest runs of consecutive parts that one format holds."""
    runs: list[list[tuple[int, torch.Tensor]]] = [[]]
    for part in parts:
        types = {t for t, _ in runs[-1]} | {part[0]}
        if runs[-1] and quant_matmul.common_format(types) is None:
            runs.append([])
        runs[-1].append(part)
    return runs


def gguf_fallback_reason(
    linear: nn.Linear | torch.Tensor, parts: list[tuple[int, torch.Tensor] | None]
) -> str | None:
    """Why gguf_linear would not keep these parts as blocks ("not stored quantized" for
    float tensors, "Q4_0 not read by the kernel", "shape"), or None when it would (up to
    packing)."""
    if not parts or any(p is None for p in parts):
        return "not stored quantized"
    types = {p[0] for p in parts if p is not None}
    if types <= {0, 1, 30}:  # F32, F16, BF16
        return "not stored quantized"
    unread = sorted(t for t in types if t not in quant_matmul.BLOCK_LAYOUT)
    if unread:
        return "/".join(quant_matmul.type_name(t) for t in unread) + " not read by the kernel"
    weight = linear.weight if isinstance(linear, nn.Linear) else linear
    rows = sum(p[1].shape[0] for p in parts if p is not None)
    if rows != weight.shape[0] or any(
        weight.shape[1] % quant_matmul.BLOCK_LAYOUT[t][0] for t in types
    ):
        return "shape"
    return None


def fbgemm_available() -> bool:
    """Whether this PyTorch build has fbgemm (x86 CPUs) for its float16 GEMM."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and packed weight under `module`."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    packed = (m for m in module.modules() if isinstance(m, PackedLinear | GGUFLinear))
    return params + sum(m.weight_bytes for m in packed)


@contextmanager
def _fbgemm_engine() -> Iterator[None]:
    """Pack for fbgemm (the packed object keeps its backend, so running needs no global)."""
    saved = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        torch.backends.quantized.engine = saved
