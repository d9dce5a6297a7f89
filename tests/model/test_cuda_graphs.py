"""The CUDA backend's captured decode steps (backends/cuda_graphs.py), off a GPU: the same
functions over the same fixed buffers, run without capture (the Triton kernel in its
interpreter on CPU tensors: tests/conftest.py). What is checked is everything but the
capture itself: padding to a captured size, the buffers filled step by step, the scratch
block, split decodes at sizes fixed at load, steps that must run eagerly, and the fallback
when a graph disagrees with the eager step."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")  # the CUDA backend's kernels; pip installs it beside torch on Linux

from tests.model.test_sliding_window import hf_greedy
from tokenmill import LLM, SamplingParams
from tokenmill.backends import cuda_graphs
from tokenmill.backends.cuda import CudaBackend
from tokenmill.backends.cuda_graphs import DecodeGraphs
from tokenmill.config import capture_sizes
from tokenmill.errors import ModelLoadError
from tokenmill.kernels import triton_attention
from tokenmill.worker import worker as worker_module
from tokenmill.worker.worker import graph_settings

# the reference's settings, with a KV cache of 512 blocks (copied whole by some tests)
SMALL = dict(dtype="float32", backend="torch", kv_cache_memory=4 << 20)


@pytest.fixture
def cuda_backend_on_cpu(monkeypatch):
    """Calling it makes workers load from then on with the CUDA backend (on a CPU: its
    graphs run uncaptured), decodes split over their keys while fewer than `min_programs`
    programs would run (none by default: split programs cost the interpreter much); returns
    the list of the backends made."""

    def install(min_programs: int = 0) -> list[CudaBackend]:
        made: list[CudaBackend] = []

        def select(*args, **kwargs):
            backend = CudaBackend()
            backend.attention.min_programs = min_programs
            made.append(backend)
            return backend

        monkeypatch.setattr(worker_module, "select_backend", select)
        return made

    return install


def _replays(monkeypatch) -> list[tuple[int, int]]:
    """(rows, captured size) of every step that ran from a graph ((-rows, size) while it
    runs)."""
    seen: list[tuple[int, int]] = []
    run = DecodeGraphs.run

    def counted(self, size, input_ids, ctx):
        seen.append((-int(input_ids.shape[0]), size))
        try:
            return run(self, size, input_ids, ctx)
        finally:
            seen[-1] = (-seen[-1][0], size)

    monkeypatch.setattr(DecodeGraphs, "run", counted)
    return seen


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(100, 40000, (k,), generator=generator).tolist() for k in lengths]


def _greedy(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def test_padded_decode_steps_keep_the_greedy_tokens(
    tiny_hf_model_dir, cuda_backend_on_cpu, monkeypatch
):
    """Six sequences ending at different steps (6 and 5 rows padded to 8), one
    past max_seq_len_to_capture (its steps run eagerly), a shared prefix read from the
    cache, and the graphs' decodes split over their keys."""
    directory = tiny_hf_model_dir("llama", num_attention_heads=8, num_key_value_heads=2)
    kwargs = dict(**SMALL, max_num_batched_tokens=64, enable_prefix_caching=True)
    prompts = _prompts(1, (120, 9, 45, 20, 3))
    prompts.append(prompts[0][:48] + prompts[1])
    max_tokens = [14, 4, 10, 7, 12, 9]
    want = _greedy(LLM(str(directory), **kwargs), prompts, max_tokens)  # torch, no graphs
    seen = _replays(monkeypatch)
    splits: list[int] = []
    launch = triton_attention.paged_attention

    def counted(*args, **kwargs):
        if len(seen) and seen[-1][0] < 0:  # (inside a replay)
            splits.append(args[12])
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "paged_attention", counted)
    made = cuda_backend_on_cpu(min_programs=64)
    llm = LLM(str(directory), cuda_graph_sizes=[1, 2, 4, 8], max_seq_len_to_capture=128, **kwargs)
    (backend,) = made
    assert backend.graphs is not None and sorted(backend.graphs.graphs) == [1, 2, 4, 8]
    assert _greedy(llm, prompts, max_tokens) == want
    assert {(6, 8), (5, 8)} <= set(seen)
    assert set(splits) == {2}  # (8 blocks of tables: two runs of 4 at most)
    # the longest sequence (120 + 14 tokens) outgrew the captured tables (128 tokens): its
    # last steps ran eagerly, so fewer steps replayed than it decoded
    assert len(seen) < max(max_tokens) - 1
    assert backend.graphs.failed is None


