"""Host overhead per engine step, with the model stubbed out: what bounds a GPU's throughput.

    python -m tokenmill.bench.host_overhead [MODEL] [--batch-sizes 1,256] [--steps 100]
        [--output-kind delta|cumulative|final_only]

The engine runs as it serves (scheduler, input preparation, attention metadata, output
handling, detokenizing, stop checks, output snapshots), but the forward returns zeros at
once and the sampler returns a fixed token without touching logits: what is left is the
work the host does around a forward and a sampling call, which on a GPU does not overlap
them. The garbage collector is set as the server sets it (engine/heap.py; --default-gc:
Python's own settings). Each batch size keeps `batch` greedy requests decoding (prompts
of 24 tokens) and times `--steps` steps after the first; the report gives the median step
and its phases. The requests' outputs are of `--output-kind`: delta by default, as the
server asks for them (cumulative: a copy of each output so far every step, as the offline
engine API gives by default; final_only: as LLM.generate asks). Prints one JSON report.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from tokenmill.bench.offline import synthetic_prompt
from tokenmill.engine.heap import settle_heap
from tokenmill.executor.uniproc import UniprocExecutor
from tokenmill.llm import LLM
from tokenmill.sample.interface import SamplerOutput
from tokenmill.sampling_params import RequestOutputKind, SamplingParams


class _Timer:
    """Wraps callables and sums their seconds per name over a step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

        return timed


def stub_model(llm: LLM, token_id: int) -> None:
    """The runner's forward returns zeros [T, C] (rows of one buffer) and its sampler
    `token_id` for every row."""
    executor = llm.engine.core.executor
    assert isinstance(executor, UniprocExecutor), "stubs the model in this process"
    runner = executor.worker.runner
    hidden_size = runner.model.config.hidden_size
    hidden = torch.zeros(0, hidden_size)

    def forward(batch: Any) -> torch.Tensor:
        # (rows of one buffer: on a GPU the forward's output is on the device, made by
        # its kernels; zeroing fresh host memory each step is no part of the host's work)
        nonlocal hidden
        if len(hidden) < len(batch.input_ids):
            hidden = torch.zeros(len(batch.input_ids), hidden_size)
        return hidden[: len(batch.input_ids)]

    def logits(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.empty(len(rows), 0)

    # instance attributes shadow the methods
    vars(runner).update(forward=forward, _logits=logits, sampler=_FixedToken(token_id))


class _FixedToken:
    """A sampler that draws `token_id` for every row without reading the logits."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def __call__(self, logits: torch.Tensor, requests: Any) -> SamplerOutput:
        return SamplerOutput(torch.full((len(requests),), self.token_id), None, [])

    def forget(self, request_id: str) -> None:
        pass


def measure(llm: LLM, batch: int, steps: int, kind: RequestOutputKind) -> dict[str, Any]:
    engine = llm.engine
    core = engine.core
    params = SamplingParams(
        temperature=0.0, max_tokens=steps + 2, ignore_eos=True, output_kind=kind
    )
    for i in range(batch):
        engine.add_request(
            f"host-{batch}-{i}", llm.tokenizer.encode(synthetic_prompt(i, 24)), params
        )
    while any(r.num_output_tokens == 0 for r in core.requests.values()):
        engine.step()  # prefill, in as many steps as the token budget takes
    timer = _Timer()
    timed = {
        (core.scheduler, "schedule"): "schedule",
        (core, "model_input"): "model_input",
        (core.executor, "execute"): "execute (prepare, stub forward, outputs)",
        (core.scheduler, "update"): "scheduler update",
    }
    for (owner, method), name in timed.items():  # instance attributes shadow the methods
        vars(owner)[method] = timer.wrap(name, getattr(owner, method))
    totals: list[float] = []
    phases: dict[str, list[float]] = {}
    preemptions = core.scheduler.num_preemptions
    try:
        for _ in range(steps):
            timer.seconds.clear()
            started = time.perf_counter()
            engine.step()
            totals.append(time.perf_counter() - started)
            for name, seconds in timer.seconds.items():
                phases.setdefault(name, []).append(seconds)
    finally:
        for owner, method in timed:
            del vars(owner)[method]
        while engine.has_unfinished:
            engine.step()
    step_ms = statistics.median(totals) * 1e3
    named = {name: statistics.median(s) * 1e3 for name, s in phases.items()}
    named["engine outputs (detokenize, stops, snapshots)"] = step_ms - sum(named.values())
    return {
        "batch": batch,
        # requests the KV cache could not hold (then the steps ran fewer: --kv-cache-gib)
        "preemptions": core.scheduler.num_preemptions - preemptions,
        "step_ms": round(step_ms, 3),
        "per_request_us": round(step_ms * 1e3 / batch, 1),
        "phases_ms": {name: round(ms, 3) for name, ms in named.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tokenmill.bench.host_overhead", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("model", nargs="?", default=None, help="default: the bundled model")
    parser.add_argument("--batch-sizes", default="1,256")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument(
        "--default-gc", action="store_true",
        help="keep Python's garbage collector settings (default: the server's, engine/heap.py)",
    )  # fmt: skip
    parser.add_argument(
        "--output-kind", default="delta", choices=[k.name.lower() for k in RequestOutputKind],
        help="what each output carries (default: delta, as the server asks)",
    )  # fmt: skip
    parser.add_argument(
        "--kv-cache-gib", type=float, default=1.0,
        help="KV cache size (default 1: 256 requests of ~170 tokens on the bundled model)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    kind = RequestOutputKind[args.output_kind.upper()]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    llm = LLM(args.model, max_num_seqs=max(batches), kv_cache_memory=int(args.kv_cache_gib * 2**30))
    stub_model(llm, llm.tokenizer.encode(" the")[-1])
    if not args.default_gc:
        settle_heap()
    report = {
        "steps": args.steps,
        "gc": "python's default" if args.default_gc else "the server's",
        "output_kind": kind.name.lower(),
        "results": [measure(llm, b, args.steps, kind) for b in batches],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
