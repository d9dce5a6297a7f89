"""Which model class serves which Hugging Face `architectures` name."""

from __future__ import annotations

from typing import Any

from tokenmill.errors import ModelLoadError
from tokenmill.model.gemma import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
)
from tokenmill.model.granite import GraniteForCausalLM
from tokenmill.model.idefics3 import Idefics3ForConditionalGeneration
from tokenmill.model.interface import CausalLM
from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.llava import LlavaForConditionalGeneration
from tokenmill.model.llava_next import LlavaNextForConditionalGeneration
from tokenmill.model.mixtral import MixtralForCausalLM
from tokenmill.model.phi3 import Phi3ForCausalLM
from tokenmill.model.qwen2 import Qwen2ForCausalLM
from tokenmill.model.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from tokenmill.model.qwen2_moe import Qwen2MoeForCausalLM
from tokenmill.model.qwen3 import Qwen3ForCausalLM
from tokenmill.model.qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,  # its language model
    "GraniteForCausalLM": GraniteForCausalLM,
    "Idefics3ForConditionalGeneration": Idefics3ForConditionalGeneration,  # SmolVLM too
    "LlamaForCausalLM": LlamaForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": LlavaNextForConditionalGeneration,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(hf_config: dict[str, Any]) -> type[CausalLM]:
    names = hf_config.get("architectures") or []
    for name in names:
        if name in MODEL_CLASSES:
            return MODEL_CLASSES[name]
    raise ModelLoadError(
        f"unsupported architecture {', '.join(names) or '(none given)'}; "
        f"tokenmill supports {', '.join(MODEL_CLASSES)}"
    )
