"""AsyncEngine: the asyncio front of the engine; the step loop runs in its own thread.

The event loop never runs the model: requests and aborts are posted to the
engine thread through a queue, and each step's outputs come back to per-request
asyncio queues with `call_soon_threadsafe`. Outputs are cumulative snapshots,
so a slow reader skips to the newest one instead of stalling the engine. The
event loop never reads the scheduler either: the engine thread publishes a
frozen snapshot of it after each step, admission and abort.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any

from tokenmill import kernels
from tokenmill.config import EngineConfig, SchedulingPolicy
from tokenmill.engine.client import CacheInfo, EngineStats
from tokenmill.engine.llm_engine import AnyOutput, LLMEngine
from tokenmill.engine.outputs import PoolingRequestOutput, RequestOutput, take_newest
from tokenmill.engine.step_stats import StepTokens
from tokenmill.errors import (
    InvalidRequestError,
    OverloadedError,
    RequestFailedError,
    ServiceUnavailableError,
)
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.spec_decode.speculator import SpecDecodeCounts
from tokenmill.structured.interface import CompiledGrammar
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.structured.spec import StructuredSpec
from tokenmill.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # how long the idle engine thread sleeps between checks for shutdown


def _load_off_thread(config: EngineConfig) -> LLMEngine:
    """Build the engine on a thread that exits before the step loop starts.

    PyTorch's CPU threads on Linux are libgomp's, and libgomp keeps a team of worker threads
    for every thread that ever ran a parallel region. Once the process holds more of them
    than it has CPUs, idle workers stop spinning sooner and a parallel region may pay a futex
    wake-up. Loading on the caller's thread (the server's main thread) would leave its team
    behind for the life of the process; a thread that exits takes its team with it.
    """
    result: list[LLMEngine | BaseException] = []

    def load() -> None:
        try:
            result.append(LLMEngine(config))
        except BaseException as e:  # re-raised on the caller's thread
            result.append(e)

    loader = threading.Thread(target=load, name="tokenmill-load", daemon=True)
    loader.start()
    loader.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@dataclass(frozen=True, slots=True)
class _SchedulerState:
    """What the engine thread publishes after each step, admission and abort. The event loop
    reads only the last one published (one attribute read: atomic), never the scheduler."""

    num_running: int
    num_waiting: int  # in the scheduler's waiting queue
    kv_cache_usage: float  # share of KV blocks in use, 0..1
    num_preemptions: int  # total since start
    spec_decode: SpecDecodeCounts | None  # speculative decoding's totals, when on
    step_tokens: StepTokens

    @classmethod
    def of(cls, engine: LLMEngine) -> _SchedulerState:
        """Read on the engine thread (or before it starts)."""
        scheduler = engine.core.scheduler
        return cls(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            kv_cache_usage=engine.core.kv_cache.pool.usage,
            num_preemptions=scheduler.num_preemptions,
            spec_decode=None if scheduler.speculator is None else scheduler.speculator.counts,
            step_tokens=scheduler.step_tokens.snapshot(),
        )


def _deliver(deliveries: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    """On the event loop: each output into its request's queue."""
    for target, item in deliveries:
        target.put_nowait(item)


class EngineDeadError(ServiceUnavailableError):
    """The engine loop died; the process should be restarted."""


