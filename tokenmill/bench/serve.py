"""HTTP load generator for any OpenAI-compatible server: TTFT, inter-token latency, throughput.

Closed loop: at concurrency C, C workers each send one streaming request, wait for its last
chunk, and send the next, until the level's requests are done. Every prompt is distinct
(no two share more than a word or so of prefix, unless --shared-prefix-tokens asks for one),
and every request asks for exactly --output-tokens (max_tokens = min_tokens, ignore_eos).

Per request: TTFT = send -> first content chunk; ITL = the gaps between content chunks;
e2e = send -> end of stream; output tokens = usage.completion_tokens when the server sends
usage (stream_options.include_usage), else the number of content chunks.

--background-load N runs N pure-Python busy loops (`while True: pass`) during the measured
requests (after the warm-up), each in a session of its own: with the kernel's autogroup
scheduling (/proc/sys/kernel/sched_autogroup_enabled) every session is a scheduling group, so
each loop competes with the server as another service or container would. They are killed when
the requests are done, on an error or an interrupt, and if the benchmark itself is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

if TYPE_CHECKING:  # imported when a benchmark runs: `tokenmill --help` stays fast
    import httpx

Endpoint = Literal["chat", "completions"]
# Common English words, one token each in most BPE vocabularies (with their leading space).
_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force"
)
_WORDS = _WORD_TEXT.split()


@dataclass(slots=True)
class Workload:
    """What every request of a run looks like; identical for the compared servers."""

    endpoint: Endpoint = "chat"
    prompt_tokens: int = 32  # approximate: one common word per token, template not counted
    shared_prefix_tokens: int = 0  # leading words every prompt of a run has in common
    output_tokens: int = 128  # exact, when the server honours ignore_eos / min_tokens
    temperature: float = 0.0
    request_timeout: float = 600.0  # seconds; httpx's connect/read/write/pool timeout
    prompt_seed: str = ""  # other prompts for a second run against the same (caching) server


@dataclass(slots=True)
class Target:
    """One server under test."""

    base_url: str  # ends in /v1
    model: str | None = None  # None: the first id from GET /models
    api_key: str | None = None
    name: str | None = None  # None: the model card's owned_by, else host:port


@dataclass(slots=True)
class RequestResult:
    """What one streaming request measured; times are seconds since it was sent."""

    chunk_times: list[float] = field(default_factory=list)  # of content chunks
    e2e: float = 0.0
    usage_completion_tokens: int | None = None
    usage_prompt_tokens: int | None = None
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0]

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in pairwise(self.chunk_times)]

    @property
    def num_output_tokens(self) -> int:
        if self.usage_completion_tokens is not None:
            return self.usage_completion_tokens
        return len(self.chunk_times)


@dataclass(slots=True)
class LevelReport:
    """One concurrency level's results; latencies in milliseconds, None when nothing measured."""

    concurrency: int
    num_requests: int
    num_errors: int
    first_error: str | None
    duration_s: float  # wall time of the level
    request_throughput: float  # successful requests / s
    output_throughput: float  # output tokens of successful requests / s
    mean_prompt_tokens: float | None  # from usage, when the server reports it
    mean_output_tokens: float | None
    ttft_ms_p50: float | None
    ttft_ms_p90: float | None
    ttft_ms_p99: float | None
    itl_ms_p50: float | None
    itl_ms_p90: float | None
    itl_ms_p99: float | None
    # time per output token after the first, (e2e - TTFT) / (tokens - 1): holds for any chunking
    tpot_ms_p50: float | None
    e2e_ms_p50: float | None
    e2e_ms_p90: float | None


class RequestFailed(Exception):
    """The server answered, but not with a usable stream."""


class BenchError(Exception):
    """A reason the benchmark cannot run, said in one line."""


# --------------------------------------------------------------------------------------
# Prompts and requests
# --------------------------------------------------------------------------------------


def synthetic_prompt(seed: str, num_words: int, shared_prefix_words: int = 0) -> str:
    """About num_words tokens of words; the first shared_prefix_words are the same for all seeds."""
    shared = random.Random("shared-prefix").choices(_WORDS, k=shared_prefix_words)
    own = random.Random(seed).choices(_WORDS, k=max(num_words - shared_prefix_words, 0))
    return " ".join(shared + own)


