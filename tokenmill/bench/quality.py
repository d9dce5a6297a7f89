"""Quality of the CPU weight paths: perplexity and greedy agreement with float32.

For one model (default: the bundled SmolLM2 GGUF), each CPU weight path that applies to
it is loaded in turn: gguf (the file's blocks, int8 activations), gguf-float32 (the same
blocks, float32 math), rtn (the float weights rounded to Q8_0 blocks at load, int8
activations), fp16 and none (float32 weights: the reference); the GGUF paths apply to
.gguf files only. Each path keeps its own defaults otherwise (the KV cache dtype of
"auto": float16 for gguf and rtn), or takes --kv-cache-dtype (the reference keeps its
float32 cache). On a fixed text (shipped in tokenmill/bench/data;
--text for another) it reports:

- perplexity, by llama-perplexity's method so the figures compare with llama.cpp's: the
  tokenized text is cut into len // ctx chunks of ctx tokens, each evaluated alone (the
  first token replaced by BOS where the tokenizer adds one), and only the second half of
  each chunk is scored (the logits at positions ctx/2 .. ctx-2 predicting the next token):
  perplexity = exp(mean NLL) over those tokens;
- greedy agreement: over the same positions, the share where the path's most likely next
  token equals the float32 model's (teacher-forced: both read the text, not their output);
- top-1: the share where the most likely next token is the text's own;
- each path's greedy answer to --question (default: the capital of France; '' to skip),
  through the chat template where the model has one.

Logits come from the engine's prompt logprobs (LLM.generate with prompt_logprobs=1), the
full-vocabulary log_softmax of each position on the path's own kernels. Progress (chunks
scored) goes to stderr; the table (or --json) to stdout.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, get_args

from tokenmill.config import KVCacheDtype
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:  # imported when the benchmark runs: `tokenmill --help` stays fast
    from tokenmill.llm import LLM
    from tokenmill.sample.logprobs import PositionLogprobs

PATHS = ("gguf", "gguf-float32", "rtn", "fp16", "none")  # display order; "none" is the reference
REFERENCE = "none"
GGUF_ONLY = ("gguf", "gguf-float32")
DEFAULT_QUESTION = "What is the capital of France?"


def default_text() -> str:
    """The fixed text shipped with tokenmill (original prose, public domain)."""
    return (resources.files("tokenmill.bench") / "data" / "quality.txt").read_text("utf-8")


def bos_token_id(tokenizer: Any) -> int | None:
    """The BOS id when encode() adds one (llama's add_bos), else None."""
    with_special = tokenizer.encode("x")
    plain = tokenizer.encode("x", add_special_tokens=False)
    bos = getattr(tokenizer.hf, "bos_token_id", None)
    if bos is not None and len(with_special) > len(plain) and with_special[0] == bos:
        return int(bos)
    return None


def make_chunks(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    """llama-perplexity's chunks: len // n_ctx windows of n_ctx tokens, BOS in front."""
    if n_ctx < 4:
        raise ValueError(f"ctx must be at least 4, got {n_ctx}")
    if len(tokens) < 2 * n_ctx:
        raise ValueError(
            f"the text has {len(tokens)} tokens; perplexity with ctx {n_ctx} needs at least "
            f"{2 * n_ctx} (a longer text or a smaller --ctx)"
        )
    chunks = [tokens[i * n_ctx : (i + 1) * n_ctx] for i in range(len(tokens) // n_ctx)]
    if bos is not None:
        chunks = [[bos, *chunk[1:]] for chunk in chunks]
    return chunks


def _argmax(entry: PositionLogprobs) -> int:
    """The most likely token of a prompt-logprobs entry (chosen token first, then top-1)."""
    items = list(entry.items())
    chosen_id, chosen = items[0]
    if chosen.rank == 1:
        return chosen_id
    return next(token_id for token_id, lp in items[1:] if lp.rank == 1)


@dataclass(slots=True)
class Scores:
    """One path's scored positions, in order over all chunks."""

    nll: list[float] = field(default_factory=list)  # -log p(text token)
    argmax: list[int] = field(default_factory=list)  # the path's most likely token
    target: list[int] = field(default_factory=list)  # the text's token
    seconds: float = 0.0


def score(llm: LLM, chunks: list[list[int]], label: str = "") -> Scores:
    """Teacher-forced scores of the second half of every chunk, one chunk per request."""
    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=1)
    first = len(chunks[0]) // 2
    out = Scores()
    started = time.perf_counter()
    for i, chunk in enumerate(chunks):
        (result,) = llm.generate([{"prompt_token_ids": chunk}], params, use_tqdm=False)
        entries = result.prompt_logprobs
        assert entries is not None and len(entries) == len(chunk)
        for position in range(first + 1, len(chunk)):  # logits at position-1 score it
            entry = entries[position]
            assert entry is not None
            token = chunk[position]
            out.nll.append(-entry[token].logprob)
            out.argmax.append(_argmax(entry))
            out.target.append(token)
        print(f"quality: {label} chunk {i + 1}/{len(chunks)}", file=sys.stderr, flush=True)
    out.seconds = time.perf_counter() - started
    return out


def answer(llm: LLM, question: str, max_tokens: int) -> str:
    """The greedy answer to `question` (through the chat template where there is one)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    if llm.tokenizer.chat_template:
        outputs = llm.chat([{"role": "user", "content": question}], params)
    else:
        outputs = llm.generate(question, params, use_tqdm=False)
    return outputs[0].outputs[0].text


@dataclass(slots=True)
class PathResult:
    path: str
    status: str = "ok"  # "ok", or why the path was skipped
    weights: str = ""  # what the engine reports it loaded (info.quantization)
    kv_cache_dtype: str = ""
    perplexity: float | None = None
    mean_nll: float | None = None
    greedy_agreement: float | None = None  # with the float32 reference
    top1: float | None = None  # most likely token == the text's
    scored_tokens: int = 0
    prompt_tokens_per_s: float | None = None  # chunk tokens scored per second
    answer: str | None = None


def run(
    model: str | None = None,
    text: str | None = None,
    n_ctx: int = 512,
    paths: tuple[str, ...] = PATHS,
    question: str | None = DEFAULT_QUESTION,
    max_tokens: int = 32,
    max_chunks: int | None = None,
    kv_cache_dtype: str | None = None,
    **engine_kwargs: Any,
) -> dict[str, Any]:
    """Score every path of `paths` that applies to `model`, each but the reference with
    its KV cache in `kv_cache_dtype` when given; the JSON report."""
    from tokenmill.errors import ModelLoadError
    from tokenmill.llm import LLM

    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ValueError(f"unknown paths {unknown or paths}; choose from {', '.join(PATHS)}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"chunks must be at least 1, got {max_chunks}")
    engine_kwargs = {"device": "cpu", "dtype": "float32", **engine_kwargs}
    text = default_text() if text is None else text
    order = [REFERENCE] + [p for p in paths if p != REFERENCE]  # the reference first
    results: dict[str, PathResult] = {}
    reference: Scores | None = None
    header: dict[str, Any] = {}
    chunks: list[list[int]] = []
    for path in order:
        result = results[path] = PathResult(path)
        if path in GGUF_ONLY and header.get("file_format") != "gguf":
            result.status = "skipped: not a GGUF file"
            continue
        cache = (
            {}
            if kv_cache_dtype is None or path == REFERENCE
            else {"kv_cache_dtype": kv_cache_dtype}
        )
        try:
            llm = LLM(model, quantization=path, **engine_kwargs, **cache)
        except ModelLoadError as exc:
            if path == REFERENCE:
                raise
            result.status = f"skipped: {exc}"
            continue
        try:
            info = llm.engine.core.info
            result.weights = info.quantization or "float32"
            result.kv_cache_dtype = str(info.kv_cache_dtype).removeprefix("torch.")
            if path == REFERENCE:
                tokens = llm.tokenizer.encode(text)
                bos = bos_token_id(llm.tokenizer)
                chunks = make_chunks(tokens, n_ctx, bos)[:max_chunks]
                source = llm.engine.core.source
                header = {
                    "model": source.name,
                    "file_format": source.file_format,
                    "ctx": n_ctx,
                    "text_tokens": len(tokens),
                    "chunks": len(chunks),
                    "bos": bos,
                }
            scores = score(llm, chunks, path)
            if path == REFERENCE:
                reference = scores
            assert reference is not None
            n = len(scores.nll)
            result.scored_tokens = n
            result.mean_nll = sum(scores.nll) / n
            result.perplexity = math.exp(result.mean_nll) if result.mean_nll < 700 else math.inf
            result.greedy_agreement = (
                sum(a == b for a, b in zip(scores.argmax, reference.argmax, strict=True)) / n
            )
            result.top1 = sum(a == t for a, t in zip(scores.argmax, scores.target, strict=True)) / n
            result.prompt_tokens_per_s = round(len(chunks) * n_ctx / scores.seconds, 1)
            if question:
                result.answer = answer(llm, question, max_tokens)
        finally:
            llm.engine.shutdown()
            del llm
            gc.collect()
    return {
        **header,
        "question": question or None,
        "paths": [asdict(results[p]) for p in paths],
    }


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table (a Markdown one)."""
    lines = [
        f"model {report['model']}, ctx {report['ctx']}, {report['chunks']} chunks "
        f"({report['text_tokens']} text tokens, second halves scored)",
        "",
        "| path | weights | KV cache | perplexity | greedy agreement | top-1 | scored tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["paths"]:
        if r["status"] != "ok":
            lines.append(f"| {r['path']} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['path']} | {r['weights']} | {r['kv_cache_dtype']} | {r['perplexity']:.4f} "
            f"| {r['greedy_agreement']:.4f} | {r['top1']:.4f} | {r['prompt_tokens_per_s']} |"
        )
    if report.get("question"):
        lines += ["", f"{report['question']}"]
        for r in report["paths"]:
            if r["answer"] is not None:
                lines.append(f"  {r['path']}: {json.dumps(r['answer'], ensure_ascii=False)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenmill bench quality", description=__doc__)
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", nargs="?", default=None, help="model (default: the bundled SmolLM2 GGUF)"
    )
    parser.add_argument(
        "--text", default=None, help="a UTF-8 text file to score (default: the bundled text)"
    )
    parser.add_argument(
        "--ctx", type=int, default=512, help="tokens per chunk (llama-perplexity's -c)"
    )
    parser.add_argument(
        "--paths",
        default=",".join(PATHS),
        help=f"comma-separated CPU paths among {','.join(PATHS)} (default: all that apply; "
        "the float32 reference, none, is scored in any case)",
    )
    parser.add_argument("--chunks", type=int, default=None, help="score the first N chunks only")
    parser.add_argument(
        "--question",
        default=DEFAULT_QUESTION,
        help="ask each path this, greedily ('' to skip)",
    )
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens of each answer")
    parser.add_argument(
        "--kv-cache-memory",
        type=_parse_bytes,
        default=None,
        metavar="BYTES",
        help="KV cache size of each path's engine, e.g. 256MiB (default: sized to the machine)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        choices=get_args(KVCacheDtype),
        default=None,
        help="KV cache of the paths scored against the reference, e.g. fp8_e5m2 (default: "
        "each path's own; the reference keeps float32)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON report")


_UNITS = {
    "": 1,
    "b": 1,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
}


def _parse_bytes(value: str) -> int:
    """'256MiB' -> 268435456; '1e9' and '1024' too (the serve flag's forms)."""
    number = value.strip().rstrip("BbIiKkMmGg")
    unit = value.strip()[len(number) :].lower()
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {value!r}")
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {value!r}") from None


def run_command(args: argparse.Namespace) -> int:
    """`tokenmill bench quality`: print the table (or the JSON report)."""
    text = None
    if args.text is not None:
        with open(args.text, encoding="utf-8") as f:
            text = f.read()
    paths = tuple(p.strip() for p in args.paths.split(",") if p.strip())
    try:
        report = run(
            args.model,
            text,
            n_ctx=args.ctx,
            paths=paths,
            question=args.question or None,
            max_tokens=args.max_tokens,
            max_chunks=args.chunks,
            kv_cache_memory=args.kv_cache_memory,
            kv_cache_dtype=args.kv_cache_dtype,
        )
    except ValueError as exc:  # a text too short for ctx, an unknown path
        print(f"tokenmill bench quality: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0
