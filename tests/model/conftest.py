"""The reference: transformers loading the bundled GGUF, dequantized to float32 (loaded once)."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def hf_reference(bundled_gguf_path):
    from transformers import AutoModelForCausalLM

    path = Path(bundled_gguf_path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def bundled_llm(bundled_gguf_path):
    """The bundled model in float32 behind the offline API, shared by the engine-level tests."""
    from tokenmill import LLM

    return LLM(bundled_gguf_path, dtype="float32", kv_cache_memory=256 << 20)
