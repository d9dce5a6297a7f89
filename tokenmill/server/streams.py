"""The engine streams of one HTTP request: one per prompt, merged, each aborted in the engine
when it ends early; and the watch that cancels a handler when its client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request
from starlette.responses import Response

from tokenmill.engine.client import EngineClient
from tokenmill.engine.input_processor import EngineInput
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.sampling_params import RequestOutputKind
from tokenmill.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")


def generate(
    engine: EngineClient, metrics: ServerMetrics, inputs: list[EngineInput], request_id: str
) -> AsyncGenerator[tuple[int, RequestOutput]]:
    """Run every prompt as its own engine request; yield (prompt index, snapshot)."""
    streams = [
        engine_stream(engine, metrics, item, f"{request_id}-{i}") for i, item in enumerate(inputs)
    ]
    return merge_streams(streams)


async def engine_stream(
    engine: EngineClient, metrics: ServerMetrics, item: EngineInput, request_id: str
) -> AsyncIterator[RequestOutput]:
    """One engine request with its metrics; leaving early aborts it in the engine.

    Yields the request's cumulative output after each step it changed in (the handlers
    read snapshots that way), as one object that grows: the engine sends what is new
    (output_kind DELTA, so no step copies a long output), folded in here. A handler
    reads each snapshot before it asks for the next."""
    timer = metrics.start_request(len(item.prompt_token_ids), item.params)
    if item.params.max_tokens == 0 and item.params.prompt_logprobs is None:  # echo only
        yield _empty_output(item, request_id)
        return
    stream = engine.generate(
        item.prompt_token_ids,
        dataclasses.replace(item.params, output_kind=RequestOutputKind.DELTA),
        request_id,
        cache_salt=item.cache_salt,
        grammar=item.grammar,
        priority=item.priority,
        images=item.images,
    )
    finished = False
    so_far: RequestOutput | None = None
    try:
        async for delta in stream:
            if so_far is None:
                so_far = delta  # (the first: all there is so far)
            else:
                so_far.add(delta)
            timer.on_output(so_far)
            finished = so_far.finished
            if finished:
                timer.on_finish(so_far)
            yield so_far
    finally:
        if not finished:
            timer.on_abort()
            _spawn_abort(engine, request_id)
        await aclose(stream)


def _empty_output(item: EngineInput, request_id: str) -> RequestOutput:
    sequences = [CompletionOutput(index=j, finish_reason="length") for j in range(item.params.n)]
    return RequestOutput(request_id, item.prompt_token_ids, sequences, finished=True)


_background: set[asyncio.Task[None]] = set()  # strong refs until the abort tasks finish


def _spawn_abort(engine: EngineClient, request_id: str) -> None:
    """Abort in a task of its own: the caller may be inside a cancelled scope."""
    try:
        task = asyncio.get_running_loop().create_task(_abort(engine, request_id))
    except RuntimeError:  # no loop (interpreter shutdown): nothing left to abort
        return
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _abort(engine: EngineClient, request_id: str) -> None:
    try:
        await engine.abort(request_id)
    except Exception:
        logger.debug("abort of %s failed", request_id, exc_info=True)


async def merge_streams(
    streams: list[AsyncIterator[T]],
) -> AsyncGenerator[tuple[int, T]]:
    """Interleave several async iterators as items arrive; closing this closes them all."""
    if len(streams) == 1:
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await aclose(streams[0])
        return
    queue: asyncio.Queue[tuple[int, T] | Exception | None] = asyncio.Queue()
    tasks = [asyncio.create_task(_drain(i, s, queue)) for i, s in enumerate(streams)]
    try:
        num_open = len(streams)
        while num_open:
            message = await queue.get()
            if message is None:
                num_open -= 1
            elif isinstance(message, Exception):
                raise message
            else:
                yield message
    finally:
        for task in tasks:
            task.cancel()  # the CancelledError closes that stream, which aborts its request


async def _drain(
    index: int, stream: AsyncIterator[T], queue: asyncio.Queue[tuple[int, T] | Exception | None]
) -> None:
    """Move one stream's items into the shared queue; None marks its end."""
    try:
        async for item in stream:
            queue.put_nowait((index, item))
        queue.put_nowait(None)
    except Exception as exc:
        queue.put_nowait(exc)


async def aclose(stream: object) -> None:
    """Close an async generator now (its cleanup runs at once, not at garbage collection)."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it (which aborts its engine requests) if the client leaves.

    A streaming handler returns at once; its stream then watches the connection itself.
    """
    handler = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not handler.done():
            handler.cancel()
    if handler in done:
        return handler.result()
    with contextlib.suppress(asyncio.CancelledError):
        await handler
    logger.info("client disconnected; request cancelled")
    return Response(status_code=499)  # nobody is listening; the status only shows in logs


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
