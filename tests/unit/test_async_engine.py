"""AsyncEngine over a stub LLMEngine: the event loop reads the engine's state only from the
snapshot the engine thread publishes, and that snapshot counts admitted requests at once."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.step_stats import StepTokenCounter
from tokenmill.errors import InvalidRequestError, OverloadedError
from tokenmill.sampling_params import SamplingParams


class WatchedScheduler:
    """A scheduler whose queues record the threads that read them."""

    def __init__(self) -> None:
        self._waiting: deque[str] = deque()
        self._running: list[str] = []
        self.num_preemptions = 0
        self.speculator = None
        self.step_tokens = StepTokenCounter()
        self.readers: set[str] = set()

    @property
    def waiting(self) -> deque[str]:
        self.readers.add(threading.current_thread().name)
        return self._waiting

    @property
    def running(self) -> list[str]:
        self.readers.add(threading.current_thread().name)
        return self._running


class Pool:
    def __init__(self, scheduler: WatchedScheduler) -> None:
        self.scheduler = scheduler

    @property
    def usage(self) -> float:
        return len(self.scheduler._running) / 4


class StubEngine:
    """LLMEngine's surface for AsyncEngine: a request waits until `admit` is set, then runs
    one token a step for `num_tokens` steps."""

    max_model_len = 32
    sampling_defaults: dict[str, Any] = {}
    reasoning = None
    image_processor = None

    def __init__(self, num_tokens: int = 3) -> None:
        self.shut_down = False
        self.scheduler = WatchedScheduler()
        self.core = SimpleNamespace(
            scheduler=self.scheduler,
            kv_cache=SimpleNamespace(pool=Pool(self.scheduler)),
            source=SimpleNamespace(name="stub"),
            vocab_size=10,
            check_health=lambda: None,  # one process: never fails
        )
        self.tokenizer: Any = None
        self.structured_outputs = SimpleNamespace(close=lambda: None)
        self.num_tokens = num_tokens
        self.admit = threading.Event()
        self.admit.set()
        self.tokens: dict[str, int] = {}

    @property
    def has_unfinished(self) -> bool:
        return bool(self.tokens)

    def add_request(self, request_id: str, *args: Any) -> None:
        self.scheduler._waiting.append(request_id)
        self.tokens[request_id] = 0

    def shutdown(self) -> None:
        self.shut_down = True

    def abort(self, request_id: str) -> None:
        self.tokens.pop(request_id, None)
        for queue in (self.scheduler._waiting, self.scheduler._running):
            if request_id in queue:
                queue.remove(request_id)

    def step(self) -> list[RequestOutput]:
        if not self.admit.wait(0.01):
            return []
        while self.scheduler._waiting:
            self.scheduler._running.append(self.scheduler._waiting.popleft())
        outputs = []
        for request_id in list(self.scheduler._running):
            self.tokens[request_id] += 1
            done = self.tokens[request_id] == self.num_tokens
            seq = CompletionOutput(0, "x" * self.tokens[request_id], [1] * self.tokens[request_id])
            outputs.append(RequestOutput(request_id, [1], [seq], finished=done))
            if done:
                self.abort(request_id)
        return outputs


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def wait_until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0.001)


def test_stats_come_from_the_published_snapshot_only() -> None:
    stub = StubEngine(num_tokens=10**9)
    engine = AsyncEngine(stub)  # type: ignore[arg-type]
    stub.scheduler.readers.clear()  # the first snapshot is read before the thread starts

    async def main() -> None:
        await engine.start()
        try:
            stream = engine.generate([1], SamplingParams(), "a")
            assert not (await stream.__anext__()).finished
            await wait_until(lambda: engine.stats().num_running == 1)
            assert engine.stats().kv_cache_usage == 0.25
            await stream.aclose()  # aborts the request on the engine thread
            await wait_until(lambda: engine.stats().num_running == 0)
            stats = engine.stats()
            assert (stats.num_waiting, stats.kv_cache_usage, stats.num_aborted) == (0, 0.0, 1)
        finally:
            await engine.shutdown()

    run(main())
    assert stub.scheduler.readers == {"tokenmill-engine"}
    assert stub.shut_down  # the workers are released once the engine thread has stopped


def test_an_admitted_request_counts_as_waiting_before_its_generate_resumes() -> None:
    stub = StubEngine()
    stub.admit.clear()  # requests stay in the waiting queue
    engine = AsyncEngine(stub, max_waiting_requests=1)  # type: ignore[arg-type]

    async def main() -> None:
        await engine.start()
        stream = engine.generate([1], SamplingParams(), "a")
        first = asyncio.ensure_future(stream.__anext__())
        try:
            await wait_until(lambda: "a" in stub.tokens)
            await asyncio.sleep(0.05)  # the admission has resolved; nothing has run
            assert engine.num_waiting == 1 and engine.stats().num_waiting == 1
            with pytest.raises(OverloadedError, match="1 requests are waiting"):
                engine.check_capacity()
            stub.admit.set()
            assert (await first).request_id == "a"
            await wait_until(lambda: engine.stats().num_waiting == 0)
        finally:
            await stream.aclose()
            await engine.shutdown()

    run(main())


def test_a_step_reaches_every_stream_with_one_wake_up_of_the_event_loop() -> None:
    """The engine thread posts each step's outputs in one call_soon_threadsafe (each call
    writes to the loop's self-pipe), not one per request; every stream still gets every
    output of its request, in order."""
    stub = StubEngine(num_tokens=5)
    engine = AsyncEngine(stub)  # type: ignore[arg-type]
    steps_with_outputs = 0
    step = stub.step

    def counted_step() -> list[RequestOutput]:
        nonlocal steps_with_outputs
        outputs = step()
        steps_with_outputs += bool(outputs)
        return outputs

    stub.step = counted_step  # type: ignore[method-assign]
    wake_ups = 0

    async def main() -> list[list[int]]:
        nonlocal wake_ups
        loop = asyncio.get_running_loop()
        post = loop.call_soon_threadsafe

        def counted_post(*args: Any, **kwargs: Any) -> Any:
            nonlocal wake_ups
            callback = getattr(args[0], "__name__", "")
            if threading.current_thread().name == "tokenmill-engine" and callback in (
                "_deliver",
                "put_nowait",
            ):  # outputs (admissions complete their futures with posts of their own)
                wake_ups += 1
            return post(*args, **kwargs)

        loop.call_soon_threadsafe = counted_post  # type: ignore[method-assign]
        await engine.start()
        try:

            async def collect(request_id: str) -> list[int]:
                stream = engine.generate([1], SamplingParams(), request_id)
                return [len(o.outputs[0].token_ids) async for o in stream]

            return await asyncio.gather(*(collect(f"r{i}") for i in range(8)))
        finally:
            await engine.shutdown()

    lengths = run(main())
    assert all(seen == sorted(set(seen)) and seen[-1] == 5 for seen in lengths)
    assert steps_with_outputs >= 5 and wake_ups <= steps_with_outputs


def test_a_request_id_already_running_is_refused_and_the_running_one_goes_on() -> None:
    """Ids come from clients (X-Request-Id): a second request under a running id is a 400,
    and the first keeps its stream to the end, unaborted."""
    stub = StubEngine(num_tokens=3)
    engine = AsyncEngine(stub)  # type: ignore[arg-type]

    async def main() -> None:
        await engine.start()
        try:
            stub.admit.clear()  # the first request waits, its stream open
            first = engine.generate([1], SamplingParams(), "dup")
            pending = asyncio.ensure_future(first.__anext__())
            await wait_until(lambda: "dup" in stub.tokens)
            with pytest.raises(InvalidRequestError, match="'dup' is already running"):
                await engine.generate([1], SamplingParams(), "dup").__anext__()
            stub.admit.set()
            outputs = [await pending] + [output async for output in first]
            assert outputs[-1].finished and outputs[-1].outputs[0].text == "xxx"
            assert engine.stats().num_aborted == 0
        finally:
            await engine.shutdown()

    run(main())