def test_a_replayed_step_equals_the_eager_step_and_leaves_other_blocks_alone(
    tiny_hf_model_dir, cuda_backend_on_cpu
):
    """One decode step of 3 sequences, through the graph of 4 rows and eagerly, on copies of
    the same cache: the same hidden states, and the same cache but for the scratch block."""
    directory = tiny_hf_model_dir("qwen2")
    made = cuda_backend_on_cpu()
    llm = LLM(str(directory), **SMALL, cuda_graph_sizes=[4])
    (backend,) = made
    worker = llm.engine.core.executor.worker
    graphs = backend.graphs
    assert graphs is not None and sorted(graphs.graphs) == [1, 2, 4]
    core = llm.engine.core
    for i, prompt in enumerate(_prompts(2, (30, 17, 5))):
        llm.engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=3))
    while not all(r.num_output_tokens for r in core.requests.values()):
        core.step()  # prefill
    step = core.model_input(core.scheduler.schedule())
    runner = worker.runner
    assert len(step) == 3 and all(s.num_new_tokens == 1 for s in step)
    before = [(k.clone(), v.clone()) for k, v in worker.kv_caches]
    batch = runner.prepare(step)
    assert graphs.size_for(batch.input_ids, batch.positions, batch.ctx) == 4
    replayed = runner.forward(batch).clone()
    after_graph = [(k.clone(), v.clone()) for k, v in worker.kv_caches]
    for (k, v), (k0, v0) in zip(worker.kv_caches, before, strict=True):
        k.copy_(k0)
        v.copy_(v0)
    graphs.failed = "eager, for this test"
    eager = runner.forward(runner.prepare(step))
    torch.testing.assert_close(replayed, eager, atol=1e-4, rtol=1e-4)
    scratch = slice(graphs.settings.scratch_block * 16, None)
    for (k, v), (kg, vg) in zip(worker.kv_caches, after_graph, strict=True):
        # (the projections of 4 rows and of 3 may round differently)
        torch.testing.assert_close(k[: scratch.start], kg[: scratch.start], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v[: scratch.start], vg[: scratch.start], atol=1e-5, rtol=1e-5)
        assert kg[scratch].abs().sum() > 0  # the padding row wrote there


def test_speculative_verify_rows_replay_too(tiny_hf_model_dir, cuda_backend_on_cpu, monkeypatch):
    """The model as its own draft (every guess holds): each sequence's step is 1 + 3
    single-token rows, replayed as any other decode step."""
    directory = tiny_hf_model_dir("qwen2")
    spec = {"model": str(directory), "num_speculative_tokens": 3}
    prompts = _prompts(3, (12, 30))
    plain = _greedy(LLM(str(directory), **SMALL), prompts, [12, 12])
    seen = _replays(monkeypatch)
    cuda_backend_on_cpu()
    llm = LLM(str(directory), **SMALL, speculative_config=spec,
              cuda_graph_sizes=[16])  # fmt: skip
    assert _greedy(llm, prompts, [12, 12]) == plain
    assert (8, 8) in seen  # two sequences' rows of guesses
    speculator = llm.engine.core.speculator
    assert speculator is not None and speculator.counts.num_accepted_tokens > 10


def test_a_sliding_window_replays_as_transformers_decodes(tiny_hf_model_dir, cuda_backend_on_cpu):
    directory = tiny_hf_model_dir("mistral", sliding_window=20)
    cuda_backend_on_cpu()
    llm = LLM(str(directory), **SMALL, cuda_graph_sizes=[2])
    prompt = _prompts(4, (41,))[0]
    assert _greedy(llm, [prompt], [12]) == [hf_greedy(directory, prompt, 12)]


def test_the_warm_up_runs_each_kernel_variant_on_the_scratch_blocks(
    tiny_hf_model_dir, cuda_backend_on_cpu, monkeypatch
):
    """What a GPU runs at load (here called by hand: the interpreter compiles nothing): a
    prompt for each rows-a-program count (one KV head a group: 16, 32, 64) beside a decode,
    then a decode for each count of splits its 512 positions allow, on the scratch blocks
    only."""
    directory = tiny_hf_model_dir("llama", num_key_value_heads=4)
    made = cuda_backend_on_cpu(min_programs=64)
    llm = LLM(str(directory), **SMALL, enforce_eager=True)
    (backend,) = made
    worker = llm.engine.core.executor.worker
    launched = []
    launch = triton_attention.paged_attention

    def counted(*args, **kwargs):
        launched.append((args[7], args[12]))  # (rows a program, splits)
        return launch(*args, **kwargs)

    monkeypatch.setattr(triton_attention, "paged_attention", counted)
    before = [k.clone() for k, _ in worker.kv_caches]
    settings = graph_settings(llm.engine.core.config.model, worker.num_blocks, 16)
    backend.warm_up(worker.model, worker.kv_caches, settings)
    prompts = {(16, 1), (32, 1), (64, 1)}
    splits = {(16, 2), (16, 4), (16, 8)}  # (16 splits: 64 blocks, past the model's 512 positions)
    assert set(launched) == prompts | splits
    assert len(launched) == 2 * (3 * 2 + 3)  # layers x (prompt steps x 2 launches + decodes)
    scratch = worker.num_blocks * 16
    for (k, _), k0 in zip(worker.kv_caches, before, strict=True):
        assert torch.equal(k[:scratch], k0[:scratch]) and not torch.equal(k, k0)


def test_the_default_sizes_follow_max_num_seqs(tiny_hf_model_dir, cuda_backend_on_cpu):
    """No --cuda-graph-sizes: up to twice --max-num-seqs (room for rows of guesses)."""
    directory = tiny_hf_model_dir("llama")
    made = cuda_backend_on_cpu()
    LLM(str(directory), **SMALL, max_num_seqs=4)
    (backend,) = made
    assert backend.graphs is not None and sorted(backend.graphs.graphs) == [1, 2, 4, 8]


