"""The CPU backend: tokenmill/kernels where they run (float32 math), torch elsewhere.

- Weights: a pass over the model's linears packs them in the format formats.py chose
  (GGUF blocks, float16 panels or fbgemm), whatever the architecture.
- Ops: element-wise work of a layer in one native call each (kernels/layer_ops.c).
- Attention (`PagedAttention`): every row, decode or prefill, attends over the paged cache
  in place (kernels/paged_attention.c). A prefill row is a query over its sequence's first
  position + 1 keys, computed exactly as that token's decode would be: a token's attention,
  and with the batch-invariant matmuls its logits, never depend on how its prompt was
  chunked, batched or served from the prefix cache.
- A decode-only step runs all decoder layers in one native call (kernels/decode_step.c)
  where the model's layers are PreNormBlocks with projections in the kernels' formats.
"""

from __future__ import annotations

import logging
from array import array
from dataclasses import dataclass

import torch
from torch import nn

from tokenmill.backends import formats, rtn
from tokenmill.backends.base import Backend
from tokenmill.config import Quantization
from tokenmill.kernels import decode_step, gguf_rows, layer_ops, paged_attention, quant_matmul
from tokenmill.layers.attention import (
    AttentionMetadata,
    ScheduledChunk,
    StepLayout,
    TorchAttention,
    write_cache,
)
from tokenmill.layers.linear import (
    BlockLookup,
    GGUFLinear,
    PackedLinear,
    TransposedHead,
    gguf_fallback_reason,
    gguf_linear,
    shard_blocks,
)
from tokenmill.layers.moe import Experts, PackedExperts
from tokenmill.layers.ops import ForwardContext, KVCache, TorchOps
from tokenmill.layers.rotary import RotaryTables
from tokenmill.layers.vocab import GGUFEmbedding
from tokenmill.model.interface import CausalLM, checkpoint_weight_names

logger = logging.getLogger(__name__)


