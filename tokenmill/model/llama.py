"""The Llama family (Llama 2/3, SmolLM2, Mistral), also the base of Qwen2 and Qwen3."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.kernels import decode_step, layer_ops
from tokenmill.layers.attention import AttentionMetadata, paged_attention
from tokenmill.layers.linear import (
    BlockLookup,
    GGUFLinear,
    PackedLinear,
    QuantizationMethod,
    fast_fp16,
    fits_fp16,
    gguf_linear,
    quantize_linears,
)
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.rotary import RotaryEmbedding, RotaryTables

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ArchConfig:
    """The hyperparameters the forward pass needs, read from an HF config dict."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # biases on q/k/v
    o_proj_bias: bool
    qk_norm: bool

    @classmethod
    def from_hf(
        cls,
        hf: dict[str, Any],
        *,
        attention_bias: bool = False,
        o_proj_bias: bool | None = None,
        qk_norm: bool = False,
    ) -> ArchConfig:
        bias = hf.get("attention_bias", attention_bias)
        try:
            num_heads = hf["num_attention_heads"]
            rope = hf.get("rope_parameters") or {}
            scaling = hf.get("rope_scaling") or (
                rope if rope.get("rope_type", "default") != "default" else None
            )
            return cls(
                vocab_size=hf["vocab_size"],
                hidden_size=hf["hidden_size"],
                intermediate_size=hf["intermediate_size"],
                num_layers=hf["num_hidden_layers"],
                num_heads=num_heads,
                num_kv_heads=hf.get("num_key_value_heads") or num_heads,
                head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
                rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
                rope_theta=hf.get("rope_theta") or rope.get("rope_theta", 10000.0),
                rope_scaling=scaling,
                max_position_embeddings=hf.get("max_position_embeddings", 2048),
                tie_word_embeddings=hf.get("tie_word_embeddings", False),
                attention_bias=bias,
                o_proj_bias=bias if o_proj_bias is None else o_proj_bias,
                qk_norm=qk_norm,
            )
        except KeyError as e:
            raise ModelLoadError(f"model config is missing {e.args[0]!r}") from None


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # [T, C]
        rotary: RotaryTables,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        native: bool,
    ) -> torch.Tensor:
        T, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]
        v = qkv[:, self.q_size + self.kv_size :].view(T, Hkv, D)
        if native and self.q_norm is None:
            q, k = layer_ops.rope_and_cache(
                qkv, rotary.table, rotary.positions, meta.slot_mapping, *kv_cache, H
            )
            out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, cache_written=True)
            return self.o_proj(out.view(T, self.q_size))
        qk = qkv[:, : self.q_size + self.kv_size].view(T, H + Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
        qk = rotary.rotate(qk)  # q and k in one call: [T, H + Hkv, D]
        out = paged_attention(qk[:, :H], qk[:, H:], v, kv_cache[0], kv_cache[1], meta)
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, native: bool) -> torch.Tensor:
        if native:
            return self.down_proj(layer_ops.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [T, C] the previous layer's output (the embeddings for layer 0)
        residual: torch.Tensor | None,  # [T, C] the running sum before x; None at layer 0
        rotary: RotaryTables,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        native: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # this layer's output, the sum before it
        h, residual = self.input_layernorm.add_and_norm(x, residual, native)
        x = self.self_attn(h, rotary, kv_cache, meta, native)
        h, residual = self.post_attention_layernorm.add_and_norm(x, residual, native)
        return self.mlp(h, native), residual


def _kernel_projection(linear: nn.Module) -> decode_step.Projection | None:
    """A bias-free projection in the native kernel's panels, as decode_step reads it."""
    if isinstance(linear, GGUFLinear) and linear.bias is None:
        return decode_step.Projection(
            linear.values, linear.scales, linear.kernel_type, linear.out_features
        )
    if isinstance(linear, PackedLinear) and linear.native and linear.bias is None:
        return decode_step.Projection(linear.panels, None, 0, linear.out_features)
    return None


_HEAD_T_MAX_ROWS = 3  # logits rows up to which torch.mm(x, head_t) beats F.linear (measured)

# Checkpoint projections that are stored apart and fused here: name -> (fused name, shard index).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# fused name -> its checkpoint projections, in shard order
_FUSED_PARTS = {
    fused: [name for name, (f, _) in sorted(_FUSED.items(), key=lambda i: i[1][1]) if f == fused]
    for fused, _ in _FUSED.values()
}


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer over a flattened batch of tokens from many requests."""

    attention_bias = False
    o_proj_bias: bool | None = None  # None: same as attention_bias (Llama's convention)
    qk_norm = False

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__()
        cfg = self.config = ArchConfig.from_hf(
            hf_config,
            attention_bias=self.attention_bias,
            o_proj_bias=self.o_proj_bias,
            qk_norm=self.qk_norm,
        )
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        # element-wise work in native kernels (tokenmill/kernels/layer_ops.c): CPU float32 only
        self.native_kernels = False
        # decode-only steps in one native call (kernels/decode_step.c) where the layers allow
        self.fused_decode = True
        self._decode_layers: tuple[object, decode_step.DecodeLayers | None] | None = None
        self.head_t: torch.Tensor | None = None  # [C, V], see prepare_for_decode
        self.packed_head: PackedLinear | GGUFLinear | None = None  # quantized output projection

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:  # [T, C]
        x = self.embed_tokens(input_ids)
        if self.native_kernels and meta.num_decodes == len(x) and meta.row_lens is not None:
            decode_layers = self._decode_layers_for(kv_caches, meta.block_size)
            if decode_layers is not None:
                assert meta.row_tables is not None
                before = decode_layers(
                    x, positions, meta.slot_mapping, meta.row_tables, meta.row_lens
                )
                return x + before
        rotary = self.rotary.cos_sin_for(positions, x.dtype)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rotary, kv_cache, meta, self.native_kernels)
        return x if residual is None else x + residual

    def _decode_layers_for(
        self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int
    ) -> decode_step.DecodeLayers | None:
        """The layers as one native call over these caches, or None where it cannot run
        (switched off, no library, biases, q/k norms, weights not in the kernel's panels)."""
        if self._decode_layers is None or self._decode_layers[0] is not kv_caches:
            self._decode_layers = (kv_caches, self._build_decode_layers(kv_caches, block_size))
        return self._decode_layers[1] if self.fused_decode else None

    def _build_decode_layers(
        self, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int
    ) -> decode_step.DecodeLayers | None:
        if not decode_step.available() or self.rotary.cos_sin is None:
            return None
        weights = []
        for layer in self.layers:
            assert isinstance(layer, DecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            qkv, o, gate_up, down = (
                _kernel_projection(m)
                for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            )
            if qkv is None or o is None or gate_up is None or down is None:
                return None
            if attn.q_norm is not None:
                return None
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            weights.append(decode_step.LayerWeights(*norms, qkv, o, gate_up, down))
        cfg = self.config
        return decode_step.DecodeLayers(
            weights, kv_caches, hidden=cfg.hidden_size, num_heads=cfg.num_heads,
            intermediate=cfg.intermediate_size, eps=cfg.rms_norm_eps,
            cos_sin=self.rotary.cos_sin, block_size=block_size,
        )  # fmt: skip

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, C] of the rows that sample -> float32 logits [N, V]."""
        hidden = self.norm(hidden)
        if self.packed_head is not None:
            return self.packed_head(hidden)
        if self.head_t is not None and hidden.shape[0] <= _HEAD_T_MAX_ROWS:
            return torch.mm(hidden, self.head_t).float()
        return F.linear(hidden, self.output_weight).float()

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection [V, C]: the embedding when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def prepare_for_decode(
        self, quantization: QuantizationMethod | None = None, blocks: BlockLookup | None = None
    ) -> None:
        """Once after loading, on CPU: pack the linear layers (quantization), else keep a
        [C, V] copy of the output projection for few-row logits.

        "gguf" keeps each layer stored as Q4_1/Q8_0 in the checkpoint (`blocks`) in that
        format (int8 activations; "gguf-float32": float32 ones), and packs the rest as
        "fp16". MKL's GEMV over the [V, C] weight is ~2x slower than a GEMM over its
        transpose at 1-3 rows (bandwidth-bound batch-1 decode), the reverse from 4 rows on;
        the copy costs V*C more floats (113 MB for SmolLM2-135M).
        """
        if self.output_weight.device.type != "cpu":
            return
        if quantization in ("gguf", "gguf-float32"):
            int8 = quantization == "gguf"
            kept = self._keep_gguf_blocks(blocks, int8_activations=int8)
            # whatever was not kept: float16-packed where a fast kernel runs, else float32
            quantization = "fp16" if fast_fp16() else None
            if kept:
                activations = "int8" if int8 else "float32"
                logger.info(
                    "weights: %d linear layers kept as GGUF blocks, %s activations",
                    kept,
                    activations,
                )
        if quantization is not None:
            quantize_linears(self.layers, quantization)
        if self.packed_head is None and quantization is not None and fits_fp16(self.output_weight):
            # the embedding stays float32 for lookups; the head gets its own packed copy
            self.packed_head = PackedLinear(self.output_weight, None, quantization)
        elif self.packed_head is None:
            self.head_t = self.output_weight.detach().t().contiguous()

    def _keep_gguf_blocks(self, blocks: BlockLookup | None, int8_activations: bool) -> int:
        """Swap in GGUFLinear wherever the checkpoint stores the weights in a type the
        kernel reads; returns how many layers (the output projection included) it swapped."""
        if blocks is None:
            return 0
        kept = 0
        for path, module in list(self.layers.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            parent_path, _, name = path.rpartition(".")
            parts = _FUSED_PARTS.get(name, [name])
            names = [f"model.layers.{parent_path}.{part}.weight" for part in parts]
            replacement = gguf_linear(module, [blocks(n) for n in names], int8_activations)
            if replacement is not None:
                setattr(self.layers.get_submodule(parent_path), name, replacement)
                kept += 1
        head = "model.embed_tokens.weight" if self.lm_head is None else "lm_head.weight"
        self.packed_head = gguf_linear(self.output_weight, [blocks(head)], int8_activations)
        return kept + (self.packed_head is not None)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the fused parameters; all must be covered."""
        params = dict(self.named_parameters())
        missing = set(params)
        for name, tensor in weights:
            target, shard = self._param_name(name)
            if target is None:
                continue
            if target not in params:
                raise ModelLoadError(
                    f"checkpoint tensor {name!r} has no place in {type(self).__name__}"
                )
            self._copy(target, params[target], tensor, shard)
            missing.discard(target)
        if missing:
            raise ModelLoadError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:5])}")

    def _param_name(self, name: str) -> tuple[str | None, int | None]:
        if name.startswith("lm_head.") and self.lm_head is None:
            return None, None  # tied: the embedding serves as the output projection
        if "rotary_emb" in name:
            return None, None
        name = name.removeprefix("model.")
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FUSED:
            fused, shard = _FUSED[parts[-2]]
            return ".".join([*parts[:-2], fused, parts[-1]]), shard
        return name, None

    def _copy(
        self, name: str, param: torch.Tensor, tensor: torch.Tensor, shard: int | None
    ) -> None:
        with torch.no_grad():
            dst = param
            if shard is not None:
                sizes = self._shard_sizes(name)
                dst = param.narrow(0, sum(sizes[:shard]), sizes[shard])
            if dst.shape != tensor.shape:
                raise ModelLoadError(
                    f"weight {name} shard {shard}: shape {tuple(tensor.shape)} does not fit {tuple(dst.shape)}"
                )
            dst.copy_(tensor)

    def _shard_sizes(self, fused_name: str) -> list[int]:
        cfg = self.config
        if "gate_up_proj" in fused_name:
            return [cfg.intermediate_size] * 2
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [q, kv, kv]
