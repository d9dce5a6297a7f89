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