class AsyncEngine:
    """Async generate()/abort() over an LLMEngine stepped by a background thread (an
    EngineClient).

    At most `max_waiting_requests` requests wait for a place in the running batch
    (None: no bound); beyond that generate() raises OverloadedError (HTTP 503).
    If the step loop dies, every in-flight request gets EngineDeadError and
    `on_death` is called on the event loop (the server then exits non-zero).
    """

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.on_death: Callable[[], None] | None = None
        self._num_submitting = 0  # in generate(), not yet handed to the scheduler
        self.tokenizer: Tokenizer = engine.tokenizer
        self.model_name = engine.core.source.name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.core.vocab_size
        self.sampling_defaults: dict[str, Any] = dict(engine.sampling_defaults)
        self.reasoning_markers = engine.reasoning
        self.image_processor = engine.image_processor
        self.structured_outputs: StructuredOutputManager = engine.structured_outputs
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue[AnyOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._num_aborted = 0
        self._state = _SchedulerState.of(engine)  # replaced, never mutated, by the engine thread
        self._cut: ServiceUnavailableError | None = None  # set by cut_off(): no more requests

    @classmethod
    def from_config(
        cls, config: EngineConfig, max_waiting_requests: int | None = None
    ) -> AsyncEngine:
        return cls(_load_off_thread(config), max_waiting_requests)

    async def start(self) -> None:
        """Start the step loop (call from the running event loop)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="tokenmill-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        if self._thread is None or not self._thread.is_alive():
            self.engine.shutdown()  # (a step still running keeps its workers)
        self.structured_outputs.close()

    def cut_off(self, error: ServiceUnavailableError) -> int:
        """End every request in flight with `error`, and refuse new ones with it (call on the
        event loop). Their streams raise it, which aborts them on the engine thread (their KV
        blocks are freed). Returns how many requests were cut."""
        self._cut = error
        for target in self._queues.values():
            target.put_nowait(error)
        return len(self._queues) + self._num_submitting

    @property
    def scheduling_policy(self) -> SchedulingPolicy:
        return self.engine.config.scheduler.scheduling_policy

    @property
    def died(self) -> bool:
        """True once the step loop has died of an exception (not after a clean shutdown)."""
        return self._error is not None

    @property
    def is_alive(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: being admitted, or in the scheduler's waiting queue."""
        return self._num_submitting + self._state.num_waiting

    def stats(self) -> EngineStats:
        """The engine as of its last step, admission or abort (the kernels' thread pool: now;
        its counters are the pool's own, safe to read from any thread)."""
        state = self._state
        return EngineStats(
            num_running=state.num_running,
            num_waiting=self._num_submitting + state.num_waiting,
            kv_cache_usage=state.kv_cache_usage,
            num_preemptions=state.num_preemptions,
            num_aborted=self._num_aborted,
            cpu_threads=kernels.cpu_threads_in_use(),
            spec_decode=state.spec_decode,
            step_tokens=state.step_tokens,
        )

    def stats_per_engine(self) -> list[EngineStats]:
        return [self.stats()]

    def cache_info(self) -> list[CacheInfo]:
        return [CacheInfo.of(self.engine.core)]

    async def compile_grammar(self, spec: StructuredSpec) -> CompiledGrammar:
        return await self.structured_outputs.compile_async(spec)

    def _check_new(self, request_id: str) -> None:
        """A request id already running is refused before its stream is touched: the
        running request keeps its outputs (ids come from clients: X-Request-Id)."""
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already running")

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        cache_salt: str | None = None,
        grammar: CompiledGrammar | None = None,
        priority: int = 0,
        images: tuple[ImageInput, ...] = (),
    ) -> AsyncGenerator[RequestOutput]:
        """Yield a RequestOutput (as params.output_kind asks) after every step that changed
        the request; a slow reader gets what queued as one (take_newest).

        The last one has finished=True. Closing the iterator early (client gone)
        aborts the request and frees its KV blocks. A constrained request's grammar is
        compiled (or given, already compiled) before it reaches the engine thread.
        """
        self._check_open()
        self._check_new(request_id)
        outputs: asyncio.Queue[AnyOutput | BaseException] = asyncio.Queue()
        finished = False
        self._num_submitting += 1
        try:
            try:
                if grammar is None and params.structured_outputs is not None:
                    grammar = await self.structured_outputs.compile_async(params.structured_outputs)
                if self._cut is not None:  # cut off while its grammar compiled
                    raise self._cut
                self._queues[request_id] = outputs
                immediate = await self._call(
                    lambda: self.engine.add_request(
                        request_id,
                        prompt_token_ids,
                        params,
                        cache_salt,
                        grammar,
                        priority,
                        images,
                    )
                )
            finally:
                self._num_submitting -= 1
            if immediate is not None:
                finished = True
                yield immediate
                return
            delta = params.output_kind is RequestOutputKind.DELTA
            while not finished:
                output = await self._next(outputs, delta)
                finished = output.finished
                yield output
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._num_aborted += 1
                self._commands.put(lambda: self.engine.abort(request_id))

    async def encode(
        self,
        prompt_token_ids: list[int],
        params: PoolingParams,
        request_id: str,
        cache_salt: str | None = None,
    ) -> PoolingRequestOutput:
        """An embedding request's one output (batched with generation on the engine thread).
        Cancelling the call aborts the request."""
        self._check_open()
        self._check_new(request_id)
        outputs: asyncio.Queue[AnyOutput | BaseException] = asyncio.Queue()
        finished = False
        self._num_submitting += 1
        try:
            try:
                self._queues[request_id] = outputs
                await self._call(
                    lambda: self.engine.add_pooling_request(
                        request_id, prompt_token_ids, params, cache_salt
                    )
                )
            finally:
                self._num_submitting -= 1
            output = await self._next(outputs)
            finished = True
            assert isinstance(output, PoolingRequestOutput)
            return output
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._num_aborted += 1
                self._commands.put(lambda: self.engine.abort(request_id))

    def _check_open(self) -> None:
        """The engine runs, takes requests, and has room for one more to wait."""
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        if self._cut is not None:
            raise self._cut
        self.check_capacity()

    def check_capacity(self) -> None:
        """OverloadedError (503) when max_waiting_requests requests already wait; the server
        asks before it answers (a stream's 200 cannot turn into a 503 later)."""
        limit = self.max_waiting_requests
        if limit is not None and self.num_waiting >= limit:
            raise OverloadedError(
                f"the server is overloaded: {self.num_waiting} requests are waiting "
                f"(max_waiting_requests {limit}); retry later"
            )

    async def abort(self, request_id: str) -> None:
        self._commands.put(lambda: self.engine.abort(request_id))

    @staticmethod
    async def _next(outputs: asyncio.Queue[AnyOutput | BaseException], delta: bool = False) -> Any:
        item = take_newest(await outputs.get(), outputs, delta)
        if isinstance(item, BaseException):
            raise item
        return item

    async def _call(self, fn: Callable[[], RequestOutput | None]) -> RequestOutput | None:
        """Run fn on the engine thread (between steps) and await its result."""
        future: concurrent.futures.Future[RequestOutput | None] = concurrent.futures.Future()

        def command() -> None:
            try:
                result = fn()
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting caller
                future.set_exception(e)
                return
            # published before the caller resumes: an admitted request is counted as waiting
            # before it stops being counted as submitting
            self._publish()
            future.set_result(result)

        self._commands.put(command)
        return await asyncio.wrap_future(future)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._run_commands(block=not self.engine.has_unfinished)
                self.engine.core.check_health()  # a worker process gone: stop
                if self.engine.has_unfinished:
                    outputs = self.engine.step()
                    self._publish()
                    self._dispatch(outputs)
            self._run_commands(block=False)  # the last aborts (requests cut off at shutdown)
            state = _SchedulerState.of(self.engine)
            logger.info(
                "engine stopped: %d requests unfinished, KV cache %.0f%% in use",
                state.num_running + state.num_waiting, 100 * state.kv_cache_usage,
            )  # fmt: skip
        except BaseException as e:
            logger.exception("engine loop died")
            self._error = e
            self._fail_all(EngineDeadError("the engine loop died; the server is shutting down"))
            if self._loop is not None and self.on_death is not None:
                self._loop.call_soon_threadsafe(self.on_death)

    def _run_commands(self, block: bool) -> None:
        try:
            command = (
                self._commands.get(timeout=_IDLE_WAIT_S) if block else self._commands.get_nowait()
            )
        except queue.Empty:
            return
        command()
        while True:
            try:
                self._commands.get_nowait()()
            except queue.Empty:
                break
        self._publish()

    def _publish(self) -> None:
        """Runs on the engine thread: the scheduler's state for the event loop to read."""
        self._state = _SchedulerState.of(self.engine)

    def _dispatch(self, outputs: list[AnyOutput]) -> None:
        """Hand a step's outputs to their requests' queues in one callback on the event loop
        (each call_soon_threadsafe wakes the loop with a write to its self-pipe: one per
        request per step cost a system call each and woke the loop again and again)."""
        assert self._loop is not None
        deliveries: list[tuple[asyncio.Queue[AnyOutput | BaseException], Any]] = []
        for output in outputs:
            target = self._queues.get(output.request_id)
            if target is None:
                continue
            item: AnyOutput | BaseException = output
            if output.error is not None:
                # the details (an exception's text) stay in the server's log, not the client's
                item = RequestFailedError(
                    "the engine failed while serving this request; the server log has the details"
                )
            deliveries.append((target, item))
        if deliveries:
            self._loop.call_soon_threadsafe(_deliver, deliveries)

    def _fail_all(self, error: BaseException) -> None:
        if self._loop is None:
            return
        for target in list(self._queues.values()):
            self._loop.call_soon_threadsafe(target.put_nowait, error)
