"""Build a model on the meta device and fill it from a ModelSource, with a progress bar."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm import tqdm

from tokenmill.model.llama import LlamaForCausalLM
from tokenmill.model.loader import ModelSource


def load_model(
    cls: type[LlamaForCausalLM], source: ModelSource, device: torch.device, dtype: torch.dtype
) -> LlamaForCausalLM:
    with torch.device("meta"):
        model = cls(source.hf_config)
    model.to_empty(device=device)
    model.to(dtype)
    model.load_weights(_converted(source, device, dtype))
    model.rotary.build(device)
    model.prepare_for_decode()
    return model.eval()


def _converted(
    source: ModelSource, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    weights = tqdm(
        source.iter_weights(),
        total=source.num_weights,
        desc="Loading weights",
        unit="tensor",
        leave=False,
    )
    for name, tensor in weights:
        yield name, tensor.to(device=device, dtype=dtype)
