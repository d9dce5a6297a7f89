"""The CUDA backend's Triton attention in whole models (here in Triton's interpreter on
CPU tensors: tests/conftest.py): the same greedy tokens as the torch reference and as
transformers, through chunked prefill, a prefix cache, speculative verify rows, preemption
and a sliding window."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # the CUDA backend's kernels; pip installs it beside torch on Linux

from tests.model.test_sliding_window import hf_greedy
from tokenmill import LLM, SamplingParams
from tokenmill.backends import select_backend
from tokenmill.backends.cuda import CudaBackend
from tokenmill.backends.cuda_attention import TritonAttention
from tokenmill.errors import ModelLoadError
from tokenmill.kernels import triton_attention

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _with_triton(llm: LLM, min_programs: int = 0) -> TritonAttention:
    """Put the Triton kernel in the loaded torch backend's place (on a GPU the CUDA backend
    is chosen at load; on a CPU only this way); decodes split their keys while fewer than
    `min_programs` programs would run."""
    attention = TritonAttention(min_programs)
    worker = llm.engine.core.executor.worker
    worker.backend.attention = attention
    if worker.draft is not None:
        worker.draft.backend.attention = attention
    return attention


def _prompts(n: int, lengths: tuple[int, ...]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(n)
    return [torch.randint(100, 40000, (k,), generator=generator).tolist() for k in lengths]


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


def test_greedy_tokens_equal_the_reference_and_transformers(tiny_hf_model_dir, monkeypatch):
    """Prompts chunked by a 32-token step budget, batched with decodes, a shared prefix
    read from the cache, a cache too small for all of them (preemption), and the longest
    decode's keys split over programs."""
    directory = tiny_hf_model_dir("llama", num_attention_heads=8, num_key_value_heads=2)
    kwargs = dict(dtype="float32", backend="torch", max_num_batched_tokens=32,
                  enable_prefix_caching=True, kv_cache_memory=12 * 2 * 2 * 16 * 2 * 16 * 4)  # fmt: skip
    prompts = _prompts(1, (130, 9, 45))
    prompts.append(prompts[0][:48] + prompts[1])  # its first 3 blocks are cached by then
    want = _greedy(LLM(str(directory), **kwargs), prompts)
    llm = LLM(str(directory), **kwargs)
    attention = _with_triton(llm, min_programs=64)
    splits = []
    launch = triton_attention.paged_attention

    def counted(*args, **kwargs):
        splits.append(args[12])
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "paged_attention", counted)
    assert _greedy(llm, prompts) == want
    assert max(splits) > 1
    assert attention.failed is None and llm.engine.core.scheduler.num_preemptions > 0
    assert _greedy(llm, prompts[:1]) == [hf_greedy(directory, prompts[0], 12)]


def test_speculative_verify_rows_keep_the_greedy_tokens(tiny_hf_model_dir):
    """The model as its own draft: every guess holds, so each step verifies 4-token rows
    (and the draft runs its own rows through the kernel too)."""
    directory = tiny_hf_model_dir("qwen2")
    spec = {"model": str(directory), "num_speculative_tokens": 3}
    prompts = _prompts(2, (12, 30))
    plain = _greedy(LLM(str(directory), dtype="float32", backend="torch"), prompts)
    llm = LLM(str(directory), dtype="float32", backend="torch", speculative_config=spec)
    _with_triton(llm)
    assert _greedy(llm, prompts) == plain
    speculator = llm.engine.core.speculator
    assert speculator is not None and speculator.counts.num_accepted_tokens > 10


def test_a_sliding_window_equals_transformers(tiny_hf_model_dir):
    directory = tiny_hf_model_dir("mistral", sliding_window=20)
    llm = LLM(str(directory), dtype="float32", backend="torch", max_num_batched_tokens=32)
    _with_triton(llm)
    prompts = _prompts(3, (90, 41))
    got = _greedy(llm, prompts)
    assert got[0] == hf_greedy(directory, prompts[0], 12)
    assert got == [_greedy(llm, [p])[0] for p in prompts]


def test_the_cuda_backend_is_chosen_on_a_gpu_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    with pytest.raises(ModelLoadError, match="runs on a CUDA device"):
        select_backend("cuda", cpu, torch.float32, torch.float32, 64)
    backend = CudaBackend()  # what "auto" and "cuda" give on a GPU
    assert isinstance(backend.attention, TritonAttention)
    assert "Triton" in backend.description
    if not torch.cuda.is_available():
        assert select_backend("torch", cpu, torch.float32, torch.float32, 64).name == "torch"
    else:
        assert select_backend("auto", cuda, torch.bfloat16, torch.bfloat16, 64).name == "cuda"
