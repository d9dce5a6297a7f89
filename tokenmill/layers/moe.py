"""Mixture of experts: a router picks each token's top-k experts (SiLU-gated MLPs, their
weights stacked [E, ...]); each step groups the tokens by expert, so every expert runs one
matmul over all of its tokens, and the outputs are added back weighted by the router. A
shared expert (Qwen2-MoE) runs on every token beside them."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from tokenmill.distributed import group as parallel
from tokenmill.errors import ModelLoadError
from tokenmill.layers.ops import ForwardContext, TorchOps

ExpertShard = tuple[int, int | None]  # (expert, part of a fused projection or None)


class Experts(nn.Module):
    """E experts: w13 [E, 2I, C] (gate | up, as the checkpoint's two projections), w2 [E, C, I].
    Under tensor parallelism every rank holds every expert's I / ranks share of the
    intermediate size (gate and up rows, down columns): its output is a partial sum."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        tp = parallel.current()
        if intermediate % tp.size:
            raise ModelLoadError(
                f"expert size {intermediate} does not split over tensor-parallel size {tp.size}"
            )
        intermediate //= tp.size
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.num_experts, self.intermediate = num_experts, intermediate
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard: object) -> None:
        """One expert's projection: (expert, 0 = gate | 1 = up) into w13, (expert, None) w2."""
        if not isinstance(shard, tuple) or not 0 <= shard[0] < self.num_experts:
            raise ModelLoadError(f"expert weight with no expert index ({shard})")
        expert, part = shard
        dst, size = param[expert], self.intermediate
        whole = size * self.tp_size
        if part is not None:  # gate or up: this rank's rows
            dst = dst.narrow(0, part * size, size)
            if self.tp_size > 1 and loaded.shape[0] == whole:
                loaded = loaded.narrow(0, self.tp_rank * size, size)
        elif self.tp_size > 1 and loaded.dim() == 2 and loaded.shape[1] == whole:
            loaded = loaded.narrow(1, self.tp_rank * size, size)  # down: this rank's columns
        if dst.shape != loaded.shape:
            raise ModelLoadError(
                f"expert {expert}: shape {tuple(loaded.shape)} does not fit {tuple(dst.shape)}"
            )
        with torch.no_grad():
            dst.copy_(loaded)

    def load_shards(self) -> set[tuple[str, object]]:
        """Every (parameter, shard) copy loading makes: each expert's gate, up and down."""
        return {
            (leaf, (expert, part))
            for expert in range(self.num_experts)
            for leaf, part in (("w13", 0), ("w13", 1), ("w2", None))
        }

    def forward(
        self,
        x: torch.Tensor,  # [T, C]
        weights: torch.Tensor,  # [T, k] router weights of the chosen experts
        experts: torch.Tensor,  # [T, k] their indices
        ops: TorchOps,
    ) -> torch.Tensor:  # [T, C]
        def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
            return ops.silu_and_mul(rows @ self.w13[expert].t()) @ self.w2[expert].t()

        return route(x, weights, experts, self.num_experts, expert_mlp)


class PackedExperts(nn.Module):
    """Experts whose projections a backend packed (float16 panels, rtn's blocks, a GGUF
    file's blocks): per expert, gate|up [2I, C] and down [C, I] as modules x [T, K] ->
    [T, N]."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module]):
        super().__init__()
        self.gate_up, self.down = nn.ModuleList(gate_up), nn.ModuleList(down)
        self.num_experts = len(gate_up)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, ops: TorchOps
    ) -> torch.Tensor:  # as Experts
        def expert_mlp(expert: int, rows: torch.Tensor) -> torch.Tensor:
            return self.down[expert](ops.silu_and_mul(self.gate_up[expert](rows)))

        return route(x, weights, experts, self.num_experts, expert_mlp)


def route(
    x: torch.Tensor,  # [T, C]
    weights: torch.Tensor,  # [T, k]
    experts: torch.Tensor,  # [T, k]
    num_experts: int,
    expert_mlp: Callable[[int, torch.Tensor], torch.Tensor],  # (expert, rows [n, C]) -> [n, C]
) -> torch.Tensor:  # [T, C]
    """Each expert's MLP over the tokens routed to it, weighted and summed per token."""
    out = torch.zeros_like(x)
    k = experts.shape[1]
    flat = experts.flatten()
    order = flat.argsort(stable=True)  # (token, choice) pairs grouped by expert
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        picks = order[start : start + count]
        start += count
        tokens = picks // k
        h = expert_mlp(expert, x[tokens])
        out.index_add_(0, tokens, h * weights.flatten()[picks, None])
    return out


class Router(nn.Linear):
    """A linear whose outputs choose experts (or weigh the shared one): a quantization that
    rounds weights (--quantization rtn) leaves it alone, as vLLM does, since a small change
    in its logits can send a token to another expert."""


class SparseMoeBlock(nn.Module):
    """The router (`gate`) and the experts: softmax over the experts, the top k, their
    weights renormalised to sum to 1 where the model says so. Where the model gives a
    `shared_expert` (a module called as `(x, ctx)`), every token also runs it, scaled by
    sigmoid(`shared_expert_gate`(x)), a scalar per token, and added to the experts' sum."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        shared_expert: nn.Module | None = None,
    ):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ModelLoadError(f"{top_k} experts per token out of {num_experts}")
        self.top_k, self.renormalize = top_k, renormalize
        self.tp = parallel.current()
        self.gate = Router(hidden, num_experts, bias=False)
        self.experts = Experts(num_experts, hidden, intermediate)
        self.shared_expert = shared_expert
        self.shared_expert_gate = None if shared_expert is None else Router(hidden, 1, bias=False)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:  # [T, C] -> [T, C]
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self.tp.all_reduce(self.experts(x, weights.to(x.dtype), experts, ctx.ops))
        if self.shared_expert is None or self.shared_expert_gate is None:
            return out
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x, ctx)  # [T, C]
        return out + shared
