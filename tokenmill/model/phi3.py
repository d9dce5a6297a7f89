"""Phi-3 (mini/medium, 4k context): the Llama architecture, its checkpoint storing q/k/v and
gate/up already fused (qkv_proj, gate_up_proj: loaded whole into the same modules)."""

from __future__ import annotations

from typing import Any

from tokenmill.errors import ModelLoadError
from tokenmill.model.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def __init__(self, hf_config: dict[str, Any]):
        rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
        partial = hf_config.get("partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ModelLoadError(
                f"partial rotary embeddings (partial_rotary_factor {partial}) are not supported "
                "yet (Phi-4-mini)"
            )
        super().__init__(hf_config)
