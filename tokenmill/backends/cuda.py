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
from tokenmill.layers.rotary import RotaryEmbedding
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
        k_cache = kv_caches[0][0]
        device = k_cache.device
        q = k_cache.new_empty(0, model.config.num_heads, model.config.head_dim)
        if not self.attention.runs(q, k_cache, graphs.block_size):
            return  # (the reference attends: nothing to compile, nothing to capture)
        if device.type == "cuda":  # (Triton's interpreter compiles nothing)
            with torch.inference_mode():
                self.warm_up(model, kv_caches, graphs)
        if not graphs.sizes or not self.attention.runs(q, k_cache, graphs.block_size):
            return  # (--enforce-eager, or the kernel failed to compile in the warm-up)
        if getattr(model, "uses_mrope", False):  # (its positions [3, T] run eagerly)
            logger.info("CUDA graphs: none for multimodal rotary positions yet")
            return
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
        """Compile the kernels' variants at load (each the first time a step needs it:
        seconds on a GPU, which the first requests would wait out), on the scratch blocks: a
        step of a decode and a prompt for each rows-a-program count, then a lone decode over
        8, 16, 32 and 64 blocks of keys (cycling through the scratch blocks), as far as the
        model's positions go, for each count of splits."""
        bs, scratch = graphs.block_size, graphs.scratch_block
        cfg = model.config
        group = cfg.num_heads // cfg.num_kv_heads
        longest = self.extra_blocks * bs
        sizes = {}  # rows a program -> the shortest prompt that takes it
        for n in range(longest, 1, -1):
            sizes[triton_attention.rows_per_program(n, group)] = n
        steps = []  # (chunks: (start, tokens, table)) of each step
        for n in sorted(sizes.values()):
            table = array("q", range(scratch, scratch + -(-n // bs)))
            steps.append([(1, 1, table), (0, n, table)])
        # (a position past the rotary tables would be a device-side assert on a GPU)
        positions = min(
            [cfg.max_context]
            + [m.max_positions for m in model.modules() if isinstance(m, RotaryEmbedding)]
        )
        for blocks in (8, 16, 32, 64):
            if blocks * bs <= positions:
                table = array("q", [scratch + i % self.extra_blocks for i in range(blocks)])
                steps.append([(blocks * bs - 1, 1, table)])
        device = kv_caches[0][0].device
        try:
            for step in steps:
                self._warm_up_step(model, kv_caches, step, bs, device)
        except Exception as error:  # noqa: BLE001 - kernels no GPU here has compiled yet
            if device.type != "cuda":
                raise
            logger.warning("warming the kernels up failed (%s: %s)", type(error).__name__, error)

    def _warm_up_step(
        self,
        model: CausalLM,
        kv_caches: list[KVCache],
        step: list[tuple[int, int, array[int]]],
        bs: int,
        device: torch.device,
    ) -> None:
        chunks: list[ScheduledChunk] = []
        positions: list[int] = []
        slots: list[int] = []
        row = 0
        for start, n, table in step:
            chunks.append(ScheduledChunk(row, start, n, table))
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            row += n
        position_ids = torch.tensor(positions, device=device)
        num_decodes = sum(1 for c in chunks if c.is_decode)
        layout = StepLayout(chunks, num_decodes, position_ids, torch.tensor(slots, device=device),
                            bs)  # fmt: skip
        meta = self.attention.build_metadata(layout)
        model(torch.zeros_like(position_ids), position_ids,
              ForwardContext(self.ops, self.attention, meta, kv_caches))  # fmt: skip

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
