"""Build a model on the meta device and fill it from a ModelSource, with a progress bar on a
terminal (plain log lines otherwise)."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.model.interface import CausalLM
from tokenmill.model.source import ModelSource

logger = logging.getLogger(__name__)

# torch.nn.init's in-place initializers: a module's reset_parameters calls them through the
# module attribute, so replacing them for the meta build skips the initialization
_INITIALIZERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
    "sparse_",
)  # fmt: skip


def load_model(
    cls: type[CausalLM],
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int | None = None,
) -> CausalLM:
    """The model with the checkpoint's weights in `dtype` on `device`, in eval mode; its
    rotary tables for sequences of up to max_model_len tokens (None: the model's own)."""
    with torch.device("meta"), skip_init():
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


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """No random initialization while the model is built on the meta device: the values do
    not exist and the checkpoint replaces them. Besides the time, this keeps torch from
    importing torch._dynamo (nn.init.normal_ on a meta tensor goes through a decomposition
    that does), which imports triton where it is installed; triton's nanobind bindings then
    print some 30 lines of "nanobind: leaked ..." when the process exits."""
    init = torch.nn.init
    saved = {name: getattr(init, name) for name in _INITIALIZERS if hasattr(init, name)}

    def keep(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor

    for name in saved:
        setattr(init, name, keep)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(init, name, function)


def _converted(
    source: ModelSource, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    stream = source.iter_weights()
    if _stderr_is_a_terminal():
        weights: Iterator[tuple[str, torch.Tensor]] = tqdm(
            stream, total=source.num_weights, desc="Loading weights", unit="tensor", leave=False
        )
        for name, tensor in weights:
            yield name, tensor.to(device=device, dtype=dtype)
        return
    # a log file or a pipe: a bar would write a carriage-return line per update into it
    logger.info("loading %d weight tensors from %s", source.num_weights, source.path)
    start, count, size = time.monotonic(), 0, 0
    for name, tensor in stream:
        count += 1
        size += tensor.numel() * tensor.element_size()
        yield name, tensor.to(device=device, dtype=dtype)
    logger.info(
        "loaded %d weight tensors (%.1f MiB) in %.1f s",
        count, size / 2**20, time.monotonic() - start,
    )  # fmt: skip


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False
