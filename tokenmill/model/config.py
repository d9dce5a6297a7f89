"""ArchConfig: one normalised set of hyperparameters, read from an HF config dict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.errors import ModelLoadError


@dataclass(slots=True)
class ArchConfig:
    """The hyperparameters a decoder-only architecture's forward pass needs."""

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
    mlp_bias: bool = False  # biases on gate/up/down
    attn_logit_softcapping: float | None = None  # scores -> tanh(scores / c) * c
    # keys a sliding-window layer's query sees (itself and window - 1 before); None: no
    # window anywhere
    sliding_window: int | None = None
    # each layer's "sliding_attention" or "full_attention"; None: every layer sliding where
    # there is a window
    layer_types: list[str] | None = None
    partial_rotary_factor: float = 1.0  # of each head's dims, the rotated part (the first)
    # mixture of experts (0 experts: dense MLPs only)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's; 0: intermediate_size
    norm_topk_prob: bool = True  # the chosen experts' weights renormalised to sum to 1

    @classmethod
    def from_hf(
        cls,
        hf: dict[str, Any],
        *,
        attention_bias: bool = False,
        o_proj_bias: bool | None = None,
        qk_norm: bool = False,
    ) -> ArchConfig:
        """The architecture's own defaults (keyword arguments) where `hf` is silent."""
        bias = hf.get("attention_bias", attention_bias)
        try:
            num_heads = hf["num_attention_heads"]
            rope = hf.get("rope_parameters") or {}
            scaling = hf.get("rope_scaling") or (
                rope if rope.get("rope_type", "default") != "default" else None
            )
            window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
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
                mlp_bias=bool(hf.get("mlp_bias", False)),
                attn_logit_softcapping=hf.get("attn_logit_softcapping"),
                sliding_window=int(window) if window else None,
                layer_types=_layer_types(hf, int(window) if window else None),
                partial_rotary_factor=float(
                    hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
                ),
                num_experts=int(hf.get("num_local_experts") or hf.get("num_experts") or 0),
                num_experts_per_tok=int(hf.get("num_experts_per_tok") or 0),
                moe_intermediate_size=int(hf.get("moe_intermediate_size") or 0),
                norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            )
        except KeyError as e:
            raise ModelLoadError(f"model config is missing {e.args[0]!r}") from None

    @property
    def max_context(self) -> int:
        """Tokens a sequence may hold."""
        return self.max_position_embeddings

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of one layer's attention; None where it sees the whole context."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == SLIDING:
            return self.sliding_window
        return None

    @property
    def kv_window(self) -> int | None:
        """Where every layer slides: the widest window, beyond which no layer reads a key
        (its blocks can be freed); None where some layer attends to the whole context."""
        windows = [self.layer_window(i) for i in range(self.num_layers)]
        if not windows or any(w is None for w in windows):
            return None
        return max(w for w in windows if w is not None)


SLIDING, FULL = "sliding_attention", "full_attention"


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The language model's config: `text_config` where the checkpoint nests it (a vision
    model's language model), else the config itself."""
    return hf.get("text_config") or hf


def _layer_types(hf: dict[str, Any], window: int | None) -> list[str] | None:
    """`layer_types` as the config gives it, else Qwen2/3's rule (layers from
    `max_window_layers` on slide), else None (every layer slides where there is a window)."""
    types = hf.get("layer_types")
    if types is not None:
        types = list(types)
        if not set(types) <= {SLIDING, FULL} or len(types) != hf["num_hidden_layers"]:
            raise ModelLoadError(
                f"layer_types must name {hf['num_hidden_layers']} layers as {SLIDING!r} or "
                f"{FULL!r}: {types}"
            )
        return types
    if window is not None and "max_window_layers" in hf:
        start = int(hf["max_window_layers"])
        return [SLIDING if i >= start else FULL for i in range(hf["num_hidden_layers"])]
    return None


def head_shards(num_heads: int, num_kv_heads: int, rank: int, size: int) -> list[tuple[int, int]]:
    """[(first query head, query heads), (first key/value head, key/value heads)] of a
    tensor-parallel rank: an even share of each, or one key/value head replicated over
    size / num_kv_heads ranks where there are fewer than ranks."""
    if num_heads % size:
        raise ModelLoadError(
            f"{num_heads} attention heads do not split over tensor-parallel size {size}"
        )
    q = num_heads // size
    if num_kv_heads >= size:
        if num_kv_heads % size:
            raise ModelLoadError(
                f"{num_kv_heads} key/value heads do not split over tensor-parallel size {size}"
            )
        kv = num_kv_heads // size
        return [(rank * q, q), (rank * kv, kv)]
    if size % num_kv_heads:
        raise ModelLoadError(
            f"tensor-parallel size {size} is not a multiple of {num_kv_heads} key/value heads"
        )
    return [(rank * q, q), (rank * num_kv_heads // size, 1)]