class NativeOps(TorchOps):
    """layer_ops.c: float32 CPU tensors."""

    name = "native"

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return layer_ops.silu_mul(gate_up)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = x.contiguous()
            return layer_ops.add_rms_norm(residual, residual, weight, eps, False), residual
        return layer_ops.add_rms_norm(x, residual, weight, eps), residual

    def rope_and_cache(
        self,
        qkv: torch.Tensor,
        rotary: RotaryTables,
        slots: torch.Tensor,
        kv_cache: KVCache,
        num_heads: int,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        k_cache, v_cache = kv_cache
        if rotary.table.shape[-1] != k_cache.shape[-1]:
            return None  # partial rotary: the kernel rotates whole heads
        return layer_ops.rope_and_cache(
            qkv, rotary.table, rotary.positions, slots, k_cache, v_cache, num_heads
        )


@dataclass(slots=True)
class PagedMetadata(AttentionMetadata):
    row_tables: torch.Tensor  # [T, max_blocks] int64, every row's block table
    row_lens: torch.Tensor  # [T] int64, keys each row attends (its position + 1)
    block_size: int


class PagedAttention:
    """kernels/paged_attention.c over the cache in place, for every row."""

    name = "paged"

    def build_metadata(self, layout: StepLayout) -> PagedMetadata:
        return PagedMetadata(
            layout.slot_mapping,
            layout.num_decodes,
            _row_tables(layout.chunks),
            layout.positions + 1,
            layout.block_size,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        cache_written: bool = False,
        scale: float | None = None,
        softcap: float | None = None,
        window: int | None = None,
    ) -> torch.Tensor:
        assert isinstance(meta, PagedMetadata)
        if softcap is not None:
            raise NotImplementedError("the native kernel does not soft-cap scores")
        if not cache_written:
            write_cache(k, v, kv_cache, meta.slot_mapping)
        k_cache, v_cache = kv_cache
        return paged_attention.paged_decode_attention(
            q, k_cache, v_cache, meta.row_tables, meta.row_lens, meta.block_size, scale, window
        )


def _row_tables(chunks: list[ScheduledChunk]) -> torch.Tensor:
    """Every row's block table [T, max_blocks] (zero-padded): a chunk's rows share its.
    (Copied as int64 bytes: a tensor from nested lists would cost ~10x more.)"""
    width = max(len(c.block_table) for c in chunks)
    pads = [array("q", bytes(8 * n)) for n in range(width + 1)]  # by what a table lacks
    padded = array("q")
    for chunk in chunks:
        table = chunk.block_table
        padded += table
        padded += pads[width - len(table)]
    tables = torch.frombuffer(padded, dtype=torch.long).view(len(chunks), width)
    counts = [c.num_tokens for c in chunks]
    if len(counts) == sum(counts):  # decodes only: a row per chunk
        return tables
    return tables.repeat_interleave(torch.tensor(counts), dim=0)


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, dtype: torch.dtype, kv_cache_dtype: torch.dtype, head_dim: int):
        super().__init__()
        cache = torch.empty(0, 1, head_dim, dtype=kv_cache_dtype)
        self.native = (
            dtype == torch.float32 and layer_ops.available() and paged_attention.supports(cache)
        )
        if self.native:
            self.ops = NativeOps()
            self.attention = PagedAttention()
        self.fused_decode = True  # decode-only steps in one native call, where layers allow
        self._fused: tuple[object, decode_step.DecodeLayers | None] | None = None
        self._rtn_ggml_type: int | None = None  # RTN_NUM_BITS's, once read

    @property
    def description(self) -> str:
        if self.native:
            return "native (element-wise ops, attention over the paged cache)"
        return "torch (no C compiler, TOKENMILL_NATIVE_KERNELS=0, or not CPU float32)"

    def keep_blocks(
        self, model: CausalLM, quantization: Quantization | None, blocks: BlockLookup | None
    ) -> frozenset[str]:
        """With "gguf*": GGUFLinear for every linear the checkpoint stores in a type the kernel
        reads, from its stored blocks; their weights are never dequantized, nor held in
        float32 while the model loads (docs/benchmarks.md, "Loading")."""
        if quantization not in ("gguf", "gguf-float32") or blocks is None:
            return frozenset()
        kept, left = _keep_gguf_blocks(model, blocks, quantization == "gguf")
        if left is not None:
            logger.info("weights: quantized linear layers loaded dequantized: %s", left)
        if kept:
            logger.info(
                "weights: %d linear layers kept as GGUF blocks, %s activations",
                len(kept),
                "int8" if quantization == "gguf" else "float32",
            )
        experts = _keep_gguf_experts(model, blocks, quantization == "gguf")
        if experts:
            logger.info("weights: the experts of %d layers kept as GGUF blocks", len(experts))
        names = {name for names in [*kept.values(), *experts.values()] for name in names}
        return frozenset(names | _keep_gguf_embedding(model, blocks))

    def check(self, quantization: Quantization | None) -> None:
        if quantization == "rtn":
            self._rtn_type()  # RTN_NUM_BITS, read (and refused) before a weight loads

    def pack_loaded(self, model: CausalLM, quantization: Quantization | None, path: str) -> None:
        module = model.get_submodule(path)
        if not _packable(model, path):
            return
        if isinstance(module, Experts):
            self._pack_experts(model, path, module, quantization)
        elif path == "lm_head":  # untied: packed now where it packs (else in prepare)
            self._pack_head(model, quantization)
        elif path == _EMBEDDING and quantization == "fp16":  # its float32 goes at once
            self._embedding_as_float16(model)
        elif isinstance(module, nn.Linear):
            self._pack(model, path, module, quantization)

    def prepare(self, model: CausalLM, quantization: Quantization | None) -> None:
        """Pack the linears keep_blocks left (pack_loaded, as each loaded, packs them too):
        with "rtn" rounded to GGUF blocks, else float16 where fast (for "gguf*" whatever the
        checkpoint does not store in blocks); then the output projection: "rtn"'s Q8_0,
        float16, or without packing a transposed copy for few rows; then a token embedding
        only lookups read: "rtn"'s Q8_0 rows, "fp16"'s float16 rows."""
        if model.config.attn_logit_softcapping is not None and self.native:
            self.attention = TorchAttention()  # the native kernel does not soft-cap scores
        for path, linear in _linears(model):
            if path != "lm_head":
                self._pack(model, path, linear, quantization)
        for path, experts in [(p, m) for p, m in model.named_modules() if isinstance(m, Experts)]:
            if _packable(model, path):
                self._pack_experts(model, path, experts, quantization)
        if quantization == "fp16":  # (done as the embedding loaded, unless it was not whole)
            self._embedding_as_float16(model)
        self._pack_head(model, quantization)
        if quantization == "rtn":
            self._round_embedding(model)
            rounded = sum(isinstance(m, GGUFLinear) for m in model.modules())
            logger.info(
                "weights: %d linear layers rounded to %s blocks (rtn), int8 activations",
                rounded,
                quant_matmul.type_name(self._rtn_type()),
            )
        if not isinstance(model.lm_head, GGUFLinear | PackedLinear):
            model.lm_head = TransposedHead(model.output_weight)

    def _pack_head(self, model: CausalLM, quantization: Quantization | None) -> None:
        """The output projection (the embedding's table, when tied) as "rtn"'s Q8_0 blocks,
        or float16 where the other linears are and it fits; else left as it is."""
        if isinstance(model.lm_head, GGUFLinear | PackedLinear):
            return
        weight = model.output_weight
        if quantization == "rtn" and weight.shape[1] % rtn.GROUP == 0:
            bias = getattr(model.lm_head, "bias", None)
            model.lm_head = rtn.rounded("lm_head", weight, bias, self._rtn_type())
        elif _fp16_rest(quantization) and formats.fits_fp16(weight):
            model.lm_head = PackedLinear(weight, None, formats.native_fp16_panels())

    def _pack(
        self,
        model: CausalLM | nn.Module,
        path: str,
        linear: nn.Linear,
        quantization: Quantization | None,
    ) -> None:
        """One linear (not the head) in the format `quantization` gives it, if any."""
        rounds = rtn.rounds(linear)
        packed = self._packed(path, linear.weight, linear.bias, quantization, rounds)
        if packed is not None:
            _replace(model, path, packed)

    def _pack_experts(
        self,
        model: CausalLM | nn.Module,
        path: str,
        experts: Experts,
        quantization: Quantization | None,
    ) -> None:
        """A mixture's experts as PackedExperts, each projection in the format
        `quantization` gives it (left as they are if one cannot be packed)."""
        projections: list[list[nn.Module]] = []
        for stacked in (experts.w13, experts.w2):
            rounds = stacked.shape[2] % rtn.GROUP == 0
            packed = [self._packed(path, w, None, quantization, rounds) for w in stacked]
            if any(p is None for p in packed):
                return
            projections.append([p for p in packed if p is not None])
        _replace(model, path, PackedExperts(*projections))

    def _packed(
        self,
        path: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        quantization: Quantization | None,
        rounds: bool,
    ) -> nn.Module | None:
        """The weight (of the module at `path`) in the format `quantization` gives it: "rtn"
        rounds it where `rounds`, else float16 where fast and in range; None: as it is."""
        if quantization == "rtn" and rounds:
            return rtn.rounded(path, weight, bias, self._rtn_type())
        if _fp16_rest(quantization) and formats.fits_fp16(weight):
            return PackedLinear(weight, bias, formats.native_fp16_panels())
        return None

    def _round_embedding(self, model: CausalLM) -> None:
        """For "rtn", once every weight is in: the token embedding as Q8_0 blocks, where only
        lookups read its table (_lone_embedding)."""
        embedding = _lone_embedding(model)
        if embedding is not None and embedding.embedding_dim % rtn.GROUP == 0:
            blocks = rtn.quantize(embedding.weight, quant_matmul.GGML_Q8_0)
            dim = embedding.embedding_dim
            _replace(model, _EMBEDDING, GGUFEmbedding(quant_matmul.GGML_Q8_0, blocks, dim))

    def _embedding_as_float16(self, model: CausalLM) -> None:
        """For "fp16": the token embedding as float16 rows where only lookups are to read
        its table (_lone_embedding once the head is packed): its float32 freed first, then
        a tied head packed from these rows (no float32 copy), then the rows swapped in as a
        GGUFEmbedding of type F16. Half the table's memory."""
        embedding = _whole_embedding(model)
        if embedding is None or not formats.fits_fp16(embedding.weight):
            return  # (tied, the head then stays float32 too: it reads this table)
        embedding.weight = nn.Parameter(embedding.weight.detach().half(), requires_grad=False)
        if model.lm_head is None:  # tied (an untied head packs as its own weight loads)
            self._pack_head(model, "fp16")
            assert model.lm_head is not None, "a tied head packs from the float16 rows"
        rows = embedding.weight.view(torch.uint8)
        dim = embedding.embedding_dim
        _replace(model, _EMBEDDING, GGUFEmbedding(gguf_rows.GGML_F16, rows, dim))

    def _rtn_type(self) -> int:
        """RTN_NUM_BITS's block type, read once."""
        if self._rtn_ggml_type is None:
            self._rtn_ggml_type = rtn.weight_type()
        return self._rtn_ggml_type

    def forward(
        self,
        model: CausalLM,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: ForwardContext,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        meta = ctx.meta
        decodes_only = isinstance(meta, PagedMetadata) and meta.num_decodes == len(input_ids)
        if decodes_only and inputs_embeds is None and positions.dim() == 1:
            assert isinstance(meta, PagedMetadata)
            layers = self._fused_layers(model, ctx.kv_caches, meta.block_size)
            if layers is not None:
                x = model.embed_input_ids(input_ids)
                return x + layers(x, positions, meta.slot_mapping, meta.row_tables, meta.row_lens)
        return model(input_ids, positions, ctx, inputs_embeds)

    @property
    def fused_layers(self) -> decode_step.DecodeLayers | None:
        """The decoder layers as one native call, once a decode step has built it."""
        return None if self._fused is None else self._fused[1]

    def _fused_layers(
        self, model: CausalLM, kv_caches: list[KVCache], block_size: int
    ) -> decode_step.DecodeLayers | None:
        if self._fused is None or self._fused[0] is not kv_caches:
            self._fused = (kv_caches, _build_fused(model, kv_caches, block_size))
        return self._fused[1] if self.fused_decode else None


def _build_fused(
    model: CausalLM, kv_caches: list[KVCache], block_size: int
) -> decode_step.DecodeLayers | None:
    """The layers as one native call, or None where it cannot run (no library, layers not
    PreNormBlocks, projections not in the kernel's formats)."""
    decoder = model.pre_norm_decoder()
    if decoder is None or not decode_step.available():
        return None
    weights = []
    for block in decoder.blocks:
        projections = [
            _kernel_projection(m)
            for m in (block.qkv_proj, block.o_proj, block.gate_up_proj, block.down_proj)
        ]
        if any(p is None for p in projections):
            return None
        qkv, o, gate_up, down = projections
        assert qkv is not None and o is not None and gate_up is not None and down is not None
        weights.append(
            decode_step.LayerWeights(
                block.input_norm, block.post_attention_norm, qkv, o, gate_up, down, block.window
            )
        )
    return decode_step.DecodeLayers(
        weights, kv_caches, hidden=model.config.hidden_size, num_heads=decoder.num_heads,
        intermediate=decoder.intermediate_size, eps=decoder.eps, cos_sin=decoder.cos_sin,
        block_size=block_size,
    )  # fmt: skip


def _kernel_projection(linear: nn.Module) -> decode_step.Projection | None:
    """A bias-free projection in the native kernel's panels, as decode_step reads it."""
    if isinstance(linear, GGUFLinear) and linear.bias is None:
        return decode_step.Projection(
            linear.values, linear.scales, linear.kernel_type, linear.out_features
        )
    if isinstance(linear, PackedLinear) and linear.native and linear.bias is None:
        return decode_step.Projection(linear.panels, None, 0, linear.out_features)
    return None


def _linears(model: CausalLM | nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear of the model a backend packs, with its path, the output projection
    included."""
    return [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and _packable(model, path)
    ]


def _packable(model: CausalLM | nn.Module, path: str) -> bool:
    """Whether the module at `path` is not under the model's `unpacked_modules` (a vision
    encoder, run as it is)."""
    skip = tuple(f"{name}." for name in getattr(model, "unpacked_modules", ()))
    return not path.startswith(skip)


def _replace(model: CausalLM | nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def _keep_gguf_blocks(
    model: CausalLM, blocks: BlockLookup, int8_activations: bool
) -> tuple[dict[str, list[str]], str | None]:
    """Swap in GGUFLinear wherever the checkpoint stores a linear's weights (every shard of
    a fused one) in a type the kernel reads; returns the swapped module paths with the
    checkpoint weights they hold (none for a tied output projection: the embedding still
    loads), and a summary of the quantized ones it left to load dequantized (which, in what
    types, why), if any."""
    kept, left = dict[str, list[str]](), dict[str, list[str]]()
    targets: list[tuple[str, nn.Linear | torch.Tensor]] = list(_linears(model))
    if model.lm_head is None:  # tied: the output projection is the embedding
        targets.append(("lm_head", model.output_weight))
    sharded = _sharded(model)
    first = int(getattr(model, "first_layer", 0))  # a pipeline stage's first layer
    for path, linear in targets:
        checkpoint_path = _global_path(path, first)  # the layer's name in the checkpoint
        names = checkpoint_weight_names(model, checkpoint_path)
        parts = [blocks(name) for name in names]
        if sharded:
            parts = _rank_blocks(model, path, parts)
        int8 = int8_activations and not checkpoint_path.startswith(formats.FLOAT_ACTIVATION_LAYERS)
        replacement = gguf_linear(linear, parts, int8)
        if replacement is not None:
            _replace(model, path, replacement)
            kept[path] = [] if isinstance(linear, torch.Tensor) else names
            continue
        reason = gguf_fallback_reason(linear, parts) or "scales beyond float16"
        if reason != "not stored quantized":
            left.setdefault(reason, []).append(path)
    if not left:
        return kept, None
    summary = "; ".join(
        f"{len(paths)} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''}): {reason}"
        for reason, paths in left.items()
    )
    return kept, summary


def _keep_gguf_experts(
    model: CausalLM, blocks: BlockLookup, int8_activations: bool
) -> dict[str, list[str]]:
    """Swap in PackedExperts of GGUFLinears wherever the checkpoint stores every expert's
    projections in types the kernel reads (on one rank: a tensor-parallel rank's share of
    a down projection is a slice of its columns, not of its block rows); returns the
    swapped module paths with the checkpoint weights they hold."""
    mapping = getattr(model, "expert_params_mapping", None) or {}
    names = {target: part for part, target in mapping.items()}  # ("w13", 0) -> "gate_proj"
    first = int(getattr(model, "first_layer", 0))
    kept: dict[str, list[str]] = {}
    for path, experts in [(p, m) for p, m in model.named_modules() if isinstance(m, Experts)]:
        if experts.tp_size > 1 or not _packable(model, path):
            continue
        prefix = _global_path(path, first)  # the layer's name in the checkpoint
        int8 = int8_activations and not prefix.startswith(formats.FLOAT_ACTIVATION_LAYERS)
        held: list[str] = []
        gate_up: list[nn.Module] = []
        down: list[nn.Module] = []
        for expert in range(experts.num_experts):
            parts = {key: f"{prefix}.{expert}.{name}.weight" for key, name in names.items()}
            w13 = [parts.get(("w13", 0)), parts.get(("w13", 1))]
            w2 = parts.get(("w2", None))
            if None in w13 or w2 is None:
                break
            up = gguf_linear(experts.w13[expert], [blocks(n) for n in w13 if n], int8)
            out = gguf_linear(experts.w2[expert], [blocks(w2)], int8)
            if not isinstance(up, GGUFLinear) or not isinstance(out, GGUFLinear):
                break
            gate_up.append(up)
            down.append(out)
            held += [n for n in w13 if n] + [w2]
        else:
            _replace(model, path, PackedExperts(gate_up, down))
            kept[path] = held
    return kept


_EMBEDDING = "model.embed_tokens"


def _whole_embedding(model: CausalLM) -> nn.Embedding | None:
    """The token embedding where a GGUFEmbedding may take its place once nothing else reads
    its table: whole on one rank (not vocabulary-parallel), in a model with no encoder that
    takes the embedding's dtype."""
    embedding = model.get_submodule(_EMBEDDING)
    unpacked: tuple[str, ...] = getattr(model, "unpacked_modules", ())
    if type(embedding) is not nn.Embedding or unpacked:
        return None
    return embedding


