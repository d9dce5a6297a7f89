"""SparseMoeBlock (tokens grouped by expert, one matmul each) against a per-token loop
over the router's top k, with and without a gated shared expert."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.layers.moe import SparseMoeBlock
from tokenmill.layers.ops import TorchOps

HIDDEN, INTERMEDIATE, SHARED, NUM_EXPERTS, TOP_K = 8, 6, 10, 4, 2


class SharedMLP(nn.Module):
    """A dense SiLU-gated MLP called as the block calls its shared expert: (x, ctx)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up = nn.Linear(HIDDEN, 2 * SHARED, bias=False)
        self.down = nn.Linear(SHARED, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor, ctx: SimpleNamespace) -> torch.Tensor:
        return self.down(ctx.ops.silu_and_mul(self.gate_up(x)))


def random_block(renormalize: bool, shared: bool) -> SparseMoeBlock:
    torch.manual_seed(0)
    block = SparseMoeBlock(
        HIDDEN, INTERMEDIATE, NUM_EXPERTS, TOP_K, renormalize, SharedMLP() if shared else None
    )
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0, 0.5)
    return block


def reference_token(block: SparseMoeBlock, x: torch.Tensor) -> torch.Tensor:  # [C] -> [C]
    """One token: its top k experts' outputs by their router probabilities, plus the shared
    expert's times sigmoid(shared_expert_gate . x)."""
    probs = torch.softmax(block.gate.weight @ x, dim=-1)
    top = sorted(range(NUM_EXPERTS), key=lambda e: -probs[e].item())[:TOP_K]
    total = sum(probs[e] for e in top) if block.renormalize else 1.0
    out = torch.zeros_like(x)
    for e in top:
        gate, up = (block.experts.w13[e] @ x).split(INTERMEDIATE)
        out += probs[e] / total * (block.experts.w2[e] @ (F.silu(gate) * up))
    if block.shared_expert is not None and block.shared_expert_gate is not None:
        shared = block.shared_expert
        gate, up = (shared.gate_up.weight @ x).split(SHARED)
        scale = torch.sigmoid(block.shared_expert_gate.weight[0] @ x)
        out += scale * (shared.down.weight @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("renormalize", [True, False])
def test_grouped_experts_equal_a_per_token_loop(renormalize: bool, shared: bool) -> None:
    block = random_block(renormalize, shared)
    x = torch.randn(13, HIDDEN)
    ctx = SimpleNamespace(ops=TorchOps())
    with torch.no_grad():
        got = block(x, ctx)
        expected = torch.stack([reference_token(block, row) for row in x])
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_a_shut_shared_expert_gate_leaves_the_routed_experts_sum() -> None:
    """Gate weights that shut the shared expert (sigmoid -> 0) leave the routed experts'
    sum as a block without a shared expert computes it."""
    block = random_block(renormalize=False, shared=True)
    routed = random_block(renormalize=False, shared=False)
    routed.load_state_dict(
        {k: v for k, v in block.state_dict().items() if not k.startswith("shared")}
    )
    x = torch.randn(5, HIDDEN)
    ctx = SimpleNamespace(ops=TorchOps())
    assert block.shared_expert_gate is not None
    with torch.no_grad():
        block.shared_expert_gate.weight.copy_(-1e4 * x[0:1].sign())
        got, without = block(x[:1], ctx), routed(x[:1], ctx)
    assert torch.allclose(got, without, atol=1e-6)
    assert routed.shared_expert is None and routed.shared_expert_gate is None
