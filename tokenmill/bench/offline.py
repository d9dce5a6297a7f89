"""Offline benchmark: single-request decode speed and batched throughput of the engine."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import TYPE_CHECKING, Any, get_args

from tokenmill.config import QuantizationSetting
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:  # imported when the benchmark runs: `tokenmill --help` stays fast
    from tokenmill.llm import LLM

_WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex bold jumbo kites".split()


def synthetic_prompt(index: int, num_words: int) -> str:
    """Distinct prompts (no shared prefix beyond a word) of roughly num_words words."""
    return " ".join(_WORDS[(index * 7 + i * 3) % len(_WORDS)] for i in range(num_words))


def run(llm: LLM, num_prompts: int, prompt_words: int, output_len: int) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    prompts = [synthetic_prompt(i, prompt_words) for i in range(num_prompts)]
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    num_in = sum(len(o.prompt_token_ids) for o in outputs)
    return {
        "num_prompts": num_prompts,
        "prompt_tokens": num_in,
        "output_tokens": num_out,
        "seconds": round(seconds, 3),
        "output_tokens_per_s": round(num_out / seconds, 1),
    }


def measure_read_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best-of-N bytes/s of reading a large float32 tensor (sum) with torch's threads."""
    import torch

    data = torch.ones(num_bytes // 4)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    return num_bytes / best


def decode_roofline(executor: Any, measured_tokens_per_s: float) -> dict[str, float]:
    """A batch-1 decode step reads every weight once: steps/s <= bandwidth / weight bytes."""
    from tokenmill.executor.uniproc import UniprocExecutor
    from tokenmill.layers.linear import weight_bytes as model_weight_bytes

    assert isinstance(executor, UniprocExecutor), "reads the model in this process"
    weight_bytes = model_weight_bytes(executor.worker.model)  # type: ignore[arg-type]
    bandwidth = measure_read_bandwidth()
    ceiling = bandwidth / weight_bytes
    return {
        "weight_bytes": weight_bytes,
        "read_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "batch1_ceiling_steps_per_s": round(ceiling, 1),
        "batch1_share_of_ceiling": round(measured_tokens_per_s / ceiling, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokenmill bench offline", description=__doc__)
    add_arguments(parser)
    run_command(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=None, help="model (default: the bundled SmolLM2)"
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", choices=get_args(QuantizationSetting), default=None)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of each measurement; medians reported"
    )


def run_command(args: argparse.Namespace) -> int:
    """`tokenmill bench offline`: print the JSON report."""
    from tokenmill.llm import LLM

    llm = LLM(args.model, dtype=args.dtype, quantization=args.quantization)
    run(llm, 2, args.prompt_words, 8)  # warm-up
    single = [run(llm, 1, args.prompt_words, args.output_len) for _ in range(args.repeats)]
    batched = [
        run(llm, args.num_prompts, args.prompt_words, args.output_len) for _ in range(args.repeats)
    ]
    single_tps = statistics.median(r["output_tokens_per_s"] for r in single)
    batched_tps = statistics.median(r["output_tokens_per_s"] for r in batched)
    info = llm.engine.core.info
    roofline = decode_roofline(llm.engine.core.executor, single_tps)
    print(
        json.dumps(
            {
                "model": llm.engine.core.source.name,
                "dtype": str(info.dtype).removeprefix("torch."),
                "device": str(info.device),
                "single_request_tokens_per_s": single_tps,
                "batched_tokens_per_s": batched_tps,
                "batching_speedup": round(batched_tps / single_tps, 2),
                "roofline": roofline,
                "runs": {"single": single, "batched": batched},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    main()
