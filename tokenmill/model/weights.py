"""Build a model on the meta device and fill it from a ModelSource, with a progress bar."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm import tqdm

from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.model.interface import CausalLM
from tokenmill.model.source import ModelSource


def load_model(
    cls: type[CausalLM],
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int | None = None,
) -> CausalLM:
    """The model with the checkpoint's weights in `dtype` on `device`, in eval mode; its
    rotary tables for sequences of up to max_model_len tokens (None: the model's own)."""
    with torch.device("meta"):
        model = cls(source.hf_config)
    module: torch.nn.Module = model  # type: ignore[assignment]
    module.to_empty(device=device)
    module.to(dtype)
    model.load_weights(_converted(source, device, dtype))
    for rotary in module.modules():  # every rotary table the model has
        if isinstance(rotary, RotaryEmbedding):
            rotary.build(device, max_model_len)
    module.eval()
    return model


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
