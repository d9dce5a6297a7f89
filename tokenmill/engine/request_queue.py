"""The scheduler's waiting queue under each scheduling policy, and whom it preempts first.

fcfs: arrival order; a preempted request goes back to the front, and the newest running
request is the one preempted.
priority: ordered by (priority, arrival), lower first (vLLM's --scheduling-policy priority);
a preempted request goes back in by that key, and the running request with the largest key
is the one preempted.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterator
from typing import Protocol

from tokenmill.config import SchedulingPolicy
from tokenmill.engine.request import Request


class RequestQueue(Protocol):
    """What the scheduler asks of its waiting queue."""

    def add(self, request: Request) -> None: ...
    def add_preempted(self, request: Request) -> None: ...
    def peek(self) -> Request: ...
    def pop(self) -> Request: ...
    def remove(self, request: Request) -> None: ...
    def forget(self, request: Request) -> None: ...
    def victim(self, running: list[Request]) -> Request: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Request]: ...
    def __contains__(self, request: object) -> bool: ...


class FCFSQueue:
    """Waiting requests in arrival order."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def add_preempted(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> None:
        self._queue.remove(request)

    def forget(self, request: Request) -> None:
        """The request ended: nothing kept for it."""

    def victim(self, running: list[Request]) -> Request:
        """The running request to preempt when KV blocks run out: the newest admitted."""
        return running[-1]

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._queue)

    def __contains__(self, request: object) -> bool:
        return request in self._queue


class PriorityQueue:
    """Waiting requests by (priority, arrival): a heap, each request's arrival kept until it
    ends so a preempted one goes back where it was."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Request]] = []  # (priority, arrival, request)
        self._arrival: dict[Request, int] = {}
        self._next_arrival = itertools.count()

    def key(self, request: Request) -> tuple[int, int]:
        return request.priority, self._arrival[request]

    def add(self, request: Request) -> None:
        if request not in self._arrival:
            self._arrival[request] = next(self._next_arrival)
        heapq.heappush(self._heap, (*self.key(request), request))

    def add_preempted(self, request: Request) -> None:
        self.add(request)

    def peek(self) -> Request:
        return self._heap[0][2]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[2]

    def remove(self, request: Request) -> None:
        """O(n); only aborts of waiting requests take it."""
        self._heap = [entry for entry in self._heap if entry[2] is not request]
        heapq.heapify(self._heap)

    def forget(self, request: Request) -> None:
        self._arrival.pop(request, None)

    def victim(self, running: list[Request]) -> Request:
        """The running request with the largest (priority, arrival): the least urgent."""
        return max(running, key=self.key)

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[Request]:
        return (entry[2] for entry in sorted(self._heap, key=lambda entry: entry[:2]))

    def __contains__(self, request: object) -> bool:
        return any(entry[2] is request for entry in self._heap)


def make_queue(policy: SchedulingPolicy) -> RequestQueue:
    return PriorityQueue() if policy == "priority" else FCFSQueue()