def test_enforce_eager_captures_nothing(tiny_hf_model_dir, cuda_backend_on_cpu):
    directory = tiny_hf_model_dir("llama")
    made = cuda_backend_on_cpu()
    LLM(str(directory), **SMALL, enforce_eager=True)
    (backend,) = made
    assert backend.graphs is None and backend.description.endswith("eager")


def test_a_mixture_of_experts_runs_eagerly(tiny_hf_model_dir, cuda_backend_on_cpu, caplog):
    """Its routing reads each expert's token count on the host: no graph can hold that."""
    directory = tiny_hf_model_dir(
        "qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48
    )
    made = cuda_backend_on_cpu()
    caplog.set_level(logging.INFO, logger="tokenmill")
    LLM(str(directory), **SMALL)
    (backend,) = made
    assert backend.graphs is None and "none for a mixture of experts" in caplog.text


def test_a_graph_that_disagrees_with_eager_is_dropped(
    tiny_hf_model_dir, cuda_backend_on_cpu, caplog
):
    """The check a GPU runs after capture: here a graph made to give wrong states; every
    step then runs eagerly, with the same tokens."""
    directory = tiny_hf_model_dir("llama")
    made = cuda_backend_on_cpu()
    llm = LLM(str(directory), **SMALL, cuda_graph_sizes=[1, 2])
    (backend,) = made
    graphs = backend.graphs
    assert graphs is not None
    graphs._check()
    assert graphs.failed is None
    right = graphs.graphs[2]
    graphs.graphs[2] = cuda_graphs._Eager(lambda: right.replay() + 1.0)
    graphs._check()
    assert graphs.failed is not None and "2 rows" in graphs.failed and not graphs.graphs
    assert "decode steps run eagerly" in caplog.text
    assert backend.description.endswith("eager")
    prompt = _prompts(5, (9,))[0]
    assert _greedy(llm, [prompt], [6]) == [hf_greedy(directory, prompt, 6)]


# ops whose result the host must read (a sync: no CUDA graph can capture them), or whose
# output's shape depends on the data; .tolist() and .numpy() show as resolve_conj
_HOST_READS = {"_local_scalar_dense", "item", "nonzero", "argwhere", "masked_select", "unique",
               "_unique", "_unique2", "unique_consecutive", "bincount", "repeat_interleave",
               "resolve_conj", "resolve_neg"}  # fmt: skip


class _Ops(TorchDispatchMode):
    """The aten ops a call runs, and the tensors made from host data (torch.tensor of more
    than a scalar: on a GPU a copy from host memory the graph would replay stale)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()
        self.from_host: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.names.add(name)
        if name.startswith("lift_fresh") and out.numel() > 1:
            self.from_host.append(tuple(out.shape))
        return out


@pytest.mark.parametrize(
    ("model_type", "config"),
    [
        ("llama", {}),
        ("qwen3", {}),  # q/k norms
        ("gemma2", {"sliding_window": 8, "attn_logit_softcapping": 30.0}),
        ("gemma3_text", {"sliding_window": 8}),
        ("phi3", {"pad_token_id": 0}),
        ("granite", {}),
    ],
)
def test_a_captured_step_reads_nothing_back_to_the_host(
    tiny_hf_model_dir, cuda_backend_on_cpu, model_type, config
):
    """What breaks a capture on a GPU, checked on every architecture's decode step: no op
    reads a value back to the host, none makes a tensor of data-dependent shape, and no
    tensor is made from host data."""
    directory = tiny_hf_model_dir(model_type, **config)
    made = cuda_backend_on_cpu()
    LLM(str(directory), **SMALL, cuda_graph_sizes=[2])
    (backend,) = made
    graphs = backend.graphs
    assert graphs is not None
    ops = _Ops()
    with torch.inference_mode(), ops:
        graphs.graphs[2].replay()
    assert {"embedding", "linear"} <= ops.names  # (it saw the forward)
    assert not ops.names & _HOST_READS and not ops.from_host


def test_the_host_read_check_finds_a_mixture_of_experts_routing(tiny_hf_model_dir):
    """The check above on a step it must fail: a mixture of experts' (which is why those
    run eagerly)."""
    directory = tiny_hf_model_dir(
        "qwen3_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48
    )
    llm = LLM(str(directory), **SMALL)
    ops = _Ops()
    with ops:
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=1))
    assert "bincount" in ops.names & _HOST_READS


def test_capture_sizes_follow_vllm():
    assert capture_sizes(None, 256) == [1, 2, 4] + list(range(8, 513, 8))
    assert capture_sizes(None, 4) == [1, 2, 4, 8]
    assert capture_sizes([20], 256) == [1, 2, 4, 8, 16]
    assert capture_sizes([3], 256) == [1, 2]
    assert capture_sizes([64, 1, 8, 8], 256) == [1, 8, 64]
    with pytest.raises(ModelLoadError, match="positive"):
        capture_sizes([0, 4], 256)
