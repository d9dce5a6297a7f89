"""Prometheus metrics of one app, named, typed, labelled and bucketed as vLLM's (`vllm:*`, with
`model_name` and `engine` labels), so dashboards, alerts and routers built for vLLM read
tokenmill unchanged; `http_requests_total` as the instrumentator vLLM serves it with; and
two of tokenmill's own (`tokenmill:cpu_threads*`), which vLLM has no equivalent of.

Request timings follow vLLM's phases: queued (arrival to first scheduled, the engine's
timestamp), prefill (to the first token), decode (to the last), inference (prefill and
decode), end to end (arrival to finish).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from tokenmill.engine.client import CacheInfo, EngineStats
from tokenmill.engine.outputs import PoolingRequestOutput, RequestOutput
from tokenmill.engine.step_stats import STEP_TOKEN_BUCKETS, StepTokens
from tokenmill.sampling_params import SamplingParams

_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
_TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
_REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
_LABELS = ["model_name", "engine"]
disable_created_metrics()  # no *_created series, as vLLM serves none


def buckets_1_2_5(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > limit:
                return buckets
            buckets.append(value)
        exponent += 1


class ServerMetrics:
    """Every metric lives in this app's own registry, so apps (and tests) never share counters."""

    def __init__(
        self,
        engine_stats: Callable[[], list[EngineStats]],  # one per engine (data parallel)
        model_name: str,
        max_model_len: int,
        cache_info: Callable[[], list[CacheInfo]] = list,  # likewise
    ):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels, values = self.registry, _LABELS, (model_name, "0")
        self.http_requests = Counter(
            "http_requests", "Total number of requests by method, status and handler.",
            ["handler", "method", "status"], registry=r,
        )  # fmt: skip

        def counter(name: str, doc: str) -> _Total:
            return _Total(Counter(name, doc, labels, registry=r).labels(*values))

        def histogram(name: str, doc: str, buckets: tuple[float, ...] | list[int]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*values)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        success = Counter(
            "vllm:request_success", "Count of successfully processed requests.",
            [*labels, "finished_reason"], registry=r,
        )  # fmt: skip
        self.request_success = {
            reason: success.labels(*values, reason) for reason in ("stop", "length", "abort")
        }
        self._success, self._values = success, values
        self.server_load = 0  # requests to the model's routes in flight (GET /load)
        tokens = buckets_1_2_5(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", tokens
        )
        self.request_max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.", tokens,
        )  # fmt: skip
        self.request_params_n = histogram(
            "vllm:request_params_n", "Histogram of the n request parameter.", [1, 2, 5, 10, 20]
        )
        self.request_params_max_tokens = histogram(
            "vllm:request_params_max_tokens",
            "Histogram of the max_tokens request parameter.", tokens,
        )  # fmt: skip
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.", _TTFT_BUCKETS,
        )  # fmt: skip
        self.time_per_output_token = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.", _TOKEN_LATENCY_BUCKETS,
        )  # fmt: skip
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.", _TOKEN_LATENCY_BUCKETS,
        )  # fmt: skip
        phase = {
            "e2e_request_latency": "Histogram of e2e request latency in seconds.",
            "request_queue_time": "Histogram of time spent in WAITING phase for request.",
            "request_inference_time": "Histogram of time spent in RUNNING phase for request.",
            "request_prefill_time": "Histogram of time spent in PREFILL phase for request.",
            "request_decode_time": "Histogram of time spent in DECODE phase for request.",
        }
        self.phases = {
            name: histogram(f"vllm:{name}_seconds", doc, _REQUEST_LATENCY_BUCKETS)
            for name, doc in phase.items()
        }
        r.register(_EngineCollector(engine_stats, values))
        r.register(_CacheConfigCollector(cache_info, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def start_request(self, num_prompt_tokens: int, params: SamplingParams) -> RequestTimer:
        timer = RequestTimer(self, num_prompt_tokens)
        if params.use_beam_search or params.num_sequences > params.n:
            timer.count_prompt()  # (its outputs come only at the end: counted as it arrives)
        self.request_params_n.observe(params.n)
        if params.max_tokens is not None:
            self.request_params_max_tokens.observe(params.max_tokens)
            self.request_max_num_generation_tokens.observe(params.max_tokens)
        return timer

    def start_pooling(self, num_prompt_tokens: int) -> RequestTimer:
        """An embedding request: prompt tokens only."""
        return RequestTimer(self, num_prompt_tokens)

    def success(self, reason: str) -> Counter:
        """The request_success counter of a finish reason (also ones vLLM lacks: "error")."""
        if reason not in self.request_success:
            self.request_success[reason] = self._success.labels(*self._values, reason)
        return self.request_success[reason]


class _Total:
    """A counter (one label set) that also keeps its total, for the stats line to read
    without a scrape."""

    def __init__(self, child: Counter):
        self.child, self.value = child, 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.child.inc(amount)
        self.value += amount


class RequestTimer:
    """One engine request's tokens and phases: TTFT once, an inter-token sample per output,
    the phase histograms when it ends."""

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int):
        self.metrics = metrics
        self.num_prompt_tokens = num_prompt_tokens
        self.arrival = time.monotonic()
        self.scheduled: float | None = None  # the engine's first-scheduled time
        self.first: float | None = None  # first token
        self.last: float | None = None  # latest token
        self.num_tokens = 0
        self.prefilled = False  # its prompt tokens counted (when the engine first answers)

    def count_prompt(self) -> None:
        """vllm:prompt_tokens counts a prompt once the engine has taken it in (its first
        output), as vLLM's does: not a request that waits, nor one that never reaches the
        engine. (Beam search and best_of > n answer only at the end: counted on arrival.)"""
        if not self.prefilled:
            self.prefilled = True
            self.metrics.prompt_tokens.inc(self.num_prompt_tokens)

    def on_output(self, output: RequestOutput) -> None:
        """Record a snapshot (cumulative: its sequences' tokens so far)."""
        self.count_prompt()
        if self.scheduled is None and output.first_scheduled_time is not None:
            self.scheduled = output.first_scheduled_time
            self.metrics.prefix_cache_queries.inc(self.num_prompt_tokens)
            self.metrics.prefix_cache_hits.inc(output.num_cached_tokens)
        num_tokens = sum(len(o.token_ids) for o in output.outputs)
        new = num_tokens - self.num_tokens
        if new <= 0:
            return
        now = time.monotonic()
        if self.last is None:
            self.metrics.time_to_first_token.observe(now - self.arrival)
            self.first = now
        else:
            self.metrics.time_per_output_token.observe(now - self.last)
            self.metrics.inter_token_latency.observe(now - self.last)
        self.metrics.generation_tokens.inc(new)
        self.last, self.num_tokens = now, num_tokens

    def on_finish(self, output: RequestOutput) -> None:
        for sequence in output.outputs:
            self.metrics.success(sequence.finish_reason or "stop").inc()
        self._phases(time.monotonic())

    def on_pooled(self, output: PoolingRequestOutput) -> None:
        """An embedding's one output: its prefill was the whole of it."""
        self.count_prompt()
        self.scheduled = output.first_scheduled_time
        if self.scheduled is not None:
            self.metrics.prefix_cache_queries.inc(self.num_prompt_tokens)
            self.metrics.prefix_cache_hits.inc(output.num_cached_tokens)
        self.metrics.success("stop").inc()
        self._phases(time.monotonic())

    def on_abort(self) -> None:
        self.metrics.success("abort").inc()
        self._phases(time.monotonic())

    def _phases(self, end: float) -> None:
        m = self.metrics
        m.phases["e2e_request_latency"].observe(end - self.arrival)
        m.request_prompt_tokens.observe(self.num_prompt_tokens)
        m.request_generation_tokens.observe(self.num_tokens)
        if self.scheduled is None:
            return  # never scheduled: all of it was queue time
        m.phases["request_queue_time"].observe(max(0.0, self.scheduled - self.arrival))
        m.phases["request_inference_time"].observe(max(0.0, end - self.scheduled))
        first = self.first if self.first is not None else end
        m.phases["request_prefill_time"].observe(max(0.0, first - self.scheduled))
        m.phases["request_decode_time"].observe(max(0.0, end - first))


class _EngineCollector(Collector):
    """Reads the engines' stats at scrape time: queue sizes, KV cache usage, engine totals,
    one series per engine (the `engine` label: "0", "1", ... with --data-parallel-size)."""

    def __init__(self, engine_stats: Callable[[], list[EngineStats]], values: tuple[str, str]):
        self.engine_stats, self.model_name = engine_stats, values[0]

    def _spec_decode(self, per_engine: list[EngineStats]) -> Iterator[Metric]:
        """vLLM's speculative decoding counters, per engine, when speculation is on."""
        if all(stats.spec_decode is None for stats in per_engine):
            return
        families = [
            CounterMetricFamily(name, doc, labels=_LABELS)
            for name, doc in (
                ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts."),
                ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens."),
                ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens."),
            )
        ]
        per_position = CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Accepted tokens per draft position.", labels=[*_LABELS, "position"],
        )  # fmt: skip
        for index, stats in enumerate(per_engine):
            counts = stats.spec_decode
            if counts is None:
                continue
            values = [self.model_name, str(index)]
            totals = (counts.num_drafts, counts.num_draft_tokens, counts.num_accepted_tokens)
            for family, value in zip(families, totals, strict=True):
                family.add_metric(values, value)
            for position, value in enumerate(counts.accepted_per_position):
                per_position.add_metric([*values, str(position)], value)
        yield from families
        yield per_position

    def collect(self) -> Iterator[Metric]:
        try:
            per_engine = self.engine_stats()
        except Exception:  # a dead engine must not break /metrics
            return
        families = [
            GaugeMetricFamily(name, doc, labels=_LABELS)
            for name, doc in (
                ("vllm:num_requests_running", "Number of requests in model execution batches."),
                ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
                ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
                # vLLM still serves it, and its published Grafana dashboard reads it
                ("vllm:gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage. "
                 "DEPRECATED: Use vllm:kv_cache_usage_perc instead."),
            )
        ]  # fmt: skip
        preemptions = CounterMetricFamily(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
            labels=_LABELS,
        )  # fmt: skip
        for index, stats in enumerate(per_engine):
            values = [self.model_name, str(index)]
            for family, value in zip(
                families,
                (stats.num_running, stats.num_waiting, stats.kv_cache_usage, stats.kv_cache_usage),
                strict=True,
            ):
                family.add_metric(values, value)
            preemptions.add_metric(values, stats.num_preemptions)
        yield from families
        yield preemptions
        yield from _step_tokens(per_engine, self.model_name)
        yield from self._spec_decode(per_engine)
        if len(per_engine) > 1:
            routed = CounterMetricFamily(
                "tokenmill:engine_requests_routed", "Requests the server sent to each engine "
                "(data parallel).", labels=_LABELS,
            )  # fmt: skip
            for index, stats in enumerate(per_engine):
                routed.add_metric([self.model_name, str(index)], stats.num_routed)
            yield routed
        stats = per_engine[0]
        if len(per_engine) == 1 and stats.cpu_threads is not None:
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


