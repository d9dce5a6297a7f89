"""The server's periodic stats line, as vLLM logs it: every VLLM_LOG_STATS_INTERVAL seconds
(10 by default) while requests come and go, the prompt and generation throughput since the
last line (prompt tokens counted as the engine takes them in, not as they arrive), the
running and waiting requests, the KV cache in use and the prefix cache's hit rate. An idle
server logs it at DEBUG, so its log stays quiet. --disable-log-stats turns it off."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from tokenmill.engine.client import EngineStats
from tokenmill.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 10.0


def interval_from_env() -> float:
    """VLLM_LOG_STATS_INTERVAL, as vLLM reads it (a number; not above 0: the default); a
    value that is not a number is an error at startup, not a silent default."""
    value = os.environ.get("VLLM_LOG_STATS_INTERVAL")
    if value is None:
        return DEFAULT_INTERVAL_S
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"VLLM_LOG_STATS_INTERVAL must be a number, got {value!r}") from None
    return seconds if seconds > 0 else DEFAULT_INTERVAL_S


@dataclass(slots=True)
class _Totals:
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    prefix_queries: float = 0.0
    prefix_hits: float = 0.0


class StatsLogger:
    """Reads the server's counters and the engine's state; logs one line per interval."""

    def __init__(
        self, metrics: ServerMetrics, engine_stats: Callable[[], EngineStats], interval_s: float
    ):
        self.metrics, self.engine_stats, self.interval_s = metrics, engine_stats, interval_s
        self._last = self._totals()
        self._last_time = time.monotonic()
        self._was_busy = False

    def _totals(self) -> _Totals:
        m = self.metrics
        return _Totals(m.prompt_tokens.value, m.generation_tokens.value,
                       m.prefix_cache_queries.value, m.prefix_cache_hits.value)  # fmt: skip

    def line(self, now: float) -> tuple[int, str]:
        """The level and text of the line for the interval ending `now`; starts the next."""
        totals, last = self._totals(), self._last
        seconds = max(now - self._last_time, 1e-9)
        prompt = (totals.prompt_tokens - last.prompt_tokens) / seconds
        generation = (totals.generation_tokens - last.generation_tokens) / seconds
        queries = totals.prefix_queries - last.prefix_queries
        hit_rate = (totals.prefix_hits - last.prefix_hits) / queries if queries else 0.0
        stats = self.engine_stats()
        busy = bool(prompt or generation or stats.num_running or stats.num_waiting)
        # the line after the last busy one still says INFO: the log shows the server settle
        level = logging.INFO if busy or self._was_busy else logging.DEBUG
        self._last, self._last_time, self._was_busy = totals, now, busy
        return level, (
            f"Avg prompt throughput: {prompt:.1f} tokens/s, Avg generation throughput: "
            f"{generation:.1f} tokens/s, Running: {stats.num_running} reqs, Waiting: "
            f"{stats.num_waiting} reqs, KV cache usage: {stats.kv_cache_usage * 100:.1f}%, "
            f"Prefix cache hit rate: {hit_rate * 100:.1f}%"
        )

    async def run(self) -> None:
        """Until cancelled (the server's lifespan ends)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                level, text = self.line(time.monotonic())
            except Exception:
                logger.exception("the stats line failed; no more stats lines")
                return
            logger.log(level, "%s", text)
