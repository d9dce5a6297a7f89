"""Server-sent events: the `data: ...` framing, [DONE], errors after the stream has started."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.errors import TokenmillError
from tokenmill.server.errors import error_body
from tokenmill.server.streams import aclose

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel | str, *, exclude: set[str] | None = None) -> str:
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude=exclude)
    return f"data: {data}\n\n"


async def with_done(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Relay the events, turn an exception into an error event, and always end with [DONE]."""
    try:
        async for event in events:
            yield event
    except TokenmillError as exc:
        yield sse_event(error_body(exc))
    except Exception as exc:
        logger.exception("error while streaming a response")
        yield sse_event(error_body(exc))
    finally:
        await aclose(events)
    yield DONE


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response whose body is closed however the stream ends.

    Starlette cancels the body when the client disconnects but leaves the generator open;
    closing it here runs its cleanup (engine aborts) at once instead of at garbage collection.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(
            with_done(events), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await aclose(self.body_iterator)
