"""quantization="fp16" (float16 weights, float32 math), "gguf-float32" (the GGUF file's
own Q4_1/Q8_0 blocks through the native kernel, float32 math) and "gguf" (the same blocks,
activations quantized to int8 per 32 values: llama.cpp's numerics) against the exact
float32 model.

Quality bound, on the bundled SmolLM2-135M (Q4_1 GGUF dequantized): greedy tokens equal
float32's for the first 32 tokens of every prompt, and teacher-forced logits stay within
0.1 of float32's at every position for fp16 (logits are O(10); measured max 0.027-0.038),
within GGUF_LOGITS_ATOL for gguf-float32 (same weights, only the summation order differs).
gguf's int8 activations move logits by up to ~1.5 (measured 1.54), so greedy text can
part from float32's; the bound is on quality instead, teacher-forced along float32's
greedy continuations: the same argmax at >= 95% of positions (measured 97.2%), and each
prompt's mean log-probability of those tokens within 0.02 nats of float32's (measured
<= 0.0074; -0.6711 vs -0.6710 over all).
"""

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.engine.core import EngineCore
from tokenmill.engine.request import Request
from tokenmill.errors import ModelLoadError
from tokenmill.kernels import quant_matmul
from tokenmill.layers.linear import GGUFLinear, PackedLinear

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a land far away, there lived a",
    "List three colors:",
    "Q: What is 12 times 7?\nA:",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
NUM_EQUAL_GREEDY_TOKENS = 32
LOGITS_ATOL = 0.1
GGUF_LOGITS_ATOL = 2e-3
INT8_LOGITS_ATOL, INT8_ARGMAX_AGREEMENT, INT8_LOGPROB_ATOL = 3.0, 0.95, 0.02


def no_prefix_cache_llm(path: str, **kwargs) -> LLM:
    """all_logits needs every position computed, so no prompt may hit the prefix cache."""
    return LLM(
        path, dtype="float32", kv_cache_memory=64 << 20, enable_prefix_caching=False, **kwargs
    )


@pytest.fixture(scope="module")
def fp16_llm(bundled_gguf_path):
    return no_prefix_cache_llm(bundled_gguf_path, quantization="fp16")


@pytest.fixture(scope="module")
def fp32_llm(bundled_gguf_path):
    return no_prefix_cache_llm(bundled_gguf_path)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def all_logits(core: EngineCore, ids: list[int]) -> torch.Tensor:
    """Logits [len(ids), V] of one prefill of `ids` (every position, not only the last)."""
    core.add_request(Request("probe", ids, SamplingParams(max_tokens=1), frozenset(), 4096))
    out = core.scheduler.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [len(ids)]
    runner = core.executor.worker.runner
    with torch.inference_mode():
        batch = runner.prepare(core.model_input(out))
        logits = runner.model.compute_logits(runner.forward(batch))
    core.finish("probe", "abort")
    return logits


def test_every_linear_layer_and_the_head_are_packed(fp16_llm):
    model = fp16_llm.engine.core.executor.worker.model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 4 * model.config.num_layers + 1  # qkv, o, gate_up, down; head
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert fp16_llm.engine.core.info.num_parameters == pytest.approx(134.5e6, rel=0.01)


def test_greedy_tokens_match_float32(fp16_llm, fp32_llm):
    ours = token_ids(fp16_llm.generate(PROMPTS, GREEDY))
    exact = token_ids(fp32_llm.generate(PROMPTS, GREEDY))
    for i, (a, b) in enumerate(zip(ours, exact, strict=True)):
        assert a[:NUM_EQUAL_GREEDY_TOKENS] == b[:NUM_EQUAL_GREEDY_TOKENS], f"prompt {i}"


def assert_teacher_forced_logits_close(llm: LLM, fp32_llm: LLM, atol: float) -> None:
    """Along float32's greedy continuations, every position's logits within atol and
    the same argmax."""
    exact = token_ids(fp32_llm.generate(PROMPTS, GREEDY))
    for prompt, continuation in zip(PROMPTS, exact, strict=True):
        ids = llm.tokenizer.encode(prompt) + continuation
        ours = all_logits(llm.engine.core, ids)
        reference = all_logits(fp32_llm.engine.core, ids)
        assert (ours - reference).abs().max().item() < atol
        assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_teacher_forced_logits_close_to_float32(fp16_llm, fp32_llm):
    assert_teacher_forced_logits_close(fp16_llm, fp32_llm, LOGITS_ATOL)


def test_batched_equals_alone(fp16_llm):
    alone = [token_ids(fp16_llm.generate([p], GREEDY))[0] for p in PROMPTS]
    assert token_ids(fp16_llm.generate(PROMPTS, GREEDY)) == alone


def test_rejected_off_cpu_float32(bundled_gguf_path):
    with pytest.raises(ModelLoadError, match="CPU in float32 only"):
        LLM(bundled_gguf_path, dtype="bfloat16", kv_cache_memory=16 << 20, quantization="fp16")


