"""The CPU backend packs each linear ("fp16", "rtn"), and a mixture's experts, as soon as
its checkpoint tensors have all loaded, and the float tensors go then: a model is never held whole in float32 (an 8B
checkpoint would need 32 GB). Packing while loading gives the same bits as packing after."""

import weakref

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.backends.cpu import CpuBackend
from tokenmill.kernels import quant_matmul
from tokenmill.layers.linear import GGUFLinear, PackedLinear
from tokenmill.layers.moe import Experts, PackedExperts

pytestmark = pytest.mark.skipif(not quant_matmul.available(), reason="no C compiler")

PROMPTS = ["The capital of France is", "def add(a, b):"]
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)


def load(directory, quantization: str) -> LLM:
    return LLM(str(directory), quantization=quantization, kv_cache_memory=16 << 20)


@pytest.mark.parametrize("quantization", ["fp16", "rtn"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])  # qwen2: biases on q, k, v
def test_each_linear_is_packed_as_it_loads_and_its_float_weights_freed(
    tiny_hf_model_dir, monkeypatch, quantization, model_type
):
    directory = tiny_hf_model_dir(model_type, num_hidden_layers=3)
    packed_while_loading: list[str] = []
    floats: list[weakref.ref] = []  # the float weights of the linears packed so far
    alive_at_each_pack: list[int] = []
    pack_loaded, prepare = CpuBackend.pack_loaded, CpuBackend.prepare

    embedding: list[weakref.ref] = []  # its float32 table, once loaded

    def spy_pack_loaded(self, model, quantization, path):
        packed_while_loading.append(path)
        if path == "model.embed_tokens":  # fp16 halves it now; rtn rounds it in prepare
            embedding.append(weakref.ref(model.get_submodule(path).weight))
            return pack_loaded(self, model, quantization, path)
        alive_at_each_pack.append(sum(ref() is not None for ref in floats))
        floats.append(weakref.ref(model.get_submodule(path).weight))
        pack_loaded(self, model, quantization, path)

    left_for_prepare: list[str] = []

    def spy_prepare(self, model, quantization):
        left_for_prepare.extend(p for p in ["model.embed_tokens"] if embedding[0]() is not None)
        left_for_prepare.extend(
            p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear)
        )
        prepare(self, model, quantization)

    monkeypatch.setattr(CpuBackend, "pack_loaded", spy_pack_loaded)
    monkeypatch.setattr(CpuBackend, "prepare", spy_prepare)
    model = load(directory, quantization).engine.core.executor.worker.model

    layers = model.config.num_layers
    assert len(packed_while_loading) == 4 * layers + 2  # and the (untied) head, the embedding
    assert "lm_head" in packed_while_loading and "model.embed_tokens" in packed_while_loading
    assert left_for_prepare == ([] if quantization == "fp16" else ["model.embed_tokens"])
    assert set(alive_at_each_pack) == {0}  # each earlier linear's float weight already gone
    kind = GGUFLinear if quantization == "rtn" else PackedLinear
    assert sum(isinstance(m, kind) for m in model.modules()) == 4 * layers + 1
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert (qkv.bias is not None) == (model_type == "qwen2")


@pytest.mark.parametrize("quantization", ["fp16", "rtn"])
def test_packing_while_loading_gives_the_bits_of_packing_after(
    tiny_hf_model_dir, monkeypatch, quantization
):
    directory = tiny_hf_model_dir("qwen2", num_hidden_layers=3)
    streamed = load(directory, quantization).generate(PROMPTS, PARAMS)
    monkeypatch.setattr(CpuBackend, "pack_loaded", lambda self, model, q, path: None)
    after = load(directory, quantization).generate(PROMPTS, PARAMS)
    for a, b in zip(streamed, after, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for step_a, step_b in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert {t: p.logprob for t, p in step_a.items()} == {
                t: p.logprob for t, p in step_b.items()
            }


@pytest.mark.parametrize("quantization", ["fp16", "rtn"])
def test_a_mixtures_experts_are_packed_as_they_load(tiny_hf_model_dir, monkeypatch, quantization):
    from tests.model.test_qwen2_moe import CASES

    directory = tiny_hf_model_dir("qwen2_moe", **CASES["qwen2-moe"])
    packed_while_loading: list[str] = []
    pack_loaded, prepare = CpuBackend.pack_loaded, CpuBackend.prepare
    experts_at_prepare: list[str] = []

    def spy_pack_loaded(self, model, quantization, path):
        packed_while_loading.append(path)
        pack_loaded(self, model, quantization, path)

    def spy_prepare(self, model, quantization):
        experts_at_prepare.extend(p for p, m in model.named_modules() if isinstance(m, Experts))
        prepare(self, model, quantization)

    monkeypatch.setattr(CpuBackend, "pack_loaded", spy_pack_loaded)
    monkeypatch.setattr(CpuBackend, "prepare", spy_prepare)
    model = load(directory, quantization).engine.core.executor.worker.model
    assert "model.layers.1.mlp.experts" in packed_while_loading
    assert experts_at_prepare == []
    assert isinstance(model.model.layers[1].mlp.experts, PackedExperts)
