"""DataParallelEngine: one server in front of N engine processes, each with the whole model
(engine/engine_process.py), as vLLM's --data-parallel-size. An EngineClient like
AsyncEngine, so the server does not know the difference.

This process keeps the request side (tokenizer, chat templates, validation, grammar
compilation for early 400s; engine/llm_engine.py's Frontend) and routes each request
(engine/router.py: least loaded, else where its prompt's prefix is cached). A reader thread
per engine hands its step outputs to per-request asyncio queues. An engine that dies fails
its requests and stops the server (on_death), as the one engine's death does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import subprocess
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, Listener
from subprocess import Popen
from typing import Any

import torch

from tokenmill.backends.device import (
    cgroup_cpu_quota,
    check_kv_cache_fits,
    kv_cache_bytes,
    resolve_device,
)
from tokenmill.config import EngineConfig, SchedulingPolicy
from tokenmill.distributed.process import failure_line, start_child, stop_children
from tokenmill.engine.async_engine import EngineDeadError
from tokenmill.engine.client import CacheInfo, EngineStats
from tokenmill.engine.engine_process import (
    EngineProcessSpec,
    EngineReady,
    EngineState,
    receive,
    send,
)
from tokenmill.engine.llm_engine import AnyOutput, Frontend
from tokenmill.engine.outputs import PoolingRequestOutput, RequestOutput, take_newest
from tokenmill.engine.router import PrefixAffinityRouter
from tokenmill.engine.step_stats import StepTokenCounter
from tokenmill.errors import (
    ModelLoadError,
    OverloadedError,
    RequestFailedError,
    ServiceUnavailableError,
)
from tokenmill.model.config import text_config
from tokenmill.model.loader import load_model_source
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.structured.interface import CompiledGrammar
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.structured.spec import StructuredSpec

logger = logging.getLogger(__name__)

_LOAD_TIMEOUT_S = 900.0
_STOP_WAIT_S = 15.0


@dataclass(slots=True)
class _Engine:
    """One engine process as this side sees it."""

    index: int
    process: Popen[bytes]
    conn: Connection | None = None
    ready: EngineReady | None = None
    state: EngineState = EngineState(0, 0, 0.0, 0, None, None, StepTokenCounter().snapshot())
    in_flight: int = 0  # requests routed here and not finished
    routed: int = 0  # total
    lock: threading.Lock = field(default_factory=threading.Lock)  # serializes sends

    def send(self, message: tuple[Any, ...]) -> None:
        assert self.conn is not None
        with self.lock:
            send(self.conn, message)


class DataParallelEngine:
    def __init__(self, config: EngineConfig, size: int, max_waiting_requests: int | None = None):
        self.config = config
        self.max_waiting_requests = max_waiting_requests
        self.on_death: Callable[[], None] | None = None
        self.source = load_model_source(config.model.model)  # config and tokenizer: no weights
        vocab_size = int(text_config(self.source.hf_config)["vocab_size"])
        engine_config = _per_engine(config, size)
        authkey = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=authkey)
        self.engines = [
            _Engine(
                i,
                start_child(
                    "tokenmill.engine.engine_process",
                    EngineProcessSpec(i, engine_config, listener.address, authkey),
                    _engine_gpus(config, i),
                ),
            )
            for i in range(size)
        ]
        try:
            self._connect(listener)
        except BaseException:
            self._kill()
            raise
        finally:
            listener.close()
        ready = [e.ready for e in self.engines if e.ready is not None]
        self.max_model_len = min(r.max_model_len for r in ready)
        self.frontend = Frontend.of(config, self.source, vocab_size, self.max_model_len)
        self.structured_outputs = StructuredOutputManager(
            self.source.tokenizer, vocab_size,
            config.structured_outputs.guided_decoding_backend,
        )  # fmt: skip
        slack = max(2, config.scheduler.max_num_seqs // 8)
        self.router = PrefixAffinityRouter(
            size, ready[0].cache.block_size, min(r.cache.num_blocks for r in ready), slack
        )
        self.vocab_size = vocab_size
        self.model_name = self.source.name
        self._queues: dict[str, asyncio.Queue[AnyOutput | BaseException]] = {}
        self._owner: dict[str, _Engine] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: str | None = None
        self._stopping = False
        self._started = False
        self._cut: ServiceUnavailableError | None = None
        self._num_aborted = 0
        logger.info(
            "data parallel: %d engines (pids %s), max_model_len %d",
            size, ", ".join(str(r.pid) for r in ready), self.max_model_len,
        )  # fmt: skip

    # the request side, as an EngineClient
    @property
    def tokenizer(self) -> Any:
        return self.frontend.tokenizer

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        return self.frontend.sampling_defaults

    @property
    def reasoning_markers(self) -> Any:
        return self.frontend.reasoning

    @property
    def image_processor(self) -> Any:
        return self.frontend.image_processor

    @property
    def scheduling_policy(self) -> SchedulingPolicy:
        return self.config.scheduler.scheduling_policy

    @property
    def died(self) -> bool:
        return self._error is not None

    @property
    def is_alive(self) -> bool:
        return self._started and self._error is None and not self._stopping

    def _connect(self, listener: Listener) -> None:
        """Accept each engine's connection and wait for it to load (or fail)."""
        deadline = time.monotonic() + _LOAD_TIMEOUT_S
        pending = len(self.engines)
        accepted: list[Connection] = []
        accept_error: list[BaseException] = []

        def accept() -> None:
            try:
                for _ in range(pending):
                    accepted.append(listener.accept())
            except OSError as e:
                accept_error.append(e)

        acceptor = threading.Thread(target=accept, name="tokenmill-dp-accept", daemon=True)
        acceptor.start()
        while len(accepted) < pending:
            self._check_load_failures()
            if time.monotonic() > deadline or accept_error:
                raise ModelLoadError("data-parallel engines did not connect")
            time.sleep(0.05)
        for conn in accepted:
            kind, index = receive(conn)
            self.engines[index].conn = conn
        for engine in self.engines:
            assert engine.conn is not None
            while not engine.conn.poll(0.2):
                self._check_load_failures()
                if time.monotonic() > deadline:
                    raise ModelLoadError(f"data-parallel engine {engine.index} did not load")
            try:
                message = receive(engine.conn)
            except EOFError:
                self._check_load_failures(wait=True)
                raise ModelLoadError(f"data-parallel engine {engine.index} exited") from None
            if message[0] == "failed":
                raise ModelLoadError(f"data-parallel engine {engine.index}: {message[1]}")
            engine.ready = message[1]

    def _check_load_failures(self, wait: bool = False) -> None:
        for _ in range(50 if wait else 1):
            for engine in self.engines:
                code = engine.process.poll()
                if code is not None:
                    reason = failure_line(engine.process) or f"exited with code {code}"
                    raise ModelLoadError(f"data-parallel engine {engine.index}: {reason}")
            if wait:
                time.sleep(0.1)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = True
        for engine in self.engines:
            threading.Thread(
                target=self._read, args=(engine,), name=f"tokenmill-dp-{engine.index}",
                daemon=True,
            ).start()  # fmt: skip

    async def shutdown(self) -> None:
        self._stopping = True
        for engine in self.engines:
            with contextlib.suppress(OSError, ValueError, AssertionError):
                engine.send(("stop",))
        await asyncio.to_thread(stop_children, [e.process for e in self.engines], _STOP_WAIT_S)
        self.structured_outputs.close()

    def _kill(self) -> None:
        for engine in self.engines:
            if engine.process.poll() is None:
                engine.process.kill()
        stop_children([e.process for e in self.engines], 1.0)

    def stats(self) -> EngineStats:
        """Summed over the engines."""
        per = self.stats_per_engine()
        return EngineStats(
            num_running=sum(s.num_running for s in per),
            num_waiting=sum(s.num_waiting for s in per),
            kv_cache_usage=sum(s.kv_cache_usage for s in per) / len(per),
            num_preemptions=sum(s.num_preemptions for s in per),
            num_aborted=self._num_aborted,
        )

    def stats_per_engine(self) -> list[EngineStats]:
        """Each engine as of its last step; a request routed but not yet scheduled there
        counts as waiting."""
        stats = []
        for e in self.engines:
            s = e.state
            unseen = max(0, e.in_flight - s.num_running - s.num_waiting)
            stats.append(EngineStats(s.num_running, s.num_waiting + unseen, s.kv_cache_usage,
                                     s.num_preemptions, 0, s.cpu_threads, e.routed,
                                     s.spec_decode, s.step_tokens))  # fmt: skip
        return stats

    def cache_info(self) -> list[CacheInfo]:
        return [e.ready.cache for e in self.engines if e.ready is not None]

    def check_capacity(self) -> None:
        limit = self.max_waiting_requests
        waiting = self.stats().num_waiting
        if limit is not None and waiting >= limit:
            raise OverloadedError(
                f"the server is overloaded: {waiting} requests are waiting "
                f"(max_waiting_requests {limit}); retry later"
            )

    async def compile_grammar(self, spec: StructuredSpec) -> CompiledGrammar:
        return await self.structured_outputs.compile_async(spec)

    def cut_off(self, error: ServiceUnavailableError) -> int:
        self._cut = error
        for target in self._queues.values():
            target.put_nowait(error)
        for request_id, engine in self._owner.items():  # their engines stop them too
            self._send_abort(engine, request_id)
        return len(self._queues)

    async def abort(self, request_id: str) -> None:
        engine = self._owner.get(request_id)
        if engine is not None:
            self._send_abort(engine, request_id)

    def _check_open(self) -> None:
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        if self._cut is not None:
            raise self._cut
        self.check_capacity()

    def _route(self, prompt_token_ids: list[int], cache_salt: str | None) -> _Engine:
        loads = [e.in_flight for e in self.engines]
        routed = [e.routed for e in self.engines]
        hashes = self.router.block_hashes(prompt_token_ids, cache_salt)
        engine = self.engines[self.router.route(hashes, len(prompt_token_ids), loads, routed)]
        engine.in_flight += 1
        engine.routed += 1
        return engine

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
        """As AsyncEngine.generate; the request runs on the engine the router picks (which
        compiles its constraint again from the params, once per engine: it is cached)."""
        self._check_open()
        if grammar is None and params.structured_outputs is not None:
            await self.structured_outputs.compile_async(params.structured_outputs)  # a 400
        message = ("generate", request_id, prompt_token_ids, params, cache_salt, priority,
                   images)  # fmt: skip
        delta = params.output_kind is RequestOutputKind.DELTA
        run = self._run(request_id, prompt_token_ids, cache_salt, message, delta)
        async with contextlib.aclosing(run):  # closed with this one: an early stop aborts
            async for output in run:
                assert isinstance(output, RequestOutput)
                yield output

    async def encode(
        self,
        prompt_token_ids: list[int],
        params: PoolingParams,
        request_id: str,
        cache_salt: str | None = None,
    ) -> PoolingRequestOutput:
        self._check_open()
        message = ("encode", request_id, prompt_token_ids, params, cache_salt)
        run = self._run(request_id, prompt_token_ids, cache_salt, message)
        async with contextlib.aclosing(run):  # a cancelled call aborts the request
            async for output in run:
                assert isinstance(output, PoolingRequestOutput)
                return output
        raise EngineDeadError("the engine ended the request without an output")

    async def _run(
        self,
        request_id: str,
        prompt: list[int],
        salt: str | None,
        message: tuple[Any, ...],
        delta: bool = False,  # the request's outputs are DELTA: queued ones fold into one
    ) -> AsyncGenerator[AnyOutput]:
        outputs: asyncio.Queue[AnyOutput | BaseException] = asyncio.Queue()
        engine = self._route(prompt, salt)
        self._queues[request_id] = outputs
        self._owner[request_id] = engine
        finished = False
        try:
            engine.send(message)
            while not finished:
                item = take_newest(await outputs.get(), outputs, delta)
                if isinstance(item, BaseException):
                    finished = True  # nothing more will come for it
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            self._owner.pop(request_id, None)
            engine.in_flight -= 1
            if not finished:
                self._num_aborted += 1
                self._send_abort(engine, request_id)

    def _send_abort(self, engine: _Engine, request_id: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a dead engine has nothing to abort
            engine.send(("abort", request_id))

    def _read(self, engine: _Engine) -> None:
        """Engine `engine`'s messages, on its own thread, handed to the event loop."""
        assert self._loop is not None and engine.conn is not None
        loop = self._loop
        try:
            while True:
                message = receive(engine.conn)
                kind = message[0]
                if kind == "outputs":
                    engine.state = message[2]
                    if message[1]:
                        loop.call_soon_threadsafe(self._dispatch, message[1])
                elif kind == "rejected":
                    loop.call_soon_threadsafe(self._deliver, message[1], message[2])
                elif kind == "failed":
                    raise RuntimeError(message[1])
        except Exception as e:  # noqa: BLE001 - the connection is unusable: the engine is lost
            if self._stopping:
                return
            try:
                code = engine.process.wait(timeout=5)
            except subprocess.TimeoutExpired:  # alive but unusable: it cannot be served
                engine.process.kill()
                code = engine.process.wait()
            reason = failure_line(engine.process) or str(e) or "connection closed"
            self._error = f"data-parallel engine {engine.index} (exit code {code}): {reason}"
            logger.error("%s; the server stops", self._error)
            loop.call_soon_threadsafe(self._fail_all)

    def _dispatch(self, outputs: list[AnyOutput]) -> None:
        for output in outputs:
            item: AnyOutput | BaseException = output
            if output.error is not None:  # as AsyncEngine: the details stay in the log
                item = RequestFailedError(
                    "the engine failed while serving this request; the server log has the details"
                )
            self._deliver(output.request_id, item)

    def _deliver(self, request_id: str, item: AnyOutput | BaseException) -> None:
        target = self._queues.get(request_id)
        if target is not None:
            target.put_nowait(item)

    def _fail_all(self) -> None:
        error = EngineDeadError("an engine process died; the server is shutting down")
        for target in list(self._queues.values()):
            target.put_nowait(error)
        if self.on_death is not None:
            self.on_death()


def _per_engine(config: EngineConfig, size: int) -> EngineConfig:
    """Each engine's config: on a CPU the engines (and their ranks) share the machine, so
    each gets its share of the threads and of the KV cache memory, unless they are set."""
    model, cache = config.model, config.cache
    device = resolve_device(model.device)
    if device.type == "cpu":
        ranks = max(config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size)
        threads, quota = torch.get_num_threads(), cgroup_cpu_quota()
        if quota is not None:
            threads = min(threads, max(1, math.ceil(quota)))
        if model.cpu_threads is None:  # each rank's
            model = replace(model, cpu_threads=max(1, threads // (size * ranks)))
        if cache.kv_cache_memory is None:  # each engine's, which its ranks share
            cache = replace(cache, kv_cache_memory=kv_cache_bytes(cache, device) // size)
        check_kv_cache_fits(kv_cache_bytes(cache, device) * size, device)  # (all engines')
    return replace(config, model=model, cache=cache,
                   parallel=replace(config.parallel, data_parallel_size=1))  # fmt: skip


def _engine_gpus(config: EngineConfig, index: int) -> dict[str, str] | None:
    """On CUDA, engine `index`'s own GPUs (as many as its ranks), as CUDA_VISIBLE_DEVICES."""
    if resolve_device(config.model.device).type != "cuda":
        return None
    ranks = max(config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    mine = gpus[index * ranks : (index + 1) * ranks]
    if len(mine) < ranks:
        raise ModelLoadError(
            f"data-parallel engine {index} needs {ranks} GPU(s); only {len(gpus)} are visible"
        )
    return {"CUDA_VISIBLE_DEVICES": ",".join(mine)}
