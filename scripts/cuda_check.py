"""CUDA check of the engine, for a machine with a GPU: parity with transformers on CUDA,
batching invariance, and offline throughput of random-weight models (speed only), each
with the CUDA backend (Triton paged attention, decode steps replayed as CUDA graphs; what a
GPU gets by default), the same run eagerly (--enforce-eager), and the torch reference (SDPA
over gathered keys) side by side.

    python scripts/cuda_check.py TOKENIZER_DIR OUT.json [--quick] [--structured-only]

TOKENIZER_DIR holds a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json), e.g.
the bundled SmolLM2's, saved with `PreTrainedTokenizerFast.save_pretrained`. Model
weights are random (made here with transformers), so no checkpoint has to travel.
"""

from __future__ import annotations

import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tokenmill import LLM, SamplingParams
from tokenmill.bench.offline import run as bench_run
from tokenmill.executor.uniproc import UniprocExecutor

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script
# how the engine runs: auto on a GPU is the CUDA backend, with CUDA graphs unless eager
CONFIGS: dict[str, dict[str, Any]] = (
    {
        "graphs": dict(backend="auto"),
        "eager": dict(backend="auto", enforce_eager=True),
        "torch": dict(backend="torch"),
    }
    if DEVICE == "cuda"
    else {"torch": dict(backend="torch")}
)
PROMPTS = ["The capital of France is", "List three colors:", "def add(a, b):", "Once upon a"]

SHAPES = {  # name -> LlamaConfig overrides (vocab of the SmolLM2 tokenizer)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}  # fmt: skip


def make_model(root: Path, tokenizer_dir: Path, shape: str, dtype: torch.dtype) -> Path:
    """A random Llama of `shape` saved by transformers, with the tokenizer beside it."""
    directory = root / f"{shape}-{str(dtype).removeprefix('torch.')}"
    config = LlamaConfig(
        vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, **SHAPES[shape],
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(directory)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, directory / item.name)
    return directory


def parity(directory: Path, dtype: str, config: str) -> dict[str, Any]:
    """Greedy tokens of tokenmill vs transformers on CUDA, and batched vs alone."""
    torch.backends.cuda.matmul.allow_tf32 = False
    llm = LLM(str(directory), dtype=dtype, device=DEVICE, kv_cache_memory=256 << 20,
              **CONFIGS[config])  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS]
    reference = AutoModelForCausalLM.from_pretrained(str(directory), dtype=getattr(torch, dtype))
    reference = reference.to(DEVICE).eval()
    expected = []
    for prompt in PROMPTS:
        ids = torch.tensor([llm.tokenizer.encode(prompt)], device=DEVICE)
        out = reference.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        expected.append(out[0, ids.shape[1] :].tolist())
    agree = [
        sum(a == b for a, b in zip(got, want, strict=True)) / len(want)
        for got, want in zip(batched, expected, strict=True)
    ]
    backend = _backend(llm)
    del llm, reference
    release_memory()
    return {
        "dtype": dtype,
        "config": config,
        **backend,
        "greedy_equal_to_transformers": batched == expected,
        "token_agreement_with_transformers": round(statistics.mean(agree), 3),
        "batched_equals_alone": batched == alone,
    }


def _backend(llm: LLM) -> dict[str, Any]:
    """What ran: the backend, and why its kernel or its graphs gave up, if they did."""
    executor = llm.engine.core.executor
    assert isinstance(executor, UniprocExecutor)
    backend = executor.worker.backend
    graphs = getattr(backend, "graphs", None)
    return {
        "backend": backend.description,
        "triton_failed": getattr(backend.attention, "failed", None),  # a compile error
        "ops_failed": getattr(backend.ops, "failed", None),
        "graphs_failed": None if graphs is None else graphs.failed,
        "graph_sizes": [] if graphs is None else sorted(graphs.graphs),
    }