def _lone_embedding(model: CausalLM) -> nn.Embedding | None:
    """The whole embedding (above) where only lookups read its table: the output projection
    is its own module (untied, or tied and already packed from the same weights)."""
    return None if model.lm_head is None else _whole_embedding(model)


def _keep_gguf_embedding(model: CausalLM, blocks: BlockLookup) -> set[str]:
    """Swap in a GGUFEmbedding where the checkpoint stores a lone embedding (above) in a
    type gguf_rows decodes; returns the checkpoint name it holds (none when not swapped)."""
    embedding = _lone_embedding(model)
    stored = None if embedding is None else blocks(f"{_EMBEDDING}.weight")
    if embedding is None or stored is None:
        return set()
    ggml_type, data = stored
    if not gguf_rows.decodes(ggml_type, embedding.embedding_dim):
        return set()
    _replace(model, _EMBEDDING, GGUFEmbedding(ggml_type, data, embedding.embedding_dim))
    logger.info("weights: the token embedding kept as %s blocks", quant_matmul.type_name(ggml_type))
    return {f"{_EMBEDDING}.weight"}


def _global_path(path: str, first_layer: int) -> str:
    """A pipeline stage's module path ("model.layers.2.mlp") as the whole model's."""
    prefix = "model.layers."
    if not first_layer or not path.startswith(prefix):
        return path
    index, _, rest = path[len(prefix) :].partition(".")
    return f"{prefix}{int(index) + first_layer}.{rest}"


def _sharded(model: CausalLM) -> bool:
    return any(getattr(m, "tp_size", 1) > 1 for m in model.modules())


def _rank_blocks(
    model: CausalLM, path: str, parts: list[tuple[int, torch.Tensor] | None]
) -> list[tuple[int, torch.Tensor] | None]:
    """A tensor-parallel rank's slices of a linear's checkpoint blocks (the tied output
    projection's are the embedding's rows); replicated layers (a router) keep them all."""
    owner = "model.embed_tokens" if path == "lm_head" and model.lm_head is None else path
    slices = getattr(model.get_submodule(owner), "checkpoint_slices", None)
    if slices is None:
        return parts
    return [shard_blocks(p, *s) for p, s in zip(parts, slices(), strict=True)]


def _fp16_rest(quantization: Quantization | None) -> bool:
    """Whether the linears not in GGUF blocks are packed as float16: asked ("fp16"), or
    beside blocks ("gguf*", "rtn") where a fast float16 kernel runs."""
    if quantization in ("gguf", "gguf-float32", "rtn"):
        return formats.fast_fp16()
    return quantization == "fp16"
