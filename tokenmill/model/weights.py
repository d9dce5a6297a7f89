"""Build a model on the meta device and fill it from a ModelSource, with a progress bar on a
terminal (plain log lines otherwise)."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from tqdm import tqdm

from tokenmill.errors import ModelLoadError
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.model.interface import CausalLM, on_module_loaded
from tokenmill.model.source import ModelSource

logger = logging.getLogger(__name__)

# torch.nn.init's in-place initializers: a module's reset_parameters calls them through the
# module attribute, so replacing them for the meta build skips the initialization
_INITIALIZERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
    "sparse_",
)  # fmt: skip


def build_model(cls: type[CausalLM], source: ModelSource, layers: range | None = None) -> CausalLM:
    """The model's structure on the meta device, no weights yet (fill_model loads them).
    `layers`: a pipeline stage's decoder layers only (model.layers[i] is then layer
    layers.start + i; `first_layer` says so)."""
    with torch.device("meta"), skip_init():
        model = cls(source.hf_config)
    if layers is not None:  # a pipeline stage: its run of the decoder layers
        keep_layers(model, layers)  # type: ignore[arg-type]
    return model


def fill_model(
    model: CausalLM,
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int | None = None,
    layers: range | None = None,
    skip: frozenset[str] = frozenset(),
    module_loaded: Callable[[str], None] | None = None,
) -> None:
    """Give build_model's model the checkpoint's weights in `dtype` on `device` (but those
    named in `skip`, which a backend holds as stored: never read), its rotary tables for
    sequences of up to max_model_len tokens (None: the model's own), and eval mode.
    `module_loaded(path)`: called as each nn.Linear's (an nn.Embedding's, a mixture's
    experts') weights are all in (a backend packs it then and its float tensors are freed: the whole model is
    never held in float)."""
    module: torch.nn.Module = model  # type: ignore[assignment]
    weights = _on_device(source, device, dtype, skip)
    if layers is not None:
        weights = _stage_weights(weights, layers)
    _allocate(module, device, dtype)
    with on_module_loaded(module_loaded):
        model.load_weights(weights)
    for rotary in module.modules():  # every rotary table the model has
        if isinstance(rotary, RotaryEmbedding):
            rotary.build(device, max_model_len)
    module.eval()


def _allocate(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """`module.to_empty(device=device).to(dtype)` in one allocation per tensor (floating
    point ones in `dtype`), through torch.empty: to_empty's empty_like goes through torch's
    reference implementation, whose first call imports sympy (~0.25 s of every start)."""

    def empty(tensor: torch.Tensor) -> torch.Tensor:
        kind = dtype if tensor.is_floating_point() else tensor.dtype
        return torch.empty(tensor.shape, dtype=kind, device=device)

    module._apply(empty)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def stage_layers(num_layers: int, stage: int, stages: int) -> range:
    """The decoder layers of pipeline stage `stage`: an even split, earlier stages one
    fewer where it does not divide."""
    if stages > num_layers:
        raise ModelLoadError(f"{num_layers} layers do not split over {stages} pipeline stages")
    return range(stage * num_layers // stages, (stage + 1) * num_layers // stages)


def keep_layers(model: torch.nn.Module, layers: range) -> None:
    """Drop the decoder layers outside `layers` (before the weights load)."""
    stack = model.get_submodule("model")
    current = stack.get_submodule("layers")
    assert isinstance(current, torch.nn.ModuleList)
    stack.layers = torch.nn.ModuleList([current[i] for i in layers])
    model.first_layer = layers.start  # type: ignore[assignment]


def _stage_weights(
    weights: Iterator[tuple[str, torch.Tensor]], layers: range
) -> Iterator[tuple[str, torch.Tensor]]:
    """A stage's tensors: its layers' renamed to their place in the stage, the others'
    skipped (embedding, final norm and head load on every stage)."""
    for name, tensor in weights:
        match = _LAYER.match(name)
        if match is None:
            yield name, tensor
            continue
        index = int(match[1])
        if index in layers:
            yield f"model.layers.{index - layers.start}.{name[match.end() :]}", tensor


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


def _on_device(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    skip: frozenset[str] = frozenset(),
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors on `device`: on the CPU in their stored dtype, a parameter's
    copy_ converting as it copies (a converted copy of the largest tensor, the embedding,
    would double its memory while it loads); to another device converted as they move."""
    stream, total = source.iter_weights(skip), source.num_weights - len(skip)
    moved = None if device.type == "cpu" else dtype
    if _stderr_is_a_terminal():
        weights: Iterator[tuple[str, torch.Tensor]] = tqdm(
            stream, total=total, desc="Loading weights", unit="tensor", leave=False
        )
        for name, tensor in weights:
            yield name, tensor.to(device=device, dtype=moved)
        return
    # a log file or a pipe: a bar would write a carriage-return line per update into it
    logger.info("loading %d weight tensors from %s", total, source.path)
    start, count, size = time.monotonic(), 0, 0
    for name, tensor in stream:
        count += 1
        size += tensor.numel() * tensor.element_size()
        yield name, tensor.to(device=device, dtype=moved)
    logger.info(
        "loaded %d weight tensors (%.1f MiB) in %.1f s",
        count, size / 2**20, time.monotonic() - start,
    )  # fmt: skip


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False
