"""Speculative decoding benchmark: one stream's tokens/s with and without guesses (n-gram
prompt lookup by default, or any --speculative-config: a draft model's).

    python -m tokenmill.bench.speculative [MODEL] [--speculative-config JSON] [--runs 5]

Two engines on the same model, one with --speculative-config, run each workload in
turn (A, B, A, B ...) so a busy neighbour or a clock change hits both alike; tokens/s
is output tokens over wall time, the median of the runs. Workloads: input-grounded
(rewrite a passage, edit code: the output repeats the input) and open chat. Greedy, so
both engines must give the same tokens; the report says whether they did. Prints one
JSON report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib import resources
from typing import Any

from tokenmill.llm import LLM
from tokenmill.sampling_params import SamplingParams

DEFAULT_CONFIG = {
    "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
    "prompt_lookup_min": 2,
}  # fmt: skip
_CODE = """def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item["price"] * item["quantity"]
    tax = subtotal * tax_rate
    return subtotal + tax


def cheapest(items):
    best = None
    for item in items:
        if best is None or item["price"] < best["price"]:
            best = item
    return best
"""


def workloads() -> dict[str, str]:
    """Each workload's user message."""
    text = resources.files("tokenmill.bench").joinpath("data/quality.txt").read_text()
    passage = text.split("\n\n")[3]  # the first paragraph of the story
    return {
        "rewrite a passage": f"Copy this paragraph, fixing nothing:\n\n{passage}",
        "edit code": "Rename the variable `items` to `products` in this code and return the "
        f"whole code:\n\n```python\n{_CODE}```",
        "open chat": "Tell me a story about a robot who learns to paint.",
        "open chat 2": "What are three good habits for learning a new language? Explain each.",
    }


def run(model: str | None, config: dict[str, Any], runs: int, max_tokens: int) -> dict[str, Any]:
    options = {"kv_cache_memory": 256 * 2**20}
    engines = {"plain": LLM(model, **options), "speculative": LLM(model, speculative_config=config, **options)}  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    report: dict[str, Any] = {"speculative_config": config, "runs": runs, "workloads": {}}
    for name, message in workloads().items():
        chat = [{"role": "user", "content": message}]
        seconds: dict[str, list[float]] = {key: [] for key in engines}
        tokens: dict[str, list[int]] = {}
        for llm in engines.values():
            llm.chat(chat, params)  # warm: grammar-free, but the first run pays for page-ins
        for i in range(runs):
            for key, llm in engines.items():
                started = time.perf_counter()
                output = llm.chat(chat, params)[0].outputs[0]
                seconds[key].append(time.perf_counter() - started)
                tokens[key] = list(output.token_ids)
            print(f"{name}: run {i + 1}/{runs}", file=sys.stderr)
        rates = {key: len(tokens[key]) / statistics.median(s) for key, s in seconds.items()}
        report["workloads"][name] = {
            "output_tokens": len(tokens["plain"]),
            "plain_tok_s": round(rates["plain"], 1),
            "speculative_tok_s": round(rates["speculative"], 1),
            "ratio": round(rates["speculative"] / rates["plain"], 2),
            "same_tokens": tokens["plain"] == tokens["speculative"],
        }
    speculator = engines["speculative"].engine.core.speculator
    assert speculator is not None
    counts = speculator.counts
    report["acceptance"] = {
        "drafts": counts.num_drafts,
        "draft_tokens": counts.num_draft_tokens,
        "accepted_tokens": counts.num_accepted_tokens,
        "accepted_per_position": list(counts.accepted_per_position),
    }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tokenmill.bench.speculative", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("model", nargs="?", default=None, help="default: the bundled model")
    parser.add_argument("--speculative-config", type=json.loads, default=DEFAULT_CONFIG)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    report = run(args.model, args.speculative_config, args.runs, args.max_tokens)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
