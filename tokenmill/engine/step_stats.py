"""Tokens per engine step, kept as a histogram with vLLM's buckets (/metrics'
vllm:iteration_tokens_total): how full the steps run, prefill chunks and decodes together.
No torch: the scheduler records, the event loop reads published snapshots."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

STEP_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True, slots=True)
class StepTokens:
    """The steps so far: how many computed at most each bucket's tokens (cumulative, as
    Prometheus counts buckets; the last is every step), and their tokens in all."""

    cumulative: tuple[int, ...]  # len(STEP_TOKEN_BUCKETS) + 1: the last is +Inf
    total_tokens: int

    @property
    def num_steps(self) -> int:
        return self.cumulative[-1]


class StepTokenCounter:
    """Counts each step's tokens into its bucket (on the engine thread)."""

    def __init__(self) -> None:
        self._per_bucket = [0] * (len(STEP_TOKEN_BUCKETS) + 1)
        self._total = 0
        self._snapshot: StepTokens | None = None  # the last one read, until the next step

    def observe(self, num_tokens: int) -> None:
        self._per_bucket[bisect_left(STEP_TOKEN_BUCKETS, num_tokens)] += 1
        self._total += num_tokens
        self._snapshot = None

    def snapshot(self) -> StepTokens:
        """Immutable: safe to publish to another thread or process."""
        if self._snapshot is None:
            running, cumulative = 0, []
            for count in self._per_bucket:
                running += count
                cumulative.append(running)
            self._snapshot = StepTokens(tuple(cumulative), self._total)
        return self._snapshot