def fp8_cache(directory: Path) -> dict[str, Any]:
    """--kv-cache-dtype fp8 (e4m3) and fp8_e5m2 through the torch path on this device: twice
    a bfloat16 cache's blocks, whether greedy tokens batched equal them alone, and how many
    agree with the bfloat16 cache's. Reported, not required: the bfloat16 torch path is
    not batch-invariant bit for bit (its logprobs move with the batch's padding), and an
    8-bit cache turns such a difference into another token of a random model sooner (the
    CPU dry run: the bfloat16 cache's tokens equal, fp8's part at token 15 of one prompt)."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    report: dict[str, Any] = {}
    tokens: dict[str, list[list[int]]] = {}
    for cache in ("auto", "fp8", "fp8_e5m2"):
        llm = LLM(
            str(directory),
            dtype="bfloat16",
            device=DEVICE,
            kv_cache_dtype=cache,
            kv_cache_memory=64 << 20,
        )
        batched = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
        alone = [llm.generate([p], params)[0].outputs[0].token_ids for p in PROMPTS]
        tokens[cache] = batched
        report[cache] = {
            "kv_cache_blocks": llm.engine.core.info.num_blocks,
            "batched_equals_alone": batched == alone,
        }
        del llm
        release_memory()
    for cache in ("fp8", "fp8_e5m2"):
        same = [
            sum(a == b for a, b in zip(got, want, strict=True)) / len(want)
            for got, want in zip(tokens[cache], tokens["auto"], strict=True)
        ]
        report[cache]["token_agreement_with_bf16_cache"] = round(statistics.mean(same), 3)
    return report


def structured(directory: Path) -> dict[str, Any]:
    """Constrained decoding on this device (xgrammar's mask on the GPU's logits): every
    output must satisfy its constraint, whatever the random model prefers."""
    import re

    llm = LLM(str(directory), dtype="bfloat16", device=DEVICE, kv_cache_memory=256 << 20)
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
        "required": ["colour", "ok"],
        "additionalProperties": False,
    }
    constraints: dict[str, tuple[dict[str, Any], Any]] = {
        "json": (
            {"json": schema, "disable_any_whitespace": True},
            lambda t: set(json.loads(t)) == {"colour", "ok"},
        ),
        "regex": ({"regex": "[ab]{3}-[0-9]"}, lambda t: re.fullmatch("[ab]{3}-[0-9]", t)),
        "choice": ({"choice": ["up", "down"]}, lambda t: t in ("up", "down")),
    }
    result: dict[str, Any] = {}
    for name, (spec, valid) in constraints.items():
        params = SamplingParams(temperature=1.0, max_tokens=48, n=4, structured_outputs=spec)
        outputs = llm.generate(PROMPTS, params)
        texts = [c.text for o in outputs for c in o.outputs]
        reasons = [c.finish_reason for o in outputs for c in o.outputs]
        result[name] = {
            "all_valid": all(bool(_safe(valid, t)) for t in texts),
            "finish_reasons": sorted(set(map(str, reasons))),
            "sample": texts[0],
        }
    del llm
    release_memory()
    return result


def _safe(check: Any, text: str) -> Any:
    try:
        return check(text)
    except ValueError:
        return False


def throughput(directory: Path, quick: bool, config: str) -> dict[str, Any]:
    started = time.perf_counter()
    llm = LLM(str(directory), dtype="bfloat16", device=DEVICE, kv_cache_memory=8 << 30,
              **CONFIGS[config])  # fmt: skip
    result: dict[str, Any] = {
        "load_s": round(time.perf_counter() - started, 1),  # CUDA graphs captured in it
        "kv_cache_blocks": llm.engine.core.info.num_blocks,
        **_backend(llm),
    }
    bench_run(llm, 2, 24, 8)  # warm-up
    output_len = 8 if quick else 128
    for batch in (1, 4) if quick else (1, 64, 256):
        runs = [bench_run(llm, batch, 24, output_len) for _ in range(1 if quick else 3)]
        result[f"batch{batch}_tokens_per_s"] = statistics.median(
            r["output_tokens_per_s"] for r in runs
        )
    started = time.perf_counter()
    bench_run(llm, 1, 100 if quick else 900, 1)  # a ~1,000-token prompt: prefill time
    result["prefill_1k_tokens_s"] = round(time.perf_counter() - started, 3)
    del llm
    release_memory()  # (its KV cache and graphs)
    return result


def release_memory() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def main() -> int:
    tokenizer_dir, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    quick = "--quick" in sys.argv
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "--structured-only" in sys.argv:
            directory = make_model(root, tokenizer_dir, "tiny", torch.bfloat16)
            report["structured_tiny_bf16"] = structured(directory)
            out_path.write_text(json.dumps(report, indent=1))
            print(json.dumps(report, indent=1), flush=True)
            return 0
        for dtype in ("float32", "bfloat16"):
            directory = make_model(root, tokenizer_dir, "tiny", getattr(torch, dtype))
            for config in CONFIGS:
                report[f"parity_tiny_{dtype}_{config}"] = parity(directory, dtype, config)
                print(json.dumps(report, indent=1), flush=True)
        report["structured_tiny_bf16"] = structured(directory)
        report["fp8_kv_cache_tiny_bf16"] = fp8_cache(directory)
        print(json.dumps(report, indent=1), flush=True)
        for shape in ("smollm2-135m",) if quick else ("smollm2-135m", "llama-1b"):
            directory = make_model(root, tokenizer_dir, shape, torch.bfloat16)
            for config in CONFIGS:
                report[f"throughput_{shape}_bf16_{config}"] = throughput(directory, quick, config)
                print(json.dumps(report, indent=1), flush=True)
    out_path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
