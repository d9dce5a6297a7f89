"""Gemma 2 and Gemma 3 (text): RMSNorm as x * (1 + w), GeGLU (tanh-approximated GELU), embeddings scaled
by sqrt(hidden), q/k norms, q.k scaled by query_pre_attn_scalar ** -0.5, a norm after
attention and around the MLP, and local (sliding-window) layers with their own rotary base
between the global ones; Gemma 2 soft-caps the attention scores."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed import group as parallel
from tokenmill.errors import ModelLoadError
from tokenmill.layers.fusion import PreNormDecoder
from tokenmill.layers.linear import ColumnLinear, RowLinear, default_weight_loader
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.ops import ForwardContext, KVCache
from tokenmill.layers.rotary import RotaryEmbedding, RotaryTables
from tokenmill.layers.vocab import gather_logits, output_head, vocab_embedding
from tokenmill.model.config import FULL, SLIDING, ArchConfig
from tokenmill.model.interface import load_checkpoint
from tokenmill.model.llama import LlamaAttention


class GemmaRMSNorm(RMSNorm):
    """RMSNorm(x) * (1 + w): the checkpoint stores w, loading adds the 1."""

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard: int | None) -> None:
        default_weight_loader(param, loaded.float() + 1.0, shard)


class Gemma3Attention(LlamaAttention):
    def __init__(self, cfg: ArchConfig, scale: float):
        super().__init__(cfg)
        if cfg.qk_norm:
            self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.scale = scale


class Gemma3MLP(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.tp = parallel.current()
        size = cfg.intermediate_size
        self.gate_up_proj = ColumnLinear(cfg.hidden_size, [size, size], bias=False)
        self.down_proj = RowLinear(size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.tp.all_reduce(self.down_proj(F.gelu(gate, approximate="tanh") * up))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, scale: float, is_sliding: bool):
        super().__init__()
        self.is_sliding = is_sliding
        self.self_attn = Gemma3Attention(cfg, scale)
        self.self_attn.window = cfg.sliding_window if is_sliding else None
        self.mlp = Gemma3MLP(cfg)
        size, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(
        self,
        x: torch.Tensor,  # [T, C] the previous layer's output (the embeddings for layer 0)
        residual: torch.Tensor | None,  # [T, C] the running sum before x; None at layer 0
        rotary: RotaryTables,
        kv_cache: KVCache,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # this layer's output, the sum before it
        h, residual = self.input_layernorm.add_and_norm(x, residual, ctx.ops)
        attended = self.post_attention_layernorm(self.self_attn(h, rotary, kv_cache, ctx))
        h, residual = self.pre_feedforward_layernorm.add_and_norm(attended, residual, ctx.ops)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3Model(nn.Module):
    def __init__(self, cfg: ArchConfig, scale: float, layer_types: list[str]):
        super().__init__()
        self.embed_tokens = vocab_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(cfg, scale, t == SLIDING) for t in layer_types
        )
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    qk_norm = True
    sliding_window_pattern = 6  # where the config names no layer types: every 6th is global

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__()
        cfg = self.config = ArchConfig.from_hf(hf_config, qk_norm=self.qk_norm)
        if "query_pre_attn_scalar" not in hf_config:
            raise ModelLoadError("Gemma 3 config is missing 'query_pre_attn_scalar'")
        layer_types = cfg.layer_types = _layer_types(
            hf_config, cfg.num_layers, self.sliding_window_pattern
        )
        scale = float(hf_config["query_pre_attn_scalar"]) ** -0.5
        self.model = Gemma3Model(cfg, scale, layer_types)
        self.tp = parallel.current()
        self.lm_head: nn.Module | None = (
            None if cfg.tie_word_embeddings else output_head(cfg.hidden_size, cfg.vocab_size)
        )
        (global_theta, global_scaling), (local_theta, local_scaling) = self.rope(hf_config)
        positions = cfg.max_context
        self.rotary = RotaryEmbedding(cfg.head_dim, positions, global_theta, global_scaling)
        self.local_rotary = RotaryEmbedding(cfg.head_dim, positions, local_theta, local_scaling)
        self.embed_scale = math.sqrt(cfg.hidden_size)
        self.final_logit_softcapping: float | None = hf_config.get("final_logit_softcapping")

    @staticmethod
    def rope(hf: dict[str, Any]) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
        """((theta, scaling) of the global layers, (theta, scaling) of the local ones)."""
        return _rope(hf)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.model.embed_tokens(input_ids)
        return rows * torch.tensor(self.embed_scale, dtype=rows.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        ctx: ForwardContext,
        inputs_embeds: torch.Tensor | None = None,  # [T, C]: instead of embedding input_ids
    ) -> torch.Tensor:  # [T, C]
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        full = self.rotary.cos_sin_for(positions, x.dtype)
        local = self.local_rotary.cos_sin_for(positions, x.dtype)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, ctx.kv_caches, strict=True):
            assert isinstance(layer, Gemma3DecoderLayer)
            rotary = local if layer.is_sliding else full
            x, residual = layer(x, residual, rotary, kv_cache, ctx)
        return x if residual is None else x + residual

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, C] from forward() -> after the final norm (what embeddings pool)."""
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, C] of the rows that sample -> float32 logits [N, V]."""
        hidden = self.final_hidden(hidden)
        if self.lm_head is None:
            logits = F.linear(hidden, self.model.embed_tokens.weight).float()
        else:
            logits = self.lm_head(hidden).float()
        logits = gather_logits(logits, self.tp, self.config.vocab_size)
        cap = self.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @property
    def output_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        assert isinstance(self.lm_head, nn.Linear), "the output weight is read before packing"
        return self.lm_head.weight

    def pre_norm_decoder(self) -> PreNormDecoder | None:
        return None  # not PreNormBlocks: norms after attention and around the MLP

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = ("rotary_emb",) + (("lm_head.",) if self.lm_head is None else ())
        load_checkpoint(self, weights, self.packed_modules_mapping, skip)


def _layer_types(hf: dict[str, Any], num_layers: int, default_pattern: int) -> list[str]:
    """Each layer's attention: `layer_types`, else every `sliding_window_pattern`-th global."""
    types = hf.get("layer_types")
    if types is None:
        pattern = hf.get("sliding_window_pattern", default_pattern)
        types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(num_layers)]
    if len(types) != num_layers or not set(types) <= {SLIDING, FULL}:
        raise ModelLoadError(f"layer_types must name {num_layers} layers: {types}")
    return list(types)


