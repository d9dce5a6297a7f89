"""Phi-3 (mini/medium, 4k and 128k context), Phi-3.5-mini, Phi-4-mini: the Llama architecture,
its checkpoint storing q/k/v and gate/up already fused (qkv_proj, gate_up_proj: loaded whole
into the same modules), with LongRoPE scaling (layers/rotary.py) and partial rotary
embeddings (Phi-4-mini turns 3/4 of each head)."""

from __future__ import annotations

from typing import Any

from tokenmill.errors import ModelLoadError
from tokenmill.layers.rotary import LongRope, RotaryEmbedding, rope_type
from tokenmill.model.llama import LlamaForCausalLM

_PHI3_ORIGINAL_CONTEXT = 4096  # transformers' Phi3Config default original_max_position_embeddings


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, hf_config: dict[str, Any]):
        super().__init__(hf_config)
        cfg = self.config
        cfg.rope_scaling = scaling = _rope_scaling(cfg.rope_scaling, hf_config)
        rotary_dim = int(cfg.head_dim * cfg.partial_rotary_factor)  # transformers' rounding
        if rotary_dim % 2:
            raise ModelLoadError(
                f"partial_rotary_factor {cfg.partial_rotary_factor} turns {rotary_dim} of a "
                f"head's {cfg.head_dim} dims; rotary embeddings turn pairs, an even number"
            )
        self.rotary = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, scaling, rotary_dim
        )
        if scaling is not None and rope_type(scaling) == "longrope":
            # checked now, not when the table is built after the weights have loaded
            LongRope.parse(scaling, rotary_dim, cfg.max_position_embeddings)


def _rope_scaling(
    scaling: dict[str, Any] | None, hf_config: dict[str, Any]
) -> dict[str, Any] | None:
    """Transformers' reading of a Phi-3 config: "su" and "yarn" (earlier names) mean
    longrope, and the top-level original_max_position_embeddings wins over the rope dict's."""
    if rope_type(scaling) not in ("longrope", "su", "yarn"):
        return scaling
    assert scaling is not None
    original = (
        hf_config.get("original_max_position_embeddings")
        or scaling.get("original_max_position_embeddings")
        or _PHI3_ORIGINAL_CONTEXT
    )
    rest = {k: v for k, v in scaling.items() if k != "type"}
    return {**rest, "rope_type": "longrope", "original_max_position_embeddings": original}
