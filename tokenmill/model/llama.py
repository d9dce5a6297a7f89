"""The Llama family (Llama 2/3, SmolLM2, Mistral), also the base of Qwen2 and Qwen3."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed import group as parallel
from tokenmill.errors import ModelLoadError
from tokenmill.layers.fusion import PreNormBlock, PreNormDecoder
from tokenmill.layers.linear import ColumnLinear, RowLinear
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.ops import ForwardContext, KVCache
from tokenmill.layers.rotary import RotaryEmbedding, RotaryTables
from tokenmill.layers.vocab import gather_logits, output_head, vocab_embedding
from tokenmill.model.config import ArchConfig, head_shards
from tokenmill.model.interface import load_checkpoint


class LlamaAttention(nn.Module):
    """Under tensor parallelism a rank holds num_heads / ranks query heads and its share of
    the key/value heads (one of them, replicated, where there are fewer than ranks)."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.tp = tp = parallel.current()
        D = cfg.head_dim
        shards = head_shards(cfg.num_heads, cfg.num_kv_heads, tp.rank, tp.size)
        self.num_heads, self.num_kv_heads, self.head_dim = shards[0][1], shards[1][1], D
        self.q_size, self.kv_size = self.num_heads * D, self.num_kv_heads * D
        full_q, full_kv = cfg.num_heads * D, cfg.num_kv_heads * D
        self.qkv_proj = ColumnLinear(
            cfg.hidden_size, [full_q, full_kv, full_kv], bias=cfg.attention_bias,
            shards=[(start * D, n * D) for start, n in (shards[0], shards[1], shards[1])],
        )  # fmt: skip
        self.o_proj = RowLinear(full_q, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale: float | None = None  # of q.k; None = head_dim ** -0.5
        self.softcap = cfg.attn_logit_softcapping
        self.window: int | None = None  # sliding window of this layer; None: whole context

    def forward(
        self, x: torch.Tensor, rotary: RotaryTables, kv_cache: KVCache, ctx: ForwardContext
    ) -> torch.Tensor:  # [T, C] -> [T, C]
        T, H, Hkv, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2 Hkv) * D]
        v = qkv[:, self.q_size + self.kv_size :].view(T, Hkv, D)
        if self.q_norm is None:
            rotated = ctx.ops.rope_and_cache(qkv, rotary, ctx.meta.slot_mapping, kv_cache, H)
            if rotated is not None:
                q, k = rotated
                out = ctx.attention.forward(
                    q, k, v, kv_cache, ctx.meta, True, self.scale, self.softcap, self.window
                )
                return self.tp.all_reduce(self.o_proj(out.view(T, self.q_size)))
        qk = qkv[:, : self.q_size + self.kv_size].view(T, H + Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
        qk = rotary.rotate(qk)  # q and k in one call: [T, H + Hkv, D]
        out = ctx.attention.forward(
            qk[:, :H], qk[:, H:], v, kv_cache, ctx.meta, False, self.scale, self.softcap,
            self.window,
        )  # fmt: skip
        return self.tp.all_reduce(self.o_proj(out.reshape(T, self.q_size)))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.tp = parallel.current()
        size = cfg.intermediate_size
        self.gate_up_proj = ColumnLinear(cfg.hidden_size, [size, size], bias=cfg.mlp_bias)
        self.down_proj = RowLinear(size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(ctx.ops.silu_and_mul(self.gate_up_proj(x))))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp: nn.Module = LlamaMLP(cfg)  # MoE models put their experts here
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,  # [T, C] the previous layer's output (the embeddings for layer 0)
        residual: torch.Tensor | None,  # [T, C] the running sum before x; None at layer 0
        rotary: RotaryTables,
        kv_cache: KVCache,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # this layer's output, the sum before it
        h, residual = self.input_layernorm.add_and_norm(x, residual, ctx.ops)
        x = self.self_attn(h, rotary, kv_cache, ctx)
        h, residual = self.post_attention_layernorm.add_and_norm(x, residual, ctx.ops)
        return self.feed_forward(h, ctx), residual

    def feed_forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The MLP branch (a mixture of experts, in a subclass)."""
        return self.mlp(h, ctx)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_class: type[LlamaDecoderLayer]):
        super().__init__()
        self.embed_tokens = vocab_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(layer_class(cfg) for _ in range(cfg.num_layers))
        for i, layer in enumerate(self.layers):
            assert isinstance(layer, LlamaDecoderLayer)
            layer.self_attn.window = cfg.layer_window(i)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer over a flattened batch of tokens from many requests."""

    packed_modules_mapping: ClassVar[dict[str, list[str]]] = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    # the architecture's defaults where the HF config is silent
    attention_bias = False
    o_proj_bias: bool | None = None  # None: same as attention_bias (Llama's convention)
    qk_norm = False
    decoder_layer_class = LlamaDecoderLayer
    # an expert's checkpoint projection -> (the experts' stacked parameter, part): MoE models
    expert_params_mapping: ClassVar[dict[str, tuple[str, int | None]] | None] = None

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__()
        activation = hf_config.get("hidden_act", "silu")
        if activation != "silu":
            raise ModelLoadError(
                f"{type(self).__name__} runs hidden_act 'silu'; this config says {activation!r}"
            )
        cfg = self.config = ArchConfig.from_hf(
            hf_config,
            attention_bias=self.attention_bias,
            o_proj_bias=self.o_proj_bias,
            qk_norm=self.qk_norm,
        )
        self.model = LlamaModel(cfg, self.decoder_layer_class)
        self.tp = parallel.current()
        self.lm_head: nn.Module | None = (
            None if cfg.tie_word_embeddings else output_head(cfg.hidden_size, cfg.vocab_size)
        )
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        ctx: ForwardContext,
        inputs_embeds: torch.Tensor | None = None,  # [T, C]: instead of embedding input_ids
    ) -> torch.Tensor:  # [T, C]
        x = self.embed_input_ids(input_ids) if inputs_embeds is None else inputs_embeds
        rotary = self.rotary.cos_sin_for(positions, x.dtype)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.model.layers, ctx.kv_caches, strict=True):
            x, residual = layer(x, residual, rotary, kv_cache, ctx)
        return x if residual is None else x + residual

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, C] from forward() -> after the final norm (what embeddings pool)."""
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, C] of the rows that sample -> float32 logits [N, V] (under tensor
        parallelism, on the leader; the other ranks get their slice)."""
        hidden = self.final_hidden(hidden)
        if self.lm_head is None:
            logits = F.linear(hidden, self.model.embed_tokens.weight).float()
        else:
            logits = self.lm_head(hidden).float()
        return gather_logits(logits, self.tp, self.config.vocab_size)

    @property
    def output_weight(self) -> torch.Tensor:
        """The output projection [V, C]: the embedding when tied."""
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        assert isinstance(self.lm_head, nn.Linear), "the output weight is read before packing"
        return self.lm_head.weight

    def pre_norm_decoder(self) -> PreNormDecoder | None:
        """The layers as PreNormBlocks, or None where they are not of that shape (biases on
        the projections, q/k norms)."""
        cos_sin = self.rotary.cos_sin
        if self.tp.size > 1:
            return None  # the fused step has no all-reduce between its layers
        if cos_sin is None or self.config.qk_norm or cos_sin.shape[-1] != self.config.head_dim:
            return None  # q/k norms or partial rotary: not in the fused step
        blocks = []
        for layer in self.model.layers:
            assert isinstance(layer, LlamaDecoderLayer)
            attn, mlp = layer.self_attn, layer.mlp
            if not isinstance(mlp, LlamaMLP):  # experts: not a dense MLP
                return None
            projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(getattr(p, "bias", None) is not None for p in projections):
                return None
            if attn.scale is not None or attn.softcap is not None:  # not in the fused step
                return None
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            blocks.append(PreNormBlock(norms[0], projections[0], projections[1], norms[1],
                                       projections[2], projections[3], attn.window))  # fmt: skip
        cfg = self.config
        return PreNormDecoder(
            blocks, cfg.num_heads, cfg.intermediate_size, cfg.rms_norm_eps, cos_sin
        )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (HF names) into the fused parameters; all must be covered."""
        skip = ("rotary_emb",) + (("lm_head.",) if self.lm_head is None else ())
        load_checkpoint(
            self, weights, self.packed_modules_mapping, skip, self.expert_params_mapping
        )