def request_body(workload: Workload, model: str, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model}
    if workload.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body | {
        "max_tokens": workload.output_tokens,
        "min_tokens": workload.output_tokens,  # vLLM / tokenmill extras: every request runs
        "ignore_eos": True,  # to max_tokens, so servers are compared on equal work
        "temperature": workload.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send_request(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    """Send one streaming request and time its chunks; a failure is recorded, never raised."""
    import httpx

    result = RequestResult()
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise RequestFailed(f"HTTP {response.status_code}: {_error_message(response)}")
            async for line in response.aiter_lines():
                data = line.removeprefix("data:").strip() if line.startswith("data:") else ""
                if data == "[DONE]":
                    break
                if data:
                    _record_chunk(result, json.loads(data), time.perf_counter() - start)
        if not result.chunk_times:
            raise RequestFailed("the stream ended without any content")
    except (httpx.HTTPError, RequestFailed, json.JSONDecodeError) as exc:
        result.error = str(exc) or type(exc).__name__
    result.e2e = time.perf_counter() - start
    return result


def _record_chunk(result: RequestResult, chunk: Any, elapsed: float) -> None:
    if not isinstance(chunk, dict):
        raise RequestFailed(f"not a JSON object in the stream: {str(chunk)[:100]}")
    if "error" in chunk:  # an error after the stream started (OpenAI / vLLM framing)
        error = chunk["error"]
        raise RequestFailed(error.get("message", str(error)) if isinstance(error, dict) else error)
    usage = chunk.get("usage") or {}
    if usage.get("completion_tokens") is not None:
        result.usage_completion_tokens = usage["completion_tokens"]
        result.usage_prompt_tokens = usage.get("prompt_tokens")
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        text = choice.get("text") or delta.get("content") or delta.get("reasoning_content")
        if text or delta.get("reasoning"):  # reasoning models stream thoughts before content
            result.chunk_times.append(elapsed)
            return


def _error_message(response: httpx.Response) -> str:
    """The message of an OpenAI error envelope, or the start of whatever the body is."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200].strip() or response.reason_phrase
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message") or error.get("detail") or error)[:200]
    return str(error)[:200]


# --------------------------------------------------------------------------------------
# Running levels
# --------------------------------------------------------------------------------------

Progress = Callable[[str], None]


async def bench_target(
    target: Target,
    workload: Workload,
    levels: Sequence[tuple[int, int]],  # (concurrency, num_requests), run in order
    *,
    warmup: int = 2,
    background_load: int = 0,
    progress: Progress | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[LevelReport]:
    """Warm the server up, then run each level, with `background_load` busy processes running
    beside it from the first level's start to the last one's end; fills in target.model and
    target.name."""
    import httpx

    max_concurrency = max(c for c, _ in levels)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    limits = httpx.Limits(
        max_connections=max_concurrency, max_keepalive_connections=max_concurrency
    )
    timeout = httpx.Timeout(workload.request_timeout)
    async with httpx.AsyncClient(
        headers=headers, limits=limits, timeout=timeout, transport=transport
    ) as client:
        await _describe(client, target)
        assert target.model is not None
        path = "chat/completions" if workload.endpoint == "chat" else "completions"
        url = f"{target.base_url}/{path}"
        if warmup:
            await _warm_up(client, url, workload, target.model, warmup)
        reports = []
        with busy_processes(background_load):
            for index, (concurrency, num_requests) in enumerate(levels):
                bodies = [
                    request_body(workload, target.model, _prompt(workload, f"level{index}-{i}"))
                    for i in range(num_requests)
                ]
                report = await run_level(client, url, bodies, concurrency)
                reports.append(report)
                if progress:
                    progress(f"[{target.name}] {_progress_line(report)}")
    return reports


# A pure-Python busy loop. It first asks the kernel to SIGKILL it when the benchmark's process
# exits (PR_SET_PDEATHSIG; Linux), so a benchmark killed by a signal leaves no loop behind; then
# it spins exactly like `python3 -c "while True: pass"`.
_BUSY_LOOP = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
except (AttributeError, OSError):
    pass
if os.getppid() != {parent}:  # the benchmark exited before prctl took effect
    sys.exit()
while True:
    pass
"""


@contextmanager
def busy_processes(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` busy-loop processes, each in a new session (its own autogroup), for the block."""
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-c", _BUSY_LOOP.format(parent=os.getpid())],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
        yield processes
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()


async def run_level(
    client: httpx.AsyncClient, url: str, bodies: list[dict[str, Any]], concurrency: int
) -> LevelReport:
    """Closed loop: `concurrency` workers take the next body as soon as their last one is done."""
    pending = iter(bodies)
    results: list[RequestResult] = []

    async def worker() -> None:
        for body in pending:  # one iterator shared by the workers: each body is sent once
            results.append(await send_request(client, url, body))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(concurrency, results, time.perf_counter() - start)


async def _describe(client: httpx.AsyncClient, target: Target) -> None:
    """Ask GET /models for the default model and a name (vLLM, llamacpp, tokenmill...)."""
    import httpx

    try:
        response = await client.get(f"{target.base_url}/models")
        response.raise_for_status()
        cards = response.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        if target.model is None:
            raise BenchError(f"cannot list models at {target.base_url}/models: {exc}") from None
        cards = []
    if target.model is None:
        if not cards:
            raise BenchError(f"{target.base_url}/models lists no models; pass --model")
        target.model = cards[0]["id"]
    card = next((c for c in cards if c.get("id") == target.model), cards[0] if cards else {})
    target.name = target.name or card.get("owned_by") or urlsplit(target.base_url).netloc


async def _warm_up(
    client: httpx.AsyncClient, url: str, workload: Workload, model: str, num_requests: int
) -> None:
    bodies = [
        request_body(workload, model, _prompt(workload, f"warmup-{i}")) for i in range(num_requests)
    ]
    results = await asyncio.gather(*(send_request(client, url, body) for body in bodies))
    if all(r.error for r in results):
        raise BenchError(f"every warm-up request to {url} failed: {results[0].error}")


def _prompt(workload: Workload, seed: str) -> str:
    seed = workload.prompt_seed + seed
    return synthetic_prompt(seed, workload.prompt_tokens, workload.shared_prefix_tokens)


# --------------------------------------------------------------------------------------
# Statistics and reports
# --------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation, as numpy's default; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(concurrency: int, results: list[RequestResult], duration: float) -> LevelReport:
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    prompt_counts = [r.usage_prompt_tokens for r in ok if r.usage_prompt_tokens is not None]
    output_counts = [r.num_output_tokens for r in ok]
    ttfts = [r.ttft * 1000 for r in ok]
    itls = [gap * 1000 for r in ok for gap in r.itls]
    tpots = [
        (r.e2e - r.ttft) * 1000 / (r.num_output_tokens - 1) for r in ok if r.num_output_tokens > 1
    ]
    e2es = [r.e2e * 1000 for r in ok]
    return LevelReport(
        concurrency=concurrency,
        num_requests=len(results),
        num_errors=len(errors),
        first_error=errors[0] if errors else None,
        duration_s=round(duration, 3),
        request_throughput=round(len(ok) / duration, 3),
        output_throughput=round(sum(output_counts) / duration, 3),
        mean_prompt_tokens=_round(_mean(prompt_counts)),
        mean_output_tokens=_round(_mean(output_counts)),
        **{f"ttft_ms_p{q}": _round(percentile(ttfts, q)) for q in (50, 90, 99)},
        **{f"itl_ms_p{q}": _round(percentile(itls, q)) for q in (50, 90, 99)},
        tpot_ms_p50=_round(percentile(tpots, 50)),
        **{f"e2e_ms_p{q}": _round(percentile(e2es, q)) for q in (50, 90)},
    )


def ratios(ours: list[LevelReport], theirs: list[LevelReport]) -> list[dict[str, Any]]:
    """ours / theirs for every measured metric of each level (None where either is missing)."""
    skip = {"concurrency", "num_requests", "num_errors", "first_error"}
    names = [f.name for f in fields(LevelReport) if f.name not in skip]
    rows = []
    for a, b in zip(ours, theirs, strict=True):
        row: dict[str, Any] = {"concurrency": a.concurrency}
        for name in names:
            x, y = getattr(a, name), getattr(b, name)
            row[name] = round(x / y, 3) if x is not None and y else None
        rows.append(row)
    return rows


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _progress_line(report: LevelReport) -> str:
    line = (
        f"concurrency {report.concurrency}: {report.num_requests} requests in "
        f"{report.duration_s:.1f} s, {report.output_throughput:.1f} output tok/s, "
        f"{report.num_errors} errors"
    )
    return line + (f" (first: {report.first_error})" if report.first_error else "")


# Table columns: header and the LevelReport fields shown (several fields: joined with "/").
_COLUMNS = [
    ("conc", ["concurrency"]),
    ("reqs", ["num_requests"]),
    ("err", ["num_errors"]),
    ("req/s", ["request_throughput"]),
    ("out tok/s", ["output_throughput"]),
    ("TTFT ms p50/p90/p99", ["ttft_ms_p50", "ttft_ms_p90", "ttft_ms_p99"]),
    ("ITL ms p50/p90/p99", ["itl_ms_p50", "itl_ms_p90", "itl_ms_p99"]),
    ("e2e ms p50/p90", ["e2e_ms_p50", "e2e_ms_p90"]),
]


def format_table(rows: Sequence[dict[str, Any]], *, is_ratio: bool = False) -> str:
    """Rows (LevelReport dicts, or ratio dicts) as a right-aligned text table."""
    counts = ("num_requests", "num_errors")  # no ratio of these
    columns = [c for c in _COLUMNS if not (is_ratio and c[1][0] in counts)]
    cells = [
        [
            "/".join(_fmt(row[n], is_ratio and n != "concurrency") for n in names)
            for _, names in columns
        ]
        for row in rows
    ]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, (h, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (h, _), w in zip(columns, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def _fmt(value: Any, is_ratio: bool) -> str:
    if value is None:
        return "-"
    if is_ratio:
        return f"{value:.2f}"
    if isinstance(value, int) or value >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_report(result: dict[str, Any]) -> str:
    """The printed report: a table per server, then the ratios when two were compared."""
    parts = []
    if busy := result.get("background_load"):
        parts.append(
            f"background load: {busy} busy process{'es' if busy > 1 else ''} (`while True: pass`,"
            " each in a session of its own) ran during the measured requests"
        )
    for run in result["runs"]:
        parts.append(f"{run['name']}: {run['base_url']}  model={run['model']}")
        parts.append(format_table(run["levels"]))
        parts += [
            f"  concurrency {lv['concurrency']}: {lv['num_errors']} of {lv['num_requests']} "
            f"requests failed; first error: {lv['first_error']}"
            for lv in run["levels"]
            if lv["num_errors"]
        ]
    if "ratios" in result:
        ours, theirs = (run["name"] for run in result["runs"])
        parts.append(f"ratio {ours}/{theirs} (throughput: >1 is {ours} faster; latency: <1 is)")
        parts.append(format_table(result["ratios"], is_ratio=True))
    return "\n".join(parts)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--base-url", required=True, help="the server's API root, e.g. http://127.0.0.1:8000/v1")
    add("--model", default=None, help="model to request (default: the first id of GET /models)")
    add("--api-key", default=None, help="sent as `Authorization: Bearer <key>`")
    add("--name", default=None, help="label of this server (default: its models' owned_by)")
    add("--endpoint", choices=["chat", "completions"], default="chat", help="(default: chat)")
    add("--concurrency", type=_positive, nargs="+", default=[1], metavar="N",
        help="concurrent requests; several values run in turn (default: 1)")  # fmt: skip
    add("--num-requests", type=_positive, default=None, metavar="N",
        help="requests per concurrency level (default: 4x concurrency, at least 8)")  # fmt: skip
    add("--prompt-tokens", type=_positive, default=32, metavar="N",
        help="approximate prompt length (default: 32)")  # fmt: skip
    add("--shared-prefix-tokens", type=int, default=0, metavar="N",
        help="words every prompt starts with, to measure prefix caching (default: 0)")  # fmt: skip
    add(
        "--output-tokens",
        type=_positive,
        default=128,
        metavar="N",
        help="tokens per request (default: 128)",
    )
    add("--temperature", type=float, default=0.0, help="(default: 0, greedy)")
    add("--warmup", type=int, default=2, metavar="N", help="untimed requests first (default: 2)")
    add("--request-timeout", type=float, default=600.0, metavar="SECONDS", help="(default: 600)")
    add("--prompt-seed", default="", metavar="TEXT",
        help="mixed into every prompt's seed: other prompts than a run without it, so a second "
        "run against the same server misses its prefix cache (default: none)")  # fmt: skip
    add("--background-load", type=int, default=0, metavar="N",
        help="run N pure-Python busy loops, each in a session of its own, during the measured "
        "requests (after the warm-up), to measure the server sharing the CPU (default: 0)")  # fmt: skip
    add("--json", default=None, metavar="PATH", help="write the results as JSON here ('-': stdout)")
    add("--plot", default=None, metavar="PNG",
        help="draw output tok/s, TTFT and inter-token latency against concurrency for each "
        "server into this file (needs matplotlib: pip install 'tokenmill[bench]')")  # fmt: skip
    add("--compare-base-url", default=None, metavar="URL",
        help="then run the same workload against this server and print the ratios")  # fmt: skip
    add("--compare-model", default=None, help="model on the compared server (default: its first)")
    add("--compare-api-key", default=None, help="API key of the compared server")
    add("--compare-name", default=None, help="label of the compared server")


def run_command(args: argparse.Namespace) -> int:
    """`tokenmill bench serve`: run, print the tables, optionally write JSON."""
    if not 0 <= args.shared_prefix_tokens < args.prompt_tokens:
        print(
            "bench serve: error: --shared-prefix-tokens must be in [0, --prompt-tokens)",
            file=sys.stderr,
        )
        return 2
    if args.background_load < 0:
        print("bench serve: error: --background-load must be at least 0", file=sys.stderr)
        return 2
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # before a long run
        print("bench serve: error: --plot needs matplotlib: pip install 'tokenmill[bench]'",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        result = asyncio.run(_run(args))
    except BenchError as exc:
        print(f"bench serve: error: {exc}", file=sys.stderr)
        return 1
    print(format_report(result))
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        from tokenmill.bench.plot import PlotError, save_plot

        try:
            save_plot(result, args.plot)
        except (OSError, PlotError) as exc:
            print(f"bench serve: error: {exc}", file=sys.stderr)
            return 1
        print(f"chart written to {args.plot}", file=sys.stderr)
    return 0


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    workload = Workload(
        endpoint=args.endpoint, prompt_tokens=args.prompt_tokens,
        shared_prefix_tokens=args.shared_prefix_tokens, output_tokens=args.output_tokens,
        temperature=args.temperature, request_timeout=args.request_timeout,
        prompt_seed=args.prompt_seed,
    )  # fmt: skip
    levels = [(c, args.num_requests or max(4 * c, 8)) for c in args.concurrency]
    targets = [Target(_api_root(args.base_url), args.model, args.api_key, args.name)]
    if args.compare_base_url:
        targets.append(
            Target(
                _api_root(args.compare_base_url),
                args.compare_model,
                args.compare_api_key,
                args.compare_name,
            )
        )
    reports = [
        await bench_target(
            t,
            workload,
            levels,
            warmup=args.warmup,
            background_load=args.background_load,
            progress=_print_progress,
        )
        for t in targets
    ]
    result: dict[str, Any] = {
        "workload": asdict(workload) | {"warmup": args.warmup},
        "background_load": args.background_load,
        "levels": [{"concurrency": c, "num_requests": n} for c, n in levels],
        "runs": [
            {"name": t.name, "base_url": t.base_url, "model": t.model}
            | {"levels": [asdict(r) for r in level_reports]}
            for t, level_reports in zip(targets, reports, strict=True)
        ],
    }
    if len(reports) == 2:
        result["ratios"] = ratios(*reports)
    return result


def _print_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _api_root(url: str) -> str:
    """The base URL without a trailing slash; a bare host:port gets /v1."""
    url = url.rstrip("/")
    return url if urlsplit(url).path else f"{url}/v1"


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tokenmill bench serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
