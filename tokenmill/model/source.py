"""ModelSource: a located model's config, tokenizer and lazy weight stream, whatever the format."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from tokenmill.tokenizer.tokenizer import Tokenizer

WeightStream = Iterator[tuple[str, torch.Tensor]]


@dataclass(slots=True)
class ModelSource:
    """Everything the engine needs to build a model, read from one checkpoint.

    `hf_config` is a config.json-style dict with at least: architectures, model_type, hidden_size,
    intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
    rms_norm_eps, rope_theta, rope_scaling (HF dict with "rope_type", or None),
    max_position_embeddings, vocab_size, tie_word_embeddings, attention_bias and torch_dtype (the
    stored float type: "float32", "bfloat16" or "float16"; "float32" for GGUF, which is dequantized).
    """

    name: str  # what the user asked for: a path, a hub id, or the bundled model's display name
    path: str  # resolved local path: a model directory or a .gguf file
    file_format: Literal["gguf", "safetensors"]
    hf_config: dict[str, Any]
    tokenizer: Tokenizer
    num_weights: int  # how many tensors iter_weights yields (for a progress bar)
    read_weights: Callable[[frozenset[str]], WeightStream] = field(repr=False)
    # GGUF: HF weight name -> (GGML type, [N, row_bytes] uint8 blocks as stored, rows in HF
    # order), for `quantization="gguf"`; None for other formats
    read_blocks: Callable[[str], tuple[int, torch.Tensor] | None] | None = field(
        default=None, repr=False
    )

    def iter_weights(self, skip: frozenset[str] = frozenset()) -> WeightStream:
        """(HF parameter name, CPU tensor) pairs, read lazily one at a time from the mmap.

        Names are as in transformers' state dict ("model.layers.0.self_attn.q_proj.weight");
        "lm_head.weight" is absent when the embeddings are tied. Tensors keep the stored dtype
        (GGUF: dequantized to float32). Each call starts a fresh pass over the files. The
        names in `skip` are passed over unread (weights the backend runs on as stored).
        """
        return self.read_weights(skip)
