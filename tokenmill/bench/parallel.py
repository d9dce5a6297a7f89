"""Tensor- and data-parallel benchmark (issue 25): what splitting the work over ranks costs on
this machine, and what the same communication would cost on paper over NVLink.

Four parts (`--only` picks some; each prints a markdown table on stdout, progress and the
load average go to stderr):

collectives  ParallelGroup's collectives between 2 and 3 ranks on this machine (gloo over
    loopback, groups made by tokenmill.distributed.group.create_group; rank 0 in this
    process, the others in fresh interpreters, multiprocessing's spawn):
    all_reduce of [T, 576] float32 (SmolLM2's hidden size; T = 1, 8, 32 decode rows, 256 a
    prefill chunk), gather_last_dim of the logits [T, V / ranks] float32 to rank 0, and
    broadcast_object of the step message the leader sends each step (T decode rows of
    512-token contexts: input ids, positions, the StepLayout with its block tables) and of
    the logits message (the rows that sample); with 2 ranks also "(all_gather + sum)", the
    all-reduce as ParallelGroup runs it for more than 2 ranks on a CPU, for comparison with
    gloo's own all_reduce, which it uses for 2. Each run is `iters` calls between two
    barriers (a 1-element all_reduce), timed on rank 0: a broadcast whose send returns
    before the others have received it is still counted to its end. Microseconds per call,
    median [min-max] over --runs. Each rank gets its share of the cores for torch's
    threads, as the engine gives its ranks; `--pin-ranks` places them on given CPUs (on a
    VM a collective between ranks on two vCPUs costs several times one between ranks that
    share a vCPU: the wake-up of the other vCPU, not the bytes, is the price).
paper    `step_communication()`: the collectives and bytes of one tensor-parallel decode step
    from the model's shape, and their time at NVLink's bandwidth and latency (assumed below:
    NVLINK_BYTES_PER_S, COLLECTIVE_LATENCY_S) against the step's own floor on an H100 (the
    weights read from HBM, or the FLOPs at the tensor cores' rate, whichever is longer), for
    Llama-3.2-1B and Llama-3-8B at TP = 2, 4, 8 and batch 1 and 256. Arithmetic, not a run.
tp       The offline LLM, 8 prompts x 32 greedy tokens (ignore_eos, prefix caching off): the
    bundled SmolLM2-135M (Q4_1 GGUF; 9 heads / 3 KV heads split over 3 ranks, not 2) at
    TP=1 and TP=3, and a random-weight Llama of SmolLM2's depth with 8 / 4 heads (hidden
    512, saved by transformers to a temporary directory with the bundled tokenizer:
    `save_tp2_model`) at TP=1 and TP=2; each model also at TP=1 "layer by layer" (the
    fused one-call decode step turned off, as TP turns it off), which separates the loss of
    the fused step from the split's own cost. Each executor step is timed; decode tok/s counts
    the decode-only steps. On rank 0 the time inside its collectives is summed per step
    (simple timers around ParallelGroup's methods, this process only): it holds the wire
    time and any wait for a slower rank. "part 1 predicts" is the step's collectives
    (step_communication's count) at part 1's per-call times for T = 8.
dp       `tokenmill serve --data-parallel-size 1` and `2` (bundled model, --kv-cache-memory
    256MiB, a free port), each driven by `tokenmill bench serve`'s closed loop
    (tokenmill/bench/serve.py): 8 concurrent completions streams of ~32 prompt tokens and 64
    output tokens, --runs rounds of 8 requests after 8 warm-up requests; output tok/s,
    TTFT and time per output token.

No speedup is expected on a 2-core machine: the ranks (and data-parallel engines) share the
same cores, so the benchmark measures what the split costs. `--background-load N` runs N
busy loops (`while True: pass`, each in a session of its own) for the whole run.

python -m tokenmill.bench.parallel [--runs 5] [--quick] [--only PART ...] [--ranks 2 3]
    [--pin-ranks CPU ...] [--background-load N] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pickle
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:  # imported when the benchmark runs: `tokenmill --help` stays fast
    from multiprocessing.process import BaseProcess

    import torch

    from tokenmill.distributed.group import ParallelGroup
    from tokenmill.llm import LLM

PARTS = ("collectives", "paper", "tp", "dp")
TOKENS = (1, 8, 32, 256)  # rows of a collective: decode batches, and a prefill chunk
HIDDEN, VOCAB, LAYERS = 576, 49152, 30  # SmolLM2-135M
CONTEXT = 512  # tokens of context of each decode row in the step message
BLOCK_SIZE = 16  # the engine's default KV block
OPS = ("all_reduce", "gather_last_dim", "broadcast_object step", "broadcast_object logits")
# not an op of the engine's with 2 ranks: the all-reduce as ParallelGroup does it with more
# than 2 on a CPU (all_gather, then the sum in rank order), for comparison
ALL_GATHER_SUM = "all_gather + sum"

# "On paper": NVLink 4 on an H100 SXM moves 900 GB/s per GPU, both directions together,
# i.e. 450 GB/s each way; a ring all-reduce runs at most at that per-direction rate. NCCL's
# latency for a small collective (launch, handshake, a few hops) is taken as 10 us; HBM3 at
# 3.35 TB/s and 989 TFLOP/s of dense bfloat16 are the H100 SXM's data-sheet figures.
NVLINK_BYTES_PER_S = 450e9
COLLECTIVE_LATENCY_S = 10e-6
HBM_BYTES_PER_S = 3.35e12
TENSOR_FLOPS = 989e12
PAPER_TP = (2, 4, 8)
PAPER_BATCH = (1, 256)


@dataclass(frozen=True, slots=True)
class ModelShape:
    name: str
    num_layers: int
    hidden: int
    vocab: int
    parameters: int  # for the step's floor: weights read once per step, 2 FLOPs each per token


PAPER_MODELS = (
    ModelShape("Llama-3.2-1B", 16, 2048, 128256, 1_235_814_400),
    ModelShape("Llama-3-8B", 32, 4096, 128256, 8_030_261_248),
)


def step_communication(
    num_layers: int,
    hidden: int,
    vocab: int,
    ranks: int,
    tokens: int,
    rows_with_logits: int,
    *,
    activation_bytes: int = 4,
    logits_bytes: int = 4,
    all_reduce: Literal["ring", "all_gather"] = "ring",
) -> tuple[int, int]:
    """(collectives, bytes) of one tensor-parallel step of `tokens` rows of which
    `rows_with_logits` sample, as tokenmill's layers split a dense decoder over `ranks`.

    Collectives: the step message (broadcast_object: two broadcasts, its size then its
    pickle), the vocab-parallel embedding's all-reduce, two all-reduces per layer (after
    o_proj and after down_proj; an MoE layer's second is after its experts), and when a row
    samples the logits message (two broadcasts) and the gather of the logits.

    Bytes: what rank 0 receives, the busiest link's one direction. An all-reduce of S bytes
    ([tokens, hidden] activations) moves 2(n-1)/n * S per rank as a ring (reduce-scatter
    then all-gather, each (n-1)/n * S: NCCL's, and gloo's with two ranks); with
    `all_reduce="all_gather"` (gloo on a CPU with more than two ranks: the partial sums are
    gathered and added in rank order) it is (n-1) * S. The gather brings rank 0 the other
    ranks' [rows_with_logits, ceil(vocab / n)] slices of float32 logits. The step and logits
    messages (a few hundred bytes to some KB; part 1 measures them) are counted as
    collectives but not in the bytes."""
    if ranks < 1 or tokens < 0 or not 0 <= rows_with_logits <= tokens:
        raise ValueError("need ranks >= 1 and 0 <= rows_with_logits <= tokens")
    if ranks == 1:
        return 0, 0
    reduces = 2 * num_layers + 1
    collectives = 2 + reduces + (3 if rows_with_logits else 0)
    size = tokens * hidden * activation_bytes
    # (the ring's share rounded down to a byte where n does not divide 2(n-1) * size)
    per_reduce = 2 * (ranks - 1) * size // ranks if all_reduce == "ring" else (ranks - 1) * size
    gathered = (ranks - 1) * rows_with_logits * -(-vocab // ranks) * logits_bytes
    return collectives, reduces * per_reduce + gathered


@dataclass(frozen=True, slots=True)
class PaperRow:
    model: str
    tp: int
    batch: int
    collectives: int
    bytes: int
    comm_us: float  # collectives x latency + bytes / NVLink bandwidth
    floor_us: float  # max(weights per rank / HBM, FLOPs per rank / tensor cores)

    @property
    def comm_share(self) -> float:
        """The communication's share of a step that is its floor plus the communication
        (nothing overlapped)."""
        return self.comm_us / (self.comm_us + self.floor_us)


def paper_rows(
    models: tuple[ModelShape, ...] = PAPER_MODELS,
    tps: tuple[int, ...] = PAPER_TP,
    batches: tuple[int, ...] = PAPER_BATCH,
) -> list[PaperRow]:
    """Decode steps (every row samples) in bfloat16 activations, float32 logits."""
    rows = []
    for model in models:
        for tp in tps:
            for batch in batches:
                collectives, moved = step_communication(
                    model.num_layers,
                    model.hidden,
                    model.vocab,
                    tp,
                    batch,
                    batch,
                    activation_bytes=2,
                )
                comm = collectives * COLLECTIVE_LATENCY_S + moved / NVLINK_BYTES_PER_S
                weights = 2 * model.parameters / tp / HBM_BYTES_PER_S
                flops = 2 * model.parameters * batch / tp / TENSOR_FLOPS
                floor = max(weights, flops)
                rows.append(
                    PaperRow(model.name, tp, batch, collectives, moved, comm * 1e6, floor * 1e6)
                )
    return rows


def format_paper(rows: list[PaperRow]) -> str:
    columns = (
        "model",
        "TP",
        "batch",
        "collectives per step",
        "MB to rank 0 per step",
        "communication us/step",
        "step floor us (HBM or FLOPs)",
        "communication share",
    )
    cells = [
        (
            r.model,
            str(r.tp),
            str(r.batch),
            str(r.collectives),
            f"{r.bytes / 1e6:.2f}",
            f"{r.comm_us:.0f}",
            f"{r.floor_us:.0f}",
            f"{r.comm_share:.0%}",
        )
        for r in rows
    ]
    return _table(columns, cells)


# --------------------------------------------------------------------------------------
# Part 1: collectives on this machine
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Case:
    op: str  # one of OPS
    tokens: int
    iters: int


@dataclass(frozen=True, slots=True)
class CollectiveSpec:
    """What a follower rank runs."""

    rank: int
    size: int
    port: int
    cases: tuple[Case, ...]
    runs: int
    threads: int
    cpu: int | None = None  # run on this CPU only (--pin-ranks)


@dataclass
class CollectiveResult:
    ranks: int
    op: str
    tokens: int
    payload_bytes: int  # the tensor each rank contributes; a message's pickle
    iters: int
    us: list[float] = field(default_factory=list)  # per run, microseconds per call

    @property
    def median_us(self) -> float:
        return statistics.median(self.us)


def collective_cases(size: int, quick: bool) -> tuple[Case, ...]:
    """Every op at every T; 10-100 calls a run, fewer for bigger payloads (3 with --quick)."""
    cases = []
    for op in OPS + ((ALL_GATHER_SUM,) if size == 2 else ()):
        for tokens in TOKENS:
            if quick:
                iters = 3
            else:
                iters = int(min(100, max(10, 4e7 / max(1, _payload_estimate(op, tokens, size)))))
            cases.append(Case(op, tokens, iters))
    return tuple(cases)


def _payload_estimate(op: str, tokens: int, size: int) -> int:
    if op in ("all_reduce", ALL_GATHER_SUM):
        return tokens * HIDDEN * 4
    if op == "gather_last_dim":
        return tokens * -(-VOCAB // size) * 4
    return 64 * tokens  # a message: small


def step_message(rows: int) -> tuple[str, Any]:
    """The ("step", ...) message the leader broadcasts for `rows` decode rows of CONTEXT
    tokens of context each (tokenmill/worker/model_runner.py: forward)."""
    from array import array

    import torch

    from tokenmill.layers.attention import ScheduledChunk, StepLayout

    blocks = CONTEXT // BLOCK_SIZE
    chunks = [
        ScheduledChunk(row, CONTEXT - 1, 1, array("q", range(row * blocks, (row + 1) * blocks)))
        for row in range(rows)
    ]
    positions = torch.full((rows,), CONTEXT - 1, dtype=torch.int64)
    slots = torch.tensor([c.block_table[-1] * BLOCK_SIZE + BLOCK_SIZE - 1 for c in chunks])
    layout = StepLayout(chunks, rows, positions.clone(), slots, BLOCK_SIZE)
    input_ids = torch.arange(rows, dtype=torch.int64) + 1000
    return ("step", (input_ids, positions, layout))


def logits_message(rows: int) -> tuple[str, Any]:
    import torch

    return ("logits", torch.arange(rows, dtype=torch.int64))


def _call(group: ParallelGroup, case: Case) -> Callable[[], object]:
    """One call of the case's collective on this rank."""
    import torch

    if case.op in ("all_reduce", ALL_GATHER_SUM):
        x = torch.zeros(case.tokens, HIDDEN)  # zeros: sums that stay normal numbers
        if case.op == ALL_GATHER_SUM:
            return lambda: _all_gather_sum(group, x)
        return lambda: group.all_reduce(x)
    if case.op == "gather_last_dim":
        y = torch.zeros(case.tokens, -(-VOCAB // group.size))
        return lambda: group.gather_last_dim(y)
    make = step_message if case.op == "broadcast_object step" else logits_message
    message = make(case.tokens) if group.is_leader else None
    return lambda: group.broadcast_object(message)


def _all_gather_sum(group: ParallelGroup, x: torch.Tensor) -> torch.Tensor:
    """ParallelGroup.all_reduce's CPU path for more than 2 ranks, at any size."""
    import torch

    parts = [torch.empty_like(x) for _ in range(group.size)]
    group.pg.allgather(parts, x, group.timeout).wait()
    total = parts[0]
    for part in parts[1:]:
        total += part
    return x.copy_(total)


def run_cases(group: ParallelGroup, cases: tuple[Case, ...], runs: int) -> list[list[float]]:
    """Every rank runs this in step; rank 0's microseconds per call, per case and run."""
    import torch

    marker = torch.zeros(1)
    results = []
    for case in cases:
        call = _call(group, case)
        for _ in range(max(1, case.iters // 10)):  # warm-up
            call()
        per_run = []
        for _ in range(runs):
            group.all_reduce(marker)  # everyone starts together...
            started = time.perf_counter()
            for _ in range(case.iters):
                call()
            group.all_reduce(marker)  # ...and the last rank has finished
            per_run.append((time.perf_counter() - started) / case.iters * 1e6)
        results.append(per_run)
    return results


def time_collectives(
    size: int, runs: int, quick: bool, pin: tuple[int, ...] = ()
) -> list[CollectiveResult]:
    """Part 1 for a group of `size` ranks: rank 0 here, followers as child processes; with
    `pin`, rank r runs on CPU pin[r % len(pin)] only (its threads included)."""
    import torch

    from tokenmill.distributed.group import create_group
    from tokenmill.distributed.process import free_port

    cases = collective_cases(size, quick)
    threads = max(1, (os.cpu_count() or 1) // size)
    port = free_port()

    def cpu(rank: int) -> int | None:
        return pin[rank % len(pin)] if pin else None

    followers = [
        _start_follower(CollectiveSpec(rank, size, port, cases, runs, threads, cpu(rank)))
        for rank in range(1, size)
    ]
    saved_threads = torch.get_num_threads()
    saved_cpus = os.sched_getaffinity(0) if pin else None
    group = None
    try:
        torch.set_num_threads(threads)
        if pin:
            os.sched_setaffinity(0, {pin[0]})
        group = create_group(0, size, "127.0.0.1", port, torch.device("cpu"), 120.0, 120.0)
        timings = run_cases(group, cases, runs)
        return [
            CollectiveResult(size, case.op, case.tokens, _payload(case, size), case.iters, us)
            for case, us in zip(cases, timings, strict=True)
        ]
    except BaseException:
        codes = [p.exitcode for p in followers if p.exitcode]
        if codes:
            progress(f"a follower rank failed (exit codes {codes}; its traceback is above)")
        raise
    finally:
        torch.set_num_threads(saved_threads)
        if saved_cpus is not None:
            os.sched_setaffinity(0, saved_cpus)
        if group is not None:
            group.close()
        _stop_followers(followers, 30.0)


def _payload(case: Case, size: int) -> int:
    if case.op in ("all_reduce", "gather_last_dim", ALL_GATHER_SUM):
        return _payload_estimate(case.op, case.tokens, size)
    make = step_message if case.op == "broadcast_object step" else logits_message
    return len(pickle.dumps(make(case.tokens), protocol=pickle.HIGHEST_PROTOCOL))


def _start_follower(spec: CollectiveSpec) -> BaseProcess:
    """A follower rank in a fresh interpreter (multiprocessing's spawn: no state of this
    process's is inherited); a daemon, so it ends with this process."""
    import multiprocessing

    process = multiprocessing.get_context("spawn").Process(
        target=follower_main, args=(spec,), name=f"bench-rank-{spec.rank}", daemon=True
    )
    process.start()
    return process


def follower_main(spec: CollectiveSpec) -> None:
    """A follower rank of part 1: join rank 0's group, run the cases, leave (a failure is
    raised: its traceback goes to stderr, and rank 0's next collective fails)."""
    import torch

    from tokenmill.distributed.group import create_group

    torch.set_num_threads(spec.threads)
    if spec.cpu is not None:
        os.sched_setaffinity(0, {spec.cpu})
    group = create_group(
        spec.rank, spec.size, "127.0.0.1", spec.port, torch.device("cpu"), 120.0, 120.0
    )
    try:
        run_cases(group, spec.cases, spec.runs)
    finally:
        group.close()


def _stop_followers(followers: list[BaseProcess], wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    for process in followers:
        process.join(max(0.1, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def format_collectives(results: list[CollectiveResult]) -> str:
    """One row per group size and op; a column per T: median us [min-max]."""
    tokens = sorted({r.tokens for r in results})
    columns = ("ranks", "collective", *(f"T={t}" for t in tokens))
    cells = []
    for size in sorted({r.ranks for r in results}):
        for op in (*OPS, ALL_GATHER_SUM):
            found = {r.tokens: r for r in results if r.ranks == size and r.op == op}
            if not found:
                continue
            cells.append(
                (
                    str(size),
                    _op_label(op, size),
                    *(_us(found[t]) if t in found else "-" for t in tokens),
                )
            )
    return _table(columns, cells)


def _op_label(op: str, size: int) -> str:
    if op == "all_reduce":
        return f"all_reduce [T, {HIDDEN}] f32"
    if op == ALL_GATHER_SUM:
        return f"(all_gather + sum [T, {HIDDEN}] f32)"
    if op == "gather_last_dim":
        return f"gather_last_dim [T, {-(-VOCAB // size)}] f32"
    return op


def _us(r: CollectiveResult) -> str:
    text = f"{r.median_us:.0f} [{min(r.us):.0f}-{max(r.us):.0f}]"
    if r.op.startswith("broadcast"):
        text += f" ({r.payload_bytes} B)"
    return text


# --------------------------------------------------------------------------------------
# Part 3: tensor parallel end to end
# --------------------------------------------------------------------------------------


def save_tp2_model(directory: Path) -> Path:
    """A random-weight Llama of SmolLM2-135M's depth and vocabulary whose heads split over
    2 ranks (hidden 512, 8 heads / 4 KV heads of 64, intermediate 1536, 30 layers, tied
    embedding: ~120M parameters, bfloat16 on disk), with the bundled tokenizer; saved by
    transformers, so the engine loads it as it would a hub download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tokenmill.model.loader import bundled_model_path

    gguf = Path(bundled_model_path())
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    model.to(torch.bfloat16)  # 240 MB on disk instead of 480; loaded in the engine's dtype
    model.generation_config.eos_token_id = 2
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@dataclass
class TPResult:
    """One model at one TP size; lists hold one value per run."""

    model: str
    tp: int
    fused: bool  # decode-only steps in one native call (TP=1 only; off: layer by layer)
    threads: str  # the engine's CPU threads per rank, as it reports them
    batch: int
    output_len: int
    output_tok_s: list[float] = field(default_factory=list)  # generate() wall time
    decode_tok_s: list[float] = field(default_factory=list)  # decode-only steps
    decode_step_ms: list[float] = field(default_factory=list)  # mean over a run's steps
    collective_ms: list[float] = field(default_factory=list)  # rank 0, per decode step
    collective_calls: float = 0.0  # per decode step
    predicted_ms: float | None = None  # part 1's per-call times x the step's collectives

    @property
    def collective_share(self) -> float:
        return statistics.median(self.collective_ms) / statistics.median(self.decode_step_ms)


@dataclass
class _StepLog:
    decode: bool
    rows: int
    seconds: float
    collective_seconds: float
    collective_calls: int


@contextlib.contextmanager
def timed_collectives() -> Iterator[list[float]]:
    """[seconds, calls] inside ParallelGroup's collectives in this process while the block
    runs (class attributes swapped for timed wrappers, restored after)."""
    from tokenmill.distributed.group import ParallelGroup

    totals = [0.0, 0.0]
    names = ("all_reduce", "gather_last_dim", "broadcast_object")
    originals = {name: getattr(ParallelGroup, name) for name in names}

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(self, *args, **kwargs)
            finally:
                totals[0] += time.perf_counter() - started
                totals[1] += 1

        return wrapper

    try:
        for name, fn in originals.items():
            setattr(ParallelGroup, name, timed(fn))
        yield totals
    finally:
        for name, fn in originals.items():
            setattr(ParallelGroup, name, fn)


@contextlib.contextmanager
def timed_steps(llm: LLM, totals: list[float]) -> Iterator[list[_StepLog]]:
    """Each executor step of `llm` while the block runs: decode-only or not, rows, seconds,
    and the collectives' share of `totals` (from timed_collectives) it took."""
    executor: Any = llm.engine.core.executor
    execute = executor.execute
    log: list[_StepLog] = []

    def wrapper(scheduled: Any) -> Any:
        seconds, calls = totals
        started = time.perf_counter()
        output = execute(scheduled)
        log.append(
            _StepLog(
                all(s.is_decode for s in scheduled),
                len(scheduled),
                time.perf_counter() - started,
                totals[0] - seconds,
                int(totals[1] - calls),
            )
        )
        return output

    executor.execute = wrapper
    try:
        yield log
    finally:
        del executor.execute


def measure_tp(
    label: str, path: str, tp: int, runs: int, batch: int, output_len: int, fused: bool = True
) -> TPResult:
    """Load `path` at TP=`tp`, warm up, then `runs` generates of `batch` prompts; with
    fused=False a TP=1 engine runs its decode steps layer by layer, as TP does."""
    import torch

    from tokenmill import kernels
    from tokenmill.bench.offline import synthetic_prompt
    from tokenmill.llm import LLM

    # a TP engine pins this process's threads to its share (tokenmill/executor/multiproc.py:
    # _per_rank) and they stay pinned after it shuts down: restored below for the next one
    saved_threads = torch.get_num_threads()
    started = time.perf_counter()
    llm = LLM(path, tensor_parallel_size=tp, kv_cache_memory=256 << 20, enable_prefix_caching=False)
    info = llm.engine.core.info
    if not fused:
        llm.engine.core.executor.worker.backend.fused_decode = False  # type: ignore[attr-defined]
    name = f"{label} TP={tp}{'' if fused else ' layer by layer'}"
    progress(
        f"{label} TP={tp}: loaded in {time.perf_counter() - started:.1f} s "
        f"({info.cpu_threads} per rank)"
    )
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    prompts = [synthetic_prompt(i, 24) for i in range(batch)]
    result = TPResult(label, tp, fused, info.cpu_threads, batch, output_len)
    try:
        llm.generate(
            prompts[:2],
            SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
            use_tqdm=False,
        )
        for run in range(runs):
            with timed_collectives() as totals, timed_steps(llm, totals) as steps:
                started = time.perf_counter()
                outputs = llm.generate(prompts, params, use_tqdm=False)
                seconds = time.perf_counter() - started
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            decodes = [s for s in steps if s.decode]
            decode_s = sum(s.seconds for s in decodes)
            result.output_tok_s.append(tokens / seconds)
            result.decode_tok_s.append(sum(s.rows for s in decodes) / decode_s)
            result.decode_step_ms.append(decode_s / len(decodes) * 1e3)
            result.collective_ms.append(
                sum(s.collective_seconds for s in decodes) / len(decodes) * 1e3
            )
            result.collective_calls = sum(s.collective_calls for s in decodes) / len(decodes)
            progress(
                f"{name}: run {run + 1}/{runs}: {tokens / seconds:.1f} output tok/s, "
                f"decode step {result.decode_step_ms[-1]:.1f} ms, of which "
                f"{result.collective_ms[-1]:.1f} ms in collectives on rank 0"
            )
    finally:
        llm.engine.core.shutdown()
        torch.set_num_threads(saved_threads)
        kernels.set_cpu_threads(None)
    return result


def bench_tp(runs: int, quick: bool, collectives: list[CollectiveResult]) -> list[TPResult]:
    import gc

    from tokenmill.model.loader import bundled_model_path

    batch, output_len = (8, 8) if quick else (8, 32)
    results = []
    bundled = bundled_model_path()
    for tp, fused in ((1, True), (1, False), (3, True)):
        results.append(measure_tp("SmolLM2-135M Q4_1", bundled, tp, runs, batch, output_len, fused))
        gc.collect()
    with tempfile.TemporaryDirectory(prefix="tokenmill-tp2-") as tmp:
        started = time.perf_counter()
        directory = save_tp2_model(Path(tmp))
        progress(f"saved the 8-head model in {time.perf_counter() - started:.1f} s")
        for tp, fused in ((1, True), (1, False), (2, True)):
            results.append(
                measure_tp(
                    "Llama 8/4 heads, hidden 512",
                    str(directory),
                    tp,
                    runs,
                    batch,
                    output_len,
                    fused,
                )
            )
            gc.collect()
    for r in results:
        r.predicted_ms = predicted_step_ms(r, collectives)
    return results


def predicted_step_ms(result: TPResult, collectives: list[CollectiveResult]) -> float | None:
    """A decode step's collectives at part 1's median per-call times (T = the batch; the
    all-reduces measured at hidden 576 stand for 512 too: both are latency-bound)."""
    if result.tp == 1:
        return 0.0
    found = {
        r.op: r.median_us for r in collectives if r.ranks == result.tp and r.tokens == result.batch
    }
    if not set(OPS) <= set(found):
        return None
    reduces = 2 * LAYERS + 1
    us = (
        reduces * found["all_reduce"]
        + found["gather_last_dim"]
        + found["broadcast_object step"]
        + found["broadcast_object logits"]
    )
    return us / 1e3


def format_tp(results: list[TPResult]) -> str:
    columns = (
        "model",
        "TP",
        "threads per rank",
        "output tok/s",
        "decode tok/s",
        "decode step ms",
        "rank 0 in collectives, ms/step (calls)",
        "share of the step",
        "part 1 predicts, ms/step",
        "decode vs TP=1",
    )
    cells = []
    base: dict[str, float] = {}
    for r in results:
        decode = statistics.median(r.decode_tok_s)
        if r.tp == 1 and r.fused:
            base[r.model] = decode
        cells.append(
            (
                r.model,
                str(r.tp) + ("" if r.fused else " (layer by layer)"),
                r.threads,
                _med(r.output_tok_s),
                _med(r.decode_tok_s),
                _med(r.decode_step_ms, 2),
                f"{_med(r.collective_ms, 2)} ({r.collective_calls:.0f})",
                f"{r.collective_share:.0%}",
                "-" if r.predicted_ms is None else f"{r.predicted_ms:.2f}",
                f"{decode / base[r.model]:.2f}x" if r.model in base else "-",
            )
        )
    return _table(columns, cells)


# --------------------------------------------------------------------------------------
# Part 4: data parallel through the server
# --------------------------------------------------------------------------------------


@dataclass
class DPResult:
    size: int
    streams: int
    output_len: int
    output_tok_s: list[float] = field(default_factory=list)
    ttft_ms_p50: list[float] = field(default_factory=list)
    tpot_ms_p50: list[float] = field(default_factory=list)
    errors: int = 0


def measure_dp(size: int, runs: int, streams: int, output_len: int) -> DPResult:
    """Start `tokenmill serve --data-parallel-size size`, drive it, stop it (SIGINT)."""
    import httpx

    from tokenmill.bench import serve
    from tokenmill.distributed.process import free_port

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tokenmill.server.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--kv-cache-memory",
        "256MiB",
        "--data-parallel-size",
        str(size),
        "--disable-log-requests",
    ]
    result = DPResult(size, streams, output_len)
    with tempfile.NamedTemporaryFile(prefix=f"tokenmill-dp{size}-", suffix=".log") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = Path(log.name).read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"DP={size} server did not start:\n{tail}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                time.sleep(0.25)
            progress(f"DP={size}: server up in {time.perf_counter() - started:.1f} s")
            workload = serve.Workload(
                endpoint="completions", prompt_tokens=32, output_tokens=output_len
            )
            reports = asyncio.run(
                serve.bench_target(
                    serve.Target(f"{url}/v1"),
                    workload,
                    [(streams, streams)] * runs,
                    warmup=streams,
                    progress=lambda line: progress(f"DP={size}: {line}"),
                )
            )
        finally:
            _stop_server(process)
    for report in reports:
        result.errors += report.num_errors
        result.output_tok_s.append(report.output_throughput)
        if report.ttft_ms_p50 is not None and report.tpot_ms_p50 is not None:
            result.ttft_ms_p50.append(report.ttft_ms_p50)
            result.tpot_ms_p50.append(report.tpot_ms_p50)
    return result


def _stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def bench_dp(runs: int, quick: bool) -> list[DPResult]:
    streams, output_len = (8, 8) if quick else (8, 64)
    return [measure_dp(size, runs, streams, output_len) for size in (1, 2)]


def format_dp(results: list[DPResult]) -> str:
    columns = (
        "engines (DP)",
        "streams",
        "output tokens",
        "output tok/s",
        "TTFT p50 ms",
        "time per output token p50 ms",
        "errors",
        "tok/s vs DP=1",
    )
    base = next((statistics.median(r.output_tok_s) for r in results if r.size == 1), None)
    cells = [
        (
            str(r.size),
            str(r.streams),
            str(r.output_len),
            _med(r.output_tok_s),
            _med(r.ttft_ms_p50),
            _med(r.tpot_ms_p50, 2),
            str(r.errors),
            f"{statistics.median(r.output_tok_s) / base:.2f}x" if base else "-",
        )
        for r in results
    ]
    return _table(columns, cells)


# --------------------------------------------------------------------------------------
# Report and command line
# --------------------------------------------------------------------------------------


def progress(line: str) -> None:
    print(f"bench parallel: {line}", file=sys.stderr, flush=True)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _med(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.{digits}f}"


def _table(columns: tuple[str, ...], cells: Sequence[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class CpuUse:
    """Cores' worth of CPU time over a part: this benchmark's (with its reaped child
    processes: followers, servers and their engines) and every other process's (the
    machine's busy time from /proc/stat less ours: a neighbour, or --background-load)."""

    seconds: float
    ours: float
    others: float

    def line(self) -> str:
        return (
            f"CPU over this part ({self.seconds:.0f} s): this benchmark {self.ours:.2f} cores, "
            f"other processes {self.others:.2f} cores, of {os.cpu_count()}"
        )


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall seconds, machine busy CPU seconds, our CPU seconds), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    ticks = os.sysconf("SC_CLK_TCK")
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    return time.perf_counter(), (user + nice + system + irq + softirq) / ticks, ours


@contextlib.contextmanager
def cpu_use(report: dict[str, Any], part: str, sections: list[str]) -> Iterator[None]:
    """Measure the CPU use over the block; into the report and under the part's table."""
    before = _cpu_snapshot()
    yield
    after = _cpu_snapshot()
    if before is None or after is None or after[0] <= before[0]:
        return
    wall = after[0] - before[0]
    ours = (after[2] - before[2]) / wall
    use = CpuUse(wall, ours, max(0.0, (after[1] - before[1]) / wall - ours))
    report.setdefault("cpu", {})[part] = asdict(use)
    sections.append(use.line())
    progress(use.line())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tokenmill.bench.parallel",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None else (2 if args.quick else 5)
    if runs < 1:
        parser.error("--runs must be at least 1")
    parts = args.only or list(PARTS)
    from tokenmill.bench.serve import busy_processes

    args.pin_ranks = tuple(args.pin_ranks or ())
    report: dict[str, Any] = {
        "runs": runs,
        "pin_ranks": args.pin_ranks,
        "quick": args.quick,
        "background_load": args.background_load,
        "cpu_count": os.cpu_count(),
    }
    sections: list[str] = []
    started = time.perf_counter()
    with busy_processes(args.background_load):
        progress(f"load average at the start: {_load()}")
        collectives: list[CollectiveResult] = []
        if "collectives" in parts:
            sections.append("### Collectives on this machine, us per call, median [min-max]")
            with cpu_use(report, "collectives", sections):
                for size in args.ranks:
                    where = f", pinned to CPUs {args.pin_ranks}" if args.pin_ranks else ""
                    progress(f"collectives: {size} ranks, {runs} runs{where}")
                    collectives += time_collectives(size, runs, args.quick, args.pin_ranks)
                sections.append(format_collectives(collectives))
            report["collectives"] = [asdict(r) | {"median_us": r.median_us} for r in collectives]
        if "paper" in parts:
            rows = paper_rows()
            report["paper"] = [asdict(r) | {"comm_share": r.comm_share} for r in rows]
            sections += [
                "### On paper: a decode step's communication on NVLink",
                format_paper(rows),
            ]
        if "tp" in parts:
            sections.append("### Tensor parallel, offline decode")
            with cpu_use(report, "tp", sections):
                tp = bench_tp(runs, args.quick, collectives)
                sections.append(format_tp(tp))
            report["tp"] = [asdict(r) for r in tp]
        if "dp" in parts:
            sections.append("### Data parallel through the server")
            with cpu_use(report, "dp", sections):
                dp = bench_dp(runs, args.quick)
                sections.append(format_dp(dp))
            report["dp"] = [asdict(r) for r in dp]
        progress(f"load average at the end: {_load()}")
    progress(f"done in {time.perf_counter() - started:.0f} s")
    print("\n\n".join(sections))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help="timed runs of each measurement (default 5; 2 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 calls per collective run, 8 output tokens end to end",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        default=None,
        metavar="PART",
        help=f"run only these parts: {', '.join(PARTS)} (default: all)",
    )
    parser.add_argument(
        "--ranks",
        nargs="+",
        type=int,
        default=[2, 3],
        metavar="N",
        help="group sizes of the collectives part (default: 2 3)",
    )
    parser.add_argument(
        "--background-load",
        type=int,
        default=0,
        metavar="N",
        help="busy loops beside the whole run, each in its own session",
    )
    parser.add_argument(
        "--pin-ranks",
        nargs="+",
        type=int,
        default=None,
        metavar="CPU",
        help="collectives part: run rank r on CPU number PIN[r %% len(PIN)] only, e.g. "
        "`--pin-ranks 0` puts every rank on CPU 0 (default: where the kernel schedules them)",
    )
    parser.add_argument("--json", default=None, metavar="FILE", help="write the numbers here")


if __name__ == "__main__":  # run as the module itself, so what a follower gets pickles by name
    from tokenmill.bench.parallel import main as module_main

    sys.exit(module_main())