def _step_tokens(per_engine: list[EngineStats], model_name: str) -> Iterator[Metric]:
    """vllm:iteration_tokens_total: the tokens each engine step computed."""
    if all(stats.step_tokens is None for stats in per_engine):
        return
    family = HistogramMetricFamily(
        "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
        labels=_LABELS,
    )  # fmt: skip
    bounds = [*(str(float(b)) for b in STEP_TOKEN_BUCKETS), "+Inf"]
    for index, stats in enumerate(per_engine):
        steps: StepTokens | None = stats.step_tokens
        if steps is not None:
            family.add_metric(
                [model_name, str(index)], list(zip(bounds, steps.cumulative, strict=True)),
                sum_value=steps.total_tokens,
            )  # fmt: skip
    yield family


class _CacheConfigCollector(Collector):
    """vllm:cache_config_info: 1, labelled with each engine's KV cache settings, as vLLM
    serves its CacheConfig (an info metric dashboards join on)."""

    def __init__(self, cache_info: Callable[[], list[CacheInfo]], model_name: str):
        self.cache_info, self.model_name = cache_info, model_name

    def collect(self) -> Iterator[Metric]:
        try:
            per_engine = self.cache_info()
        except Exception:  # a dead engine must not break /metrics
            return
        if not per_engine:
            return
        labels = ["model_name", "engine", "block_size", "cache_dtype", "enable_prefix_caching",
                  "gpu_memory_utilization", "num_gpu_blocks", "kv_cache_memory_bytes"]  # fmt: skip
        family = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=labels
        )
        for index, info in enumerate(per_engine):
            family.add_metric(
                [self.model_name, str(index), str(info.block_size), info.cache_dtype,
                 str(info.enable_prefix_caching), str(info.gpu_memory_utilization),
                 str(info.num_blocks), str(info.kv_cache_memory_bytes)], 1.0,
            )  # fmt: skip
        yield family
