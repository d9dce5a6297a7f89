"""Backend: how a model runs on a device, chosen once at load.

A backend packs the model's weights into the format it runs (a pass over whatever
linears the model has), gives the layers their ops and attention, and may run a whole
step its own way (a fused decode). The reference is plain torch on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import Quantization
from tokenmill.layers.attention import AttentionBackend, TorchAttention
from tokenmill.layers.linear import BlockLookup
from tokenmill.layers.ops import ForwardContext, KVCache, TorchOps
from tokenmill.model.interface import CausalLM


@dataclass(frozen=True, slots=True)
class GraphSettings:
    """What a backend that replays captured steps (CUDA graphs) may capture."""

    sizes: tuple[int, ...]  # batch sizes, one graph each; () = none (--enforce-eager)
    max_blocks: int  # KV blocks of the longest sequence a captured step holds
    scratch_block: int  # the first KV block past the pool's (Backend.extra_blocks)
    block_size: int
    scratch_blocks: int = 1  # how many there are (padding rows write to the first)


class Backend:
    """The torch reference: torch ops, SDPA attention, the checkpoint's own weights."""

    name = "torch"
    # KV blocks past the pool's that the backend keeps for itself (scratch blocks that
    # padding rows of a captured step write to)
    extra_blocks = 0

    def __init__(self) -> None:
        self.ops = TorchOps()
        self.attention: AttentionBackend = TorchAttention()

    @property
    def description(self) -> str:
        """One line for the startup log."""
        return "torch ops, SDPA attention"

    def check(self, quantization: Quantization | None) -> None:
        """Before anything loads: raise ModelLoadError for a setting this backend cannot run
        (an environment variable the format reads, say)."""

    def keep_blocks(
        self, model: CausalLM, quantization: Quantization | None, blocks: BlockLookup | None
    ) -> frozenset[str]:
        """Once before loading, on the model's structure (meta tensors): swap in the modules
        that run on the checkpoint's stored blocks; returns the checkpoint names they hold,
        which are then never read (nor dequantized, nor held in float)."""
        return frozenset()

    def pack_loaded(self, model: CausalLM, quantization: Quantization | None, path: str) -> None:
        """While loading, as the linear at `path` has all its weights: put it in the format
        this backend runs (what prepare would), so its float weights can go."""

    def prepare(self, model: CausalLM, quantization: Quantization | None) -> None:
        """Once after loading: put the other weights in the format this backend runs."""

    def ready(self, model: CausalLM, kv_caches: list[KVCache], graphs: GraphSettings) -> None:
        """Once the KV cache exists, in a worker without other ranks: capture the steps
        this backend replays (CUDA graphs)."""

    def forward(
        self,
        model: CausalLM,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        ctx: ForwardContext,
        inputs_embeds: torch.Tensor | None = None,  # [T, C]: instead of embedding input_ids
    ) -> torch.Tensor:  # hidden [T, C]
        return model(input_ids, positions, ctx, inputs_embeds)
