"""Structured-output benchmark: time per output token, guided JSON vs free, and compile time.

Drives the engine step by step (no HTTP). Every request decodes exactly --output-len tokens:
free requests ignore EOS, and the JSON schema asks for more records than fit. Time per
output token is the mean decode step (prefill excluded); free and guided runs alternate so
that a busy machine slows both alike. Compile times are the medium schema's of
tokenmill.bench.grammar_backends, first use (cache miss) vs cached.

With --constraint tool-required or tool-auto, the constraint is a tool call's instead
(tokenmill/tools: xgrammar's structural tag for one function tool whose parameters are the
schema, in the Hermes syntax): `required` holds every token to the call; `auto` lets text
through and watches for the call's opening marker.

python -m tokenmill.bench.structured [MODEL] [--batch-sizes 1 32] [--output-len 64]
    [--constraint json|tool-required|tool-auto]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from typing import TYPE_CHECKING, Any

from tokenmill.bench.offline import synthetic_prompt
from tokenmill.sampling_params import SamplingParams, structured_spec
from tokenmill.structured import StructuredSpec

if TYPE_CHECKING:  # imported when the benchmark runs: `tokenmill --help` stays fast
    from collections.abc import Sequence

    import torch

    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.sample.interface import SamplingRequest

_ids = itertools.count()


def bench_schema(string_max_length: int | None = None) -> dict[str, Any]:
    """An object holding an array of at least 16 records (~20 tokens each: more than any
    --output-len here, so every request runs to it); names bounded when asked."""
    name: dict[str, Any] = {"type": "string"}
    if string_max_length is not None:
        name["maxLength"] = string_max_length  # xgrammar: far costlier inside such strings
    record = {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 0, "maximum": 9999},
            "name": name,
            "role": {"type": "string", "enum": ["admin", "user", "guest"]},
            "active": {"type": "boolean"},
        },
        "required": ["id", "name", "role", "active"],
    }
    return {
        "type": "object",
        "properties": {"records": {"type": "array", "items": record, "minItems": 16}},
        "required": ["records"],
    }


class GrammarTimer:
    """Times the grammar work of each step: the sampler's masks (fill every constrained row,
    apply) and the matchers accepting the sampled tokens."""

    def __init__(self, engine: LLMEngine) -> None:
        from tokenmill.executor.uniproc import UniprocExecutor
        from tokenmill.structured.interface import BackendMatcher

        self.seconds = 0.0
        executor = engine.core.executor
        assert isinstance(executor, UniprocExecutor), "times the grammar work in this process"
        grammar = executor.worker.runner.sampler.grammar
        apply, accept = grammar.apply, BackendMatcher.accept_token

        def timed_apply(
            logits: torch.Tensor, requests: Sequence[SamplingRequest], rows: list[int]
        ) -> None:
            started = time.perf_counter()
            apply(logits, requests, rows)
            self.seconds += time.perf_counter() - started

        def timed_accept(matcher: BackendMatcher, token_id: int) -> bool:
            started = time.perf_counter()
            accepted = accept(matcher, token_id)
            self.seconds += time.perf_counter() - started
            return accepted

        grammar.apply = timed_apply  # type: ignore[method-assign]
        BackendMatcher.accept_token = timed_accept  # type: ignore[method-assign, assignment]


def decode_run(
    engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, timer: GrammarTimer
) -> tuple[float, float]:
    """Run the prompts to completion: (mean decode step, of which grammar work), in ms.

    The first step (prefill) is left out; every request samples one token per step, so the
    mean step is the time per output token.
    """
    for ids in prompts:
        engine.add_request(f"bench-{next(_ids)}", ids, params)
    step_seconds, grammar_seconds = [], []
    while engine.has_unfinished:
        started, before = time.perf_counter(), timer.seconds
        engine.step()
        step_seconds.append(time.perf_counter() - started)
        grammar_seconds.append(timer.seconds - before)
    return statistics.mean(step_seconds[1:]) * 1e3, statistics.mean(grammar_seconds[1:]) * 1e3


def compare(
    engine: LLMEngine,
    timer: GrammarTimer,
    schema: dict[str, Any],
    batch: int,
    output_len: int,
    backends: list[str],
    repeats: int,
    constraint: str = "json",
) -> dict[str, Any]:
    """Median time per output token, free and guided (per backend), at one batch size."""
    tokenizer = engine.tokenizer
    prompts = [tokenizer.encode(synthetic_prompt(i, 24) + " As JSON:") for i in range(batch)]
    free = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    runs: dict[str, list[tuple[float, float]]] = {"free": []}
    for backend in backends:
        spec = _spec(constraint, backend, schema)
        guided = SamplingParams(temperature=0.0, max_tokens=output_len, structured_outputs=spec)
        engine.structured_outputs.compile(spec)  # compile time is measured elsewhere
        runs[backend] = []
        for _ in range(repeats):
            runs["free"].append(decode_run(engine, prompts, free, timer))
            runs[backend].append(decode_run(engine, prompts, guided, timer))
    free_ms = statistics.median(step for step, _ in runs["free"])
    result: dict[str, Any] = {"batch": batch, "free_ms_per_token": round(free_ms, 2)}
    for backend in backends:
        guided_ms = statistics.median(step for step, _ in runs[backend])
        grammar_ms = statistics.median(grammar for _, grammar in runs[backend])
        result[backend] = {
            "json_ms_per_token": round(guided_ms, 2),
            "of_which_grammar_ms": round(grammar_ms, 2),
            "overhead": f"{guided_ms / free_ms - 1:+.1%}",
            "grammar_vs_free_step": f"{grammar_ms / free_ms:.1%}",
        }
    return result


def _spec(constraint: str, backend: str, schema: dict[str, Any]) -> StructuredSpec:
    """The benchmark's constraint: the schema itself, or a call of a tool taking it."""
    if constraint == "json":
        return structured_spec(backend, json=schema)
    from tokenmill.tools.formats import HERMES
    from tokenmill.tools.request import tool_use

    tool = {"type": "function", "function": {"name": "save_records", "parameters": schema}}
    mode = constraint.removeprefix("tool-")
    use = tool_use([tool], mode, True, HERMES, max_tools=1)
    assert use is not None
    spec = use.constraint()
    assert spec is not None
    return spec