def test_the_torch_reference_backend_runs_exact_weights(bundled_gguf_path):
    with pytest.raises(ModelLoadError, match="the torch backend runs the checkpoint's own"):
        LLM(bundled_gguf_path, backend="torch", kv_cache_memory=16 << 20, quantization="fp16")
    reference = LLM(bundled_gguf_path, backend="torch", kv_cache_memory=16 << 20)
    assert reference.engine.core.info.quantization is None  # not the CPU default (gguf)
    assert not any(
        isinstance(m, GGUFLinear | PackedLinear)
        for m in reference.engine.core.executor.worker.model.modules()
    )


def test_the_cpu_default_is_gguf_for_gguf_files_and_fp16_else_only_when_dtype_is_auto():
    from tokenmill.backends.formats import resolve_quantization

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fbgemm = "fbgemm" in torch.backends.quantized.supported_engines
    fast_fp16 = fbgemm or quant_matmul.vectorized()
    assert resolve_quantization(None, "auto", cpu) == ("fp16" if fast_fp16 else None)
    assert resolve_quantization(None, "auto", cpu, "safetensors") == ("fp16" if fast_fp16 else None)
    gguf_default = "gguf" if quant_matmul.vectorized() else ("fp16" if fast_fp16 else None)
    assert resolve_quantization(None, "auto", cpu, "gguf") == gguf_default
    assert resolve_quantization(None, "float32", cpu, "gguf") is None
    assert resolve_quantization(None, "auto", cuda, "gguf") is None
    assert resolve_quantization("gguf", "auto", cpu) == "gguf"
    assert resolve_quantization("gguf-float32", "auto", cpu) == "gguf-float32"
    assert resolve_quantization(None, "float32", cpu) is None  # a pinned dtype stays exact
    assert resolve_quantization(None, "auto", cuda) is None
    assert resolve_quantization("none", "auto", cpu) is None
    assert resolve_quantization("fp16", "float32", cpu) == "fp16"
    with pytest.raises(ModelLoadError, match="unknown quantization"):
        resolve_quantization("int3", "auto", cpu)


def test_a_weight_past_float16_range_stays_float32():
    from tokenmill.backends.cpu import CpuBackend

    backend = CpuBackend(torch.float32, torch.float32, 16)
    block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        block[1].weight[0, 0] = 1e6
    for path in ("0", "1"):
        backend.pack_loaded(block, "fp16", path)  # type: ignore[arg-type]
    assert isinstance(block[0], PackedLinear)
    assert isinstance(block[1], torch.nn.Linear)


needs_kernel = pytest.mark.skipif(not quant_matmul.available(), reason="no C compiler")


@pytest.fixture(scope="module")
def gguf_llm(bundled_gguf_path):
    return no_prefix_cache_llm(bundled_gguf_path, quantization="gguf")


@pytest.fixture(scope="module")
def gguf_float32_llm(bundled_gguf_path):
    return no_prefix_cache_llm(bundled_gguf_path, quantization="gguf-float32")


@needs_kernel
@pytest.mark.parametrize("int8", [True, False])
def test_gguf_keeps_every_linear_layer_and_the_head_as_blocks(gguf_llm, gguf_float32_llm, int8):
    llm = gguf_llm if int8 else gguf_float32_llm
    model = llm.engine.core.executor.worker.model
    kept = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(kept) == 4 * model.config.num_layers + 1
    assert {m.ggml_type for m in kept} == {quant_matmul.GGML_Q4_1, quant_matmul.GGML_Q8_0}
    # under int8 activations the first layer's linears keep float32 ones (formats.py)
    gguf = {path: m for path, m in model.named_modules() if isinstance(m, GGUFLinear)}
    float_paths = {path for path, m in gguf.items() if not m.int8_activations}
    first_layer = {
        f"model.layers.0.{name}"
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    }
    assert float_paths == (first_layer if int8 else set(gguf))
    assert not any(isinstance(m, torch.nn.Linear | PackedLinear) for m in model.modules())
    assert llm.engine.core.info.num_parameters == pytest.approx(134.5e6, rel=0.01)


@needs_kernel
def test_the_embedding_stays_in_blocks_with_the_float_tables_bits(
    gguf_llm, bundled_gguf_path, monkeypatch
):
    """The embedding's rows are decoded from the file's Q8_0 blocks as looked up (no float32
    table: 113 MB for this 49,152 x 576 one), giving what the dequantized table gives."""
    from tokenmill.backends import cpu
    from tokenmill.layers.vocab import GGUFEmbedding

    embedding = gguf_llm.engine.core.executor.worker.model.model.embed_tokens
    assert isinstance(embedding, GGUFEmbedding)
    assert embedding.ggml_type == quant_matmul.GGML_Q8_0
    assert embedding.blocks.numel() == 49152 * 576 // 32 * 34
    monkeypatch.setattr(cpu, "_keep_gguf_embedding", lambda model, blocks: set())
    table = no_prefix_cache_llm(bundled_gguf_path, quantization="gguf")
    assert type(table.engine.core.executor.worker.model.model.embed_tokens) is torch.nn.Embedding
    assert_same_tokens_and_logprobs(
        gguf_llm.generate(PROMPTS, LOGPROBS), table.generate(PROMPTS, LOGPROBS)
    )


