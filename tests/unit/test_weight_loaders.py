"""Shard-aware weight loaders: each rank of a tensor-parallel split gets its rows or
columns of every checkpoint projection, and a fused projection gets each part in order."""

from __future__ import annotations

import pytest
import torch

from tokenmill.errors import ModelLoadError
from tokenmill.layers.linear import ColumnLinear, RowLinear
from tokenmill.model.interface import checkpoint_weight_names, load_checkpoint
from tokenmill.model.llama import LlamaForCausalLM


def arange(rows: int, cols: int, start: int = 0) -> torch.Tensor:
    return torch.arange(start, start + rows * cols, dtype=torch.float32).view(rows, cols)


@pytest.mark.parametrize("rank", [0, 1])
def test_fused_column_layer_takes_each_parts_share_of_its_rank(rank: int) -> None:
    q, k, v = arange(4, 3), arange(2, 3, 100), arange(2, 3, 200)
    layer = ColumnLinear(3, [4, 2, 2], bias=False, tp_rank=rank, tp_size=2)
    for shard, part in enumerate((q, k, v)):
        layer.weight_loader(layer.weight, part, shard)
    expected = torch.cat([q[2 * rank : 2 * rank + 2], k[rank : rank + 1], v[rank : rank + 1]])
    assert torch.equal(layer.weight.detach(), expected)


def test_whole_fused_tensor_loads_in_one_call() -> None:
    fused = arange(8, 3)
    layer = ColumnLinear(3, [4, 2, 2], bias=True)
    layer.weight_loader(layer.weight, fused, None)
    layer.weight_loader(layer.bias, torch.arange(8.0), None)
    assert torch.equal(layer.weight.detach(), fused)
    assert torch.equal(layer.bias.detach(), torch.arange(8.0))


@pytest.mark.parametrize("rank", [0, 1])
def test_row_layer_takes_its_columns_and_the_leader_the_bias(rank: int) -> None:
    """The ranks' outputs are summed, so the bias is added once: by rank 0's."""
    weight, bias = arange(3, 4), torch.arange(3.0)
    layer = RowLinear(4, 3, bias=True, tp_rank=rank, tp_size=2)
    layer.weight_loader(layer.weight, weight, None)
    layer.weight_loader(layer.bias, bias, None)
    assert torch.equal(layer.weight.detach(), weight[:, 2 * rank : 2 * rank + 2])
    assert torch.equal(layer.bias.detach(), bias if rank == 0 else torch.zeros(3))


def test_a_part_of_the_wrong_shape_is_a_load_error() -> None:
    layer = ColumnLinear(3, [4, 2], bias=False)
    with pytest.raises(ModelLoadError, match="does not fit"):
        layer.weight_loader(layer.weight, arange(3, 3), 1)
    with pytest.raises(ModelLoadError, match="do not split"):
        ColumnLinear(3, [4, 3], bias=False, tp_size=2)


TINY = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 16,
    "hidden_size": 8,
    "intermediate_size": 12,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "tie_word_embeddings": True,
}


def test_checkpoint_names_unfold_the_fused_modules() -> None:
    model = LlamaForCausalLM(TINY)
    assert checkpoint_weight_names(model, "model.layers.0.self_attn.qkv_proj") == [
        f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"
    ]
    assert checkpoint_weight_names(model, "model.layers.0.mlp.down_proj") == [
        "model.layers.0.mlp.down_proj.weight"
    ]
    assert checkpoint_weight_names(model, "lm_head") == ["model.embed_tokens.weight"]


def test_load_checkpoint_maps_every_tensor_and_reports_gaps() -> None:
    model = LlamaForCausalLM(TINY)
    reference = {name: torch.randn(shape) for name, shape in _checkpoint_shapes(model).items()}
    model.load_weights(reference.items())
    layer = model.model.layers[0]
    q, k, v = (reference[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(layer.self_attn.qkv_proj.weight.detach(), torch.cat([q, k, v]))
    partial = {n: t for n, t in reference.items() if "down_proj" not in n}
    with pytest.raises(ModelLoadError, match="lacks weights for: model.layers.0.mlp.down_proj"):
        LlamaForCausalLM(TINY).load_weights(partial.items())
    with pytest.raises(ModelLoadError, match="has no place"):
        load_checkpoint(model, [("model.extra.weight", torch.zeros(1))], {})


def _checkpoint_shapes(model: LlamaForCausalLM) -> dict[str, torch.Size]:
    """The checkpoint's tensors (transformers' names, q/k/v and gate/up apart)."""
    cfg = model.config
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    prefix = "model.layers.0"
    return {
        "model.embed_tokens.weight": torch.Size([cfg.vocab_size, cfg.hidden_size]),
        "model.norm.weight": torch.Size([cfg.hidden_size]),
        f"{prefix}.input_layernorm.weight": torch.Size([cfg.hidden_size]),
        f"{prefix}.post_attention_layernorm.weight": torch.Size([cfg.hidden_size]),
        f"{prefix}.self_attn.q_proj.weight": torch.Size([q, cfg.hidden_size]),
        f"{prefix}.self_attn.k_proj.weight": torch.Size([kv, cfg.hidden_size]),
        f"{prefix}.self_attn.v_proj.weight": torch.Size([kv, cfg.hidden_size]),
        f"{prefix}.self_attn.o_proj.weight": torch.Size([cfg.hidden_size, q]),
        f"{prefix}.mlp.gate_proj.weight": torch.Size([cfg.intermediate_size, cfg.hidden_size]),
        f"{prefix}.mlp.up_proj.weight": torch.Size([cfg.intermediate_size, cfg.hidden_size]),
        f"{prefix}.mlp.down_proj.weight": torch.Size([cfg.hidden_size, cfg.intermediate_size]),
    }


def test_configs_an_architecture_cannot_run_are_load_errors() -> None:
    from tokenmill.model.granite import GraniteForCausalLM

    with pytest.raises(ModelLoadError, match="runs hidden_act 'silu'.*'gelu'"):
        LlamaForCausalLM(TINY | {"hidden_act": "gelu"})
    granite = TINY | {"embedding_multiplier": 12.0, "residual_multiplier": 0.2}
    with pytest.raises(ModelLoadError, match="missing attention_multiplier, logits_scaling"):
        GraniteForCausalLM(granite)
    from tokenmill.model.mixtral import MixtralForCausalLM

    with pytest.raises(ModelLoadError, match="num_local_experts / num_experts"):
        MixtralForCausalLM(TINY | {"num_experts_per_tok": 2})
    from tokenmill.model.phi3 import Phi3ForCausalLM

    # heads of 4 dims: 0.75 would turn 3, and rotary embeddings turn pairs
    odd_rotary_dims = TINY | {
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.75}
    }
    with pytest.raises(ModelLoadError, match="partial_rotary_factor 0.75"):
        Phi3ForCausalLM(odd_rotary_dims)


def test_each_experts_projections_land_in_its_rows() -> None:
    from tokenmill.layers.moe import Experts

    experts = Experts(num_experts=3, hidden=4, intermediate=2)
    gate, up, down = arange(2, 4), arange(2, 4, 100), arange(4, 2, 200)
    experts.weight_loader(experts.w13, gate, (1, 0))
    experts.weight_loader(experts.w13, up, (1, 1))
    experts.weight_loader(experts.w2, down, (1, None))
    assert torch.equal(experts.w13[1].detach(), torch.cat([gate, up]))
    assert torch.equal(experts.w2[1].detach(), down)
    with pytest.raises(ModelLoadError, match="does not fit"):
        experts.weight_loader(experts.w2, gate, (0, None))
