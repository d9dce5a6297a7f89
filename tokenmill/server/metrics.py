"""Prometheus metrics of one app: HTTP requests, tokens, latencies and the engine's state."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenmill.engine.client import EngineStats

_LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


class ServerMetrics:
    """Every metric lives in this app's own registry, so apps (and tests) never share counters."""

    def __init__(self, engine_stats: Callable[[], EngineStats]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "tokenmill:http_requests", "HTTP requests by endpoint and status.",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "tokenmill:prompt_tokens", "Prompt tokens of requests sent to the engine.", registry=r
        )
        self.generation_tokens = Counter(
            "tokenmill:generation_tokens", "Tokens generated.", registry=r
        )
        self.request_success = Counter(
            "tokenmill:request_success", "Engine requests that finished, by finish reason.",
            ["finished_reason"], registry=r,
        )  # fmt: skip
        self.request_aborted = Counter(
            "tokenmill:request_aborted", "Engine requests aborted (client gone, error).", registry=r
        )
        self.time_to_first_token = Histogram(
            "tokenmill:time_to_first_token_seconds", "From arrival to the first generated token.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "tokenmill:inter_token_latency_seconds", "Between consecutive outputs of a request.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        r.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def start_request(self, num_prompt_tokens: int) -> RequestTimer:
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestTimer(self)


class RequestTimer:
    """Latencies of one engine request: TTFT once, then one inter-token sample per output."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.last: float | None = None
        self.num_tokens = 0

    def on_output(self, num_tokens: int) -> None:
        """Record a snapshot whose sequences now hold num_tokens generated tokens in total."""
        new = num_tokens - self.num_tokens
        if new <= 0:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.time_to_first_token.observe(now - self.arrival)
        else:
            self.metrics.inter_token_latency.observe(now - self.last)
        self.metrics.generation_tokens.inc(new)
        self.last, self.num_tokens = now, num_tokens

    def on_finish(self, finish_reasons: list[str | None]) -> None:
        for reason in finish_reasons:
            self.metrics.request_success.labels(finished_reason=reason or "unknown").inc()

    def on_abort(self) -> None:
        self.metrics.request_aborted.inc()


class _EngineCollector(Collector):
    """Reads engine.stats() at scrape time: queue sizes, KV cache usage, engine totals."""

    def __init__(self, engine_stats: Callable[[], EngineStats]):
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self.engine_stats()
        except Exception:  # a dead engine must not break /metrics
            return
        yield GaugeMetricFamily(
            "tokenmill:num_requests_running", "Requests in the running batch.", stats.num_running
        )
        yield GaugeMetricFamily(
            "tokenmill:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting
        )
        yield GaugeMetricFamily(
            "tokenmill:kv_cache_usage_perc", "Share of KV cache blocks in use (0..1).",
            stats.kv_cache_usage,
        )  # fmt: skip
        yield CounterMetricFamily(
            "tokenmill:num_preemptions", "Preemptions since start.", stats.num_preemptions
        )
        yield CounterMetricFamily(
            "tokenmill:engine_aborted_requests", "Requests the engine aborted since start.",
            stats.num_aborted,
        )  # fmt: skip
        if stats.cpu_threads is not None:
            in_use, reductions = stats.cpu_threads
            yield GaugeMetricFamily(
                "tokenmill:cpu_threads", "CPU threads the native kernels run on now (fewer "
                "while other processes take the cores).", in_use,
            )  # fmt: skip
            yield CounterMetricFamily(
                "tokenmill:cpu_thread_reductions", "Times the kernels' thread pool ran on a "
                "thread fewer because waiting for descheduled threads cost more than they added.",
                reductions,
            )  # fmt: skip