@needs_kernel
def test_gguf_float32_greedy_tokens_and_logits_match_float32(gguf_float32_llm, fp32_llm):
    exact = token_ids(fp32_llm.generate(PROMPTS, GREEDY))
    assert token_ids(gguf_float32_llm.generate(PROMPTS, GREEDY)) == exact
    assert_teacher_forced_logits_close(gguf_float32_llm, fp32_llm, GGUF_LOGITS_ATOL)


def quality(llm: LLM, fp32_llm: LLM) -> tuple[float, float, float]:
    """Teacher-forced along float32's greedy continuations of PROMPTS: the share of
    positions with float32's argmax, the largest gap between a prompt's mean
    log-probability of its continuation under `llm` and under float32, and the largest
    logit difference."""
    exact = token_ids(fp32_llm.generate(PROMPTS, GREEDY))
    same_argmax = positions = 0
    logprob_gap = logit_gap = 0.0
    for prompt, continuation in zip(PROMPTS, exact, strict=True):
        ids = llm.tokenizer.encode(prompt) + continuation
        ours = all_logits(llm.engine.core, ids)
        reference = all_logits(fp32_llm.engine.core, ids)
        logit_gap = max(logit_gap, (ours - reference).abs().max().item())
        same_argmax += int((ours.argmax(-1) == reference.argmax(-1)).sum())
        positions += len(ids)
        n, target = len(continuation), torch.tensor(continuation)[:, None]
        ours_lp, reference_lp = (
            torch.log_softmax(logits[-n - 1 : -1], -1).gather(1, target).mean().item()
            for logits in (ours, reference)
        )
        logprob_gap = max(logprob_gap, abs(ours_lp - reference_lp))
    return same_argmax / positions, logprob_gap, logit_gap


@needs_kernel
def test_gguf_int8_activations_stay_within_the_stated_quality_bound(gguf_llm, fp32_llm):
    agreement, logprob_gap, logit_gap = quality(gguf_llm, fp32_llm)
    assert logit_gap < INT8_LOGITS_ATOL
    assert logprob_gap < INT8_LOGPROB_ATOL
    assert agreement >= INT8_ARGMAX_AGREEMENT


@needs_kernel
def test_gguf_batched_equals_alone(gguf_llm):
    alone = [token_ids(gguf_llm.generate([p], GREEDY))[0] for p in PROMPTS]
    assert token_ids(gguf_llm.generate(PROMPTS, GREEDY)) == alone


def generate_fused_and_layered(llm: LLM, prompts: list[str], params: SamplingParams):
    """(outputs with decode steps in one native call, outputs layer by layer, fused calls)."""
    from tokenmill.kernels import decode_step

    backend = llm.engine.core.executor.worker.backend
    calls = 0
    original = decode_step.DecodeLayers.__call__

    def counted(self, *args):
        nonlocal calls
        calls += 1
        return original(self, *args)

    decode_step.DecodeLayers.__call__ = counted
    try:
        fused = llm.generate(prompts, params)
        backend.fused_decode = False
        layered = llm.generate(prompts, params)
    finally:
        backend.fused_decode = True
        decode_step.DecodeLayers.__call__ = original
    return fused, layered, calls


def assert_same_tokens_and_logprobs(a, b) -> None:
    assert token_ids(a) == token_ids(b)
    for x, y in zip(a, b, strict=True):
        for step_x, step_y in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, strict=True):
            assert {t: p.logprob for t, p in step_x.items()} == {
                t: p.logprob for t, p in step_y.items()
            }


LOGPROBS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)


@needs_kernel
@pytest.mark.parametrize("batch", [1, len(PROMPTS)])
def test_gguf_decode_step_in_one_call_is_bit_identical_to_layer_by_layer(gguf_llm, batch):
    fused, layered, calls = generate_fused_and_layered(gguf_llm, PROMPTS[:batch], LOGPROBS)
    assert calls >= LOGPROBS.max_tokens - 2  # decode-only steps took the native call
    assert_same_tokens_and_logprobs(fused, layered)


@pytest.mark.skipif(not quant_matmul.vectorized(), reason="fp16 runs on fbgemm here")
def test_fp16_decode_step_in_one_call_is_bit_identical_to_layer_by_layer(fp16_llm):
    fused, layered, calls = generate_fused_and_layered(fp16_llm, PROMPTS[:3], LOGPROBS)
    assert calls >= LOGPROBS.max_tokens - 2
    assert_same_tokens_and_logprobs(fused, layered)