def _rope(hf: dict[str, Any]) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
    """((theta, scaling) of the global layers, (theta, scaling) of the local ones), from
    rope_parameters keyed by layer type (transformers 5) or rope_theta / rope_scaling /
    rope_local_base_freq (earlier)."""
    params = hf.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:
        pairs = []
        for kind in (FULL, SLIDING):
            p = params.get(kind) or {}
            scaling = p if p.get("rope_type", "default") != "default" else None
            pairs.append((float(p.get("rope_theta", 10000.0)), scaling))
        return pairs[0], pairs[1]
    scaling = hf.get("rope_scaling")
    return (float(hf.get("rope_theta", 1_000_000.0)), scaling), (
        float(hf.get("rope_local_base_freq", 10000.0)),
        None,
    )


class Gemma2ForCausalLM(Gemma3ForCausalLM):
    """Gemma 2: Gemma 3's layers without q/k norms, one rotary base for every layer, and
    attention scores soft-capped (`attn_logit_softcapping`)."""

    qk_norm = False
    sliding_window_pattern = 2  # local and global layers alternate

    @staticmethod
    def rope(hf: dict[str, Any]) -> tuple[tuple[float, dict | None], tuple[float, dict | None]]:
        scaling = hf.get("rope_scaling")
        both = (float(hf.get("rope_theta") or 10000.0), scaling)
        return both, both


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """Gemma 3 4B, 12B and 27B checkpoints: a vision tower and its projector beside the
    language model. The language model alone serves text prompts (its config is
    `text_config`; the vision weights are not loaded)."""

    _VISION = ("vision_tower.", "multi_modal_projector.")
    # the language model's weights as the hub's checkpoints name them, and as transformers 5
    # names them in memory
    _PREFIXES = (
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.language_model.", "model."),
    )

    def __init__(self, hf_config: dict[str, Any]):
        text = hf_config.get("text_config")
        if not text:
            raise ModelLoadError("Gemma 3 config is missing 'text_config'")
        super().__init__(text)  # (the loader has set its tie_word_embeddings: the outer one)
        # transformers' Gemma3ForConditionalGeneration never soft-caps its logits (released
        # configs set no cap either)
        self.final_logit_softcapping = None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._language_model(weights))

    def _language_model(
        self, weights: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            bare = name.removeprefix("model.")
            if bare.startswith(self._VISION):
                continue
            for old, new in self._PREFIXES:
                if name.startswith(old):
                    name = new + name.removeprefix(old)
                    break
            yield name, tensor
