"""Which data-parallel engine takes a request: the least loaded, unless another holds a
longer prefix of its prompt in its prefix cache and is not much busier (then the shared
system prompt or document is computed once per engine, not once per request).

The router cannot see the engines' caches; it remembers what it sent where: the chained
hashes of each prompt's full KV blocks (as the engines' prefix cache keys them, with the
cache salt), an LRU per engine as large as that engine's cache. A block evicted there may
still be remembered here, which only costs a recompute.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

MIN_MATCH = 0.5  # of the prompt's tokens, cached on an engine, to send it there


class PrefixAffinityRouter:
    def __init__(self, num_engines: int, block_size: int, capacity_blocks: int, slack: int):
        self.block_size = block_size
        self.capacity = capacity_blocks
        # how many more requests than the least loaded engine an engine may hold and still
        # get a request for its cached prefix
        self.slack = slack
        self.cached: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_engines)]

    def block_hashes(self, prompt: Sequence[int], salt: str | None) -> list[int]:
        """The chained hash of each full block of the prompt."""
        hashes, previous = [], hash(salt)
        for start in range(0, len(prompt) - self.block_size + 1, self.block_size):
            previous = hash((previous, tuple(prompt[start : start + self.block_size])))
            hashes.append(previous)
        return hashes

    def route(self, hashes: list[int], num_tokens: int, loads: Sequence[int],
              routed: Sequence[int]) -> int:  # fmt: skip
        """The engine for a prompt of `num_tokens` with these block hashes, given each
        engine's load (requests in flight) and how many requests it got so far; remembers
        the prompt's blocks there.

        An engine within `slack` requests of the least loaded that holds at least
        MIN_MATCH of the prompt gets it (the longest match wins); else the least loaded
        (ties: the one that got fewest so far). A prefix every request shares (a chat
        template's header) is short against the prompt, so it does not pull all traffic
        to one engine."""
        least = min(loads)
        best, best_match = -1, 0
        for i, load in enumerate(loads):
            if load > least + self.slack:
                continue
            matched = self._matched(i, hashes) * self.block_size
            if matched >= MIN_MATCH * num_tokens and matched > best_match:
                best, best_match = i, matched
        if best < 0:
            best = min(range(len(loads)), key=lambda i: (loads[i], routed[i], i))
        self._remember(best, hashes)
        return best

    def _matched(self, engine: int, hashes: list[int]) -> int:
        cached, n = self.cached[engine], 0
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    def _remember(self, engine: int, hashes: list[int]) -> None:
        cached = self.cached[engine]
        for h in hashes:
            cached[h] = None
            cached.move_to_end(h)
        while len(cached) > self.capacity:
            cached.popitem(last=False)
