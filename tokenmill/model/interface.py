"""The interface every architecture implements, and the weight loading they share.

An architecture is one file under model/ with a class that builds its modules on any
device, maps checkpoint names to its parameters through `packed_modules_mapping` (the
checkpoint's separate projections -> the fused module that holds them) and computes
hidden states and logits for a flattened batch of tokens. The registry (registry.py)
maps Hugging Face `architectures` names to these classes. Nothing else changes to add
one: backends pack and fuse whatever the model's modules are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from tokenmill.errors import ModelLoadError
from tokenmill.layers.fusion import PreNormDecoder
from tokenmill.layers.linear import default_weight_loader
from tokenmill.layers.ops import ForwardContext
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.model.config import ArchConfig


class CausalLM(Protocol):
    """A decoder-only language model over a flattened batch of tokens from many requests.

    Module names follow the checkpoint's (transformers') names, except where
    `packed_modules_mapping` fuses several checkpoint modules into one.
    """

    config: ArchConfig
    # fused module name -> the checkpoint's module names it holds, in shard order
    packed_modules_mapping: ClassVar[dict[str, list[str]]]
    rotary: RotaryEmbedding
    lm_head: nn.Module | None  # None: the logits come from the tied embedding

    def __init__(self, hf_config: dict[str, Any]) -> None: ...

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor: ...  # [T] -> [T, C]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: ForwardContext,
        inputs_embeds: torch.Tensor | None = None,  # [T, C] instead of embed_input_ids(input_ids)
    ) -> torch.Tensor: ...  # [T] -> hidden [T, C] before the final norm

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [N, C] after final norm

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...  # [N, C] -> [N, V] f32

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    @property
    def output_weight(self) -> torch.Tensor: ...  # [V, C]: what lm_head computes with

    def pre_norm_decoder(self) -> PreNormDecoder | None: ...  # its layers, where fusable

    # nn.Module's
    def modules(self) -> Iterable[nn.Module]: ...
    def named_modules(self) -> Iterable[tuple[str, nn.Module]]: ...
    def parameters(self) -> Iterable[nn.Parameter]: ...
    def get_submodule(self, target: str) -> nn.Module: ...
    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: ForwardContext,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def unpacked(mapping: dict[str, list[str]]) -> dict[str, tuple[str, int]]:
    """checkpoint module name -> (fused module name, shard index)."""
    return {part: (fused, i) for fused, parts in mapping.items() for i, part in enumerate(parts)}


def checkpoint_weight_names(model: CausalLM, module_path: str) -> list[str]:
    """The checkpoint names of the weight a module computes with: one per shard of a fused
    module ("model.layers.0.self_attn.qkv_proj" -> its q_proj, k_proj, v_proj weights)."""
    if module_path == "lm_head" and model.config.tie_word_embeddings:
        return ["model.embed_tokens.weight"]
    parent, _, name = module_path.rpartition(".")
    parts = model.packed_modules_mapping.get(name, [name])
    return [f"{parent}.{part}.weight" if parent else f"{part}.weight" for part in parts]


_EXPERT = re.compile(r"(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<part>\w+)\.weight")


# called with the path of a module a backend packs (an nn.Linear, an nn.Embedding, a
# mixture's experts) once its every parameter (each shard of a fused one) has loaded: the
# backend packs it then, so the float weights of the whole model are never all held at
# once (weights.py: fill_model)
_ON_MODULE_LOADED: ContextVar[Callable[[str], None] | None] = ContextVar(
    "on_module_loaded", default=None
)


@contextmanager
def on_module_loaded(callback: Callable[[str], None] | None) -> Iterator[None]:
    """Within: load_checkpoint calls `callback(module path)` as each nn.Linear and
    nn.Embedding, and each module with `load_shards()` (Experts), completes."""
    token = _ON_MODULE_LOADED.set(callback)
    try:
        yield
    finally:
        _ON_MODULE_LOADED.reset(token)


class _LoadProgress:
    """Which (parameter, shard) copies each nn.Linear and nn.Embedding, and each module that
    lists its own (`load_shards`), still waits for."""

    def __init__(self, model: nn.Module, packed_modules_mapping: dict[str, list[str]]):
        self.waiting: dict[str, set[tuple[str, Any]]] = {}
        for path, module in model.named_modules():
            if hasattr(module, "load_shards"):
                self.waiting[path] = set(module.load_shards())
            if not isinstance(module, nn.Linear | nn.Embedding):
                continue
            parts = packed_modules_mapping.get(path.rpartition(".")[2])
            shards: list[int | None] = list(range(len(parts))) if parts else [None]
            leaves = [name for name, _ in module.named_parameters(recurse=False)]
            self.waiting[path] = {(leaf, shard) for leaf in leaves for shard in shards}

    def loaded(self, module_path: str, leaf: str, shard: Any) -> bool:
        """Record a copy; True when it was the module's last."""
        waiting = self.waiting.get(module_path)
        if waiting is None or (leaf, shard) not in waiting:
            return False
        waiting.discard((leaf, shard))
        if waiting:
            return False
        del self.waiting[module_path]
        return True


def load_checkpoint(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    packed_modules_mapping: dict[str, list[str]],
    skip: tuple[str, ...] = (),
    expert_params_mapping: dict[str, tuple[str, int | None]] | None = None,
) -> None:
    """Copy checkpoint tensors (transformers' names) into the model's parameters through
    each module's `weight_loader` (shard-aware), else a plain copy; every parameter must be
    covered. Names containing any of `skip` are not the model's (e.g. rotary buffers).
    `expert_params_mapping`: an expert's projection ("...experts.3.w1.weight") -> (the
    stacked parameter of the experts module, part of it), loaded with shard (3, part)."""
    params = dict(model.named_parameters())
    missing = set(params)
    fused_of = unpacked(packed_modules_mapping)
    callback = _ON_MODULE_LOADED.get()
    progress = _LoadProgress(model, packed_modules_mapping) if callback else None
    for name, tensor in weights:
        if any(s in name for s in skip):
            continue
        module_path, _, leaf = name.rpartition(".")
        parent, _, module_name = module_path.rpartition(".")
        shard: Any = None  # a fused part's index, or (expert, part)
        expert = _EXPERT.fullmatch(name) if expert_params_mapping else None
        if expert is not None and expert_params_mapping is not None:
            param_name, part = expert_params_mapping.get(expert["part"], (expert["part"], None))
            module_path, leaf = expert["experts"], param_name
            shard = (int(expert["expert"]), part)
        elif module_name in fused_of:
            fused, shard = fused_of[module_name]
            module_path = f"{parent}.{fused}" if parent else fused
        target = f"{module_path}.{leaf}"
        if target not in params:
            raise ModelLoadError(
                f"checkpoint tensor {name!r} has no place in {type(model).__name__}"
            )
        loader = getattr(model.get_submodule(module_path), "weight_loader", default_weight_loader)
        try:
            loader(params[target], tensor, shard)
        except ModelLoadError as e:
            raise ModelLoadError(f"{target}: {e}") from None
        missing.discard(target)
        if progress is not None and callback and progress.loaded(module_path, leaf, shard):
            # the module's float tensors go once the callback has packed them: drop this
            # loop's references first (a large one, the embedding, would be held twice)
            del tensor
            for done in [n for n in params if n.rpartition(".")[0] == module_path]:
                del params[done]
            callback(module_path)
    if missing:
        raise ModelLoadError(f"checkpoint lacks weights for: {', '.join(sorted(missing)[:5])}")