def compile_times(engine: LLMEngine, backends: list[str]) -> list[dict[str, Any]]:
    """Backend setup, first and cached compile of the medium schema, per backend."""
    from tokenmill.bench.grammar_backends import bench_backend

    manager = engine.structured_outputs
    return [bench_backend(manager, backend, repeats=1) for backend in backends]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tokenmill bench structured", description=__doc__)
    add_arguments(parser)
    run_command(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=None, help="model (default: the bundled SmolLM2)"
    )
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; medians")
    parser.add_argument(
        "--string-max-length", type=int, default=None,
        help="give the records' name strings this maxLength (default: unbounded)",
    )  # fmt: skip
    parser.add_argument(
        "--backends", nargs="+", default=["xgrammar", "outlines", "lm-format-enforcer"],
        help="the first is measured at every batch size, the others at batch 1",
    )  # fmt: skip
    parser.add_argument(
        "--constraint", choices=["json", "tool-required", "tool-auto"], default="json",
        help="what the guided runs are held to: the schema, or a call of a tool taking it "
        "(tool calls: xgrammar only)",
    )  # fmt: skip


def run_command(args: argparse.Namespace) -> int:
    """`tokenmill bench structured`: print one JSON line per measurement."""
    from tokenmill.llm import LLM

    engine = LLM(args.model, dtype=args.dtype).engine
    for row in compile_times(engine, args.backends):  # first: the backends' setup is real
        print(json.dumps({"compile": row}))
    timer, schema = GrammarTimer(engine), bench_schema(args.string_max_length)
    decode_run(engine, [engine.tokenizer.encode("warm up")], SamplingParams(max_tokens=4), timer)
    for batch in args.batch_sizes:
        backends = args.backends if batch == 1 else args.backends[:1]
        if args.constraint != "json":
            backends = ["xgrammar"]
        row = compare(
            engine, timer, schema, batch, args.output_len, backends, args.repeats,
            args.constraint,
        )  # fmt: skip
        row["constraint"] = args.constraint
        print(json.dumps({"decode": row}))
    return 0


if __name__ == "__main__":
    main()
