"""The CUDA backend: element-wise ops as Triton kernels (backends/cuda_ops.py), attention
as a Triton kernel over the paged cache (backends/cuda_attention.py), the rest torch;
decode steps replayed as CUDA graphs
(backends/cuda_graphs.py), and the kernels compiled at load rather than on the first
requests.
"""

from __future__ import annotations

import logging
from array import array

import torch

from tokenmill.backends.base import Backend, GraphSettings
from tokenmill.backends.cuda_attention import TritonAttention
from tokenmill.backends.cuda_graphs import DecodeGraphs
from tokenmill.backends.cuda_ops import TritonOps
from tokenmill.kernels import triton_attention
from tokenmill.layers.attention import KVCache, ScheduledChunk, StepLayout
from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.layers.ops import ForwardContext
from tokenmill.model.interface import CausalLM

logger = logging.getLogger(__name__)


class CudaBackend(Backend):
    """Triton element-wise ops and paged attention; decode steps replayed as CUDA graphs
    (backends/cuda_graphs.py)."""

    name = "cuda"
    # the scratch blocks: captured steps' padding rows write to the first; the warm-up's
    # prompts (up to 64 tokens, the most rows a program takes) fill them
    extra_blocks = 4

    def __init__(self) -> None:
        super().__init__()
        self.ops: TritonOps = TritonOps()
        self.attention: TritonAttention = TritonAttention()
        self.graphs: DecodeGraphs | None = None

    @property
    def description(self) -> str:
        ops = "torch ops" if self.ops.failed else "Triton element-wise ops"
        graphs = "eager" if self.graphs is None or self.graphs.failed else "CUDA graphs"
        return f"{ops}, Triton paged attention, {graphs}"

    def ready(self, model: CausalLM, kv_caches: list[KVCache], graphs: GraphSettings) -> None:
        device = kv_caches[0][0].device
        k_cache = kv_caches[0][0]
        q = k_cache.new_empty(0, model.config.num_heads, model.config.head_dim)
        if not self.attention.runs(q, k_cache, graphs.block_size):
            return  # (the reference attends: nothing to compile, nothing to capture)
        if device.type == "cuda":  # (Triton's interpreter compiles nothing)
            with torch.inference_mode():
                self.warm_up(model, kv_caches, graphs)
        if not graphs.sizes or not self.attention.runs(q, k_cache, graphs.block_size):
            return  # (--enforce-eager, or the kernel failed to compile in the warm-up)
        if any(isinstance(m, SparseMoeBlock) for m in model.modules()):
            logger.info(
                "CUDA graphs: none for a mixture of experts yet (its routing counts each "
                "expert's tokens on the host); decode steps run eagerly"
            )
            return
        self.graphs = DecodeGraphs(model, self.ops, self.attention, kv_caches, graphs, device)
        with torch.inference_mode():
            self.graphs.capture()

    def warm_up(self, model: CausalLM, kv_caches: list[KVCache], graphs: GraphSettings) -> None:
        """Compile the kernel's prompt variants at load (one per rows-a-program count, the
        first time a prompt needs it: seconds on a GPU, which the first requests would
        wait out): a step of a decode and a prompt of each size, on the scratch blocks."""
        bs, scratch = graphs.block_size, graphs.scratch_block
        cfg = model.config
        group = cfg.num_heads // cfg.num_kv_heads
        longest = self.extra_blocks * bs
        sizes = {}  # rows a program -> the shortest prompt that takes it
        for n in range(longest, 1, -1):
            sizes[triton_attention.rows_per_program(n, group)] = n
        device = kv_caches[0][0].device
        try:
            for n in sorted(sizes.values()):
                table = array("q", range(scratch, scratch + -(-n // bs)))
                chunks = [ScheduledChunk(0, 1, 1, table), ScheduledChunk(1, 0, n, table)]
                positions = torch.tensor([1, *range(n)], device=device)
                slots = scratch * bs + positions
                layout = StepLayout(chunks, 1, positions, slots, bs)
                ctx = ForwardContext(
                    self.ops, self.attention, self.attention.build_metadata(layout), kv_caches
                )
                model(torch.zeros_like(positions), positions, ctx)
        except Exception as error:  # noqa: BLE001 - kernels no GPU here has compiled yet
            if device.type != "cuda":
                raise
            logger.warning("warming the kernels up failed (%s: %s)", type(error).__name__, error)

    def forward(
        self,
        model: CausalLM,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        ctx: ForwardContext,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        graphs = self.graphs
        if graphs is not None and inputs_embeds is None:
            size = graphs.size_for(input_ids, positions, ctx)
            if size:
                return graphs.run(size, input_ids, ctx)
        return model(input_ids, positions, ctx, inputs_embeds)
