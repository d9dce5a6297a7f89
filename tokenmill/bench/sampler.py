"""Sampler benchmark: the sampler's cost per step against the model step it follows.

    python -m tokenmill.bench.sampler [MODEL] [--batch-sizes 1,64] [--steps 20]

For each batch size it runs real decode steps of the engine (greedy), keeps the
logits the sampler saw, then times the sampler alone on those logits with every
feature off and with penalties + top-p + logprobs on. Prints one JSON report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch

from tokenmill.bench.offline import synthetic_prompt
from tokenmill.engine.request import Request
from tokenmill.sample.sampler import Sampler
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.llm import LLM

CONFIGS = {
    "off": SamplingParams(temperature=0.0, max_tokens=None),
    "penalties+top_p+logprobs": SamplingParams(
        temperature=0.8,
        top_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        repetition_penalty=1.1,
        logprobs=5,
        max_tokens=None,
    ),
}


def model_steps(llm: LLM, batch: int, steps: int) -> tuple[float, torch.Tensor, list[Request]]:
    """Median ms of a greedy decode step of `batch` requests, the logits of one more decode
    step (the ones the sampler sees) and the requests."""
    core = llm.engine.core
    params = SamplingParams(temperature=0.0, max_tokens=steps + 3, ignore_eos=True)
    requests = [
        Request(
            f"bench-{batch}-{i}",
            llm.tokenizer.encode(synthetic_prompt(i, 24)),
            params,
            frozenset(),
            core.max_model_len,
        )  # fmt: skip
        for i in range(batch)
    ]
    try:
        for request in requests:
            core.add_request(request)
        core.step()  # prefill
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            core.step()
            times.append(time.perf_counter() - started)
        # a plain tensor: cloning an inference-mode one outside inference mode is slow
        seen = core.logits_for(core.scheduler.schedule())
        logits = torch.empty_like(seen).copy_(seen)
    finally:
        for request in requests:
            core.finish(request.request_id, "abort")
    return statistics.median(times) * 1e3, logits, requests


def sampler_ms(
    logits: torch.Tensor, template: list[Request], params: SamplingParams, steps: int
) -> float:
    """Median ms of one sampler call over `steps` steps, tokens appended as the engine does."""
    sampler = Sampler(logits.shape[1], logits.device)
    requests = [
        Request(r.request_id, r.prompt_token_ids, params, frozenset(), r.max_model_len)
        for r in template
    ]
    for request, source in zip(requests, template, strict=True):
        for token in source.output_token_ids:
            request.append_token(token)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        sampled = sampler(logits.clone(), requests).token_ids.tolist()
        times.append(time.perf_counter() - started)
        for request, token in zip(requests, sampled, strict=True):
            request.append_token(token)
    return statistics.median(times[1:]) * 1e3


def run(llm: LLM, batch_sizes: list[int], steps: int) -> list[dict[str, Any]]:
    rows = []
    for batch in batch_sizes:
        step_ms, logits, requests = model_steps(llm, batch, steps)
        row: dict[str, Any] = {"batch": batch, "model_step_ms": round(step_ms, 2)}
        for name, params in CONFIGS.items():
            ms = sampler_ms(logits, requests, params, steps)
            row[f"sampler_ms[{name}]"] = round(ms, 2)
            row[f"share_of_step[{name}]"] = round(ms / step_ms, 3)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tokenmill.bench.sampler", description=__doc__)
    parser.add_argument("model", nargs="?", default=None, help="default: the bundled SmolLM2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    args = parser.parse_args(argv)

    from tokenmill.llm import LLM

    llm = LLM(args.model, dtype=args.dtype)
    info = llm.engine.core.info
    report = {
        "model": llm.engine.core.source.name,
        "device": str(info.device),
        "dtype": str(info.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "results": run(llm, [int(b) for b in args.batch_sizes.split(",")], args.steps),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
