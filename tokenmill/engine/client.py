"""EngineClient: what the server may ask of an engine (AsyncEngine, or a test's fake)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tokenmill.config import SchedulingPolicy
from tokenmill.engine.outputs import PoolingRequestOutput, RequestOutput
from tokenmill.engine.step_stats import StepTokens
from tokenmill.errors import ServiceUnavailableError
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.multimodal.processor import ImageProcessor
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.interface import CompiledGrammar
from tokenmill.structured.spec import StructuredSpec
from tokenmill.tokenizer.tokenizer import Tokenizer
from tokenmill.tools.reasoning import ReasoningMarkers

if TYPE_CHECKING:
    from tokenmill.engine.core import EngineCore
    from tokenmill.spec_decode.speculator import SpecDecodeCounts


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """One engine's KV cache as loaded (/metrics' vllm:cache_config_info)."""

    block_size: int  # tokens per block
    num_blocks: int
    cache_dtype: str  # as configured; "auto" resolved to the dtype it chose
    enable_prefix_caching: bool
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int

    @classmethod
    def of(cls, core: EngineCore) -> CacheInfo:
        """Of a loaded EngineCore (read once, after loading)."""
        cache, info = core.config.cache, core.info
        dtype: str = cache.kv_cache_dtype
        if dtype == "auto":
            dtype = str(info.kv_cache_dtype).removeprefix("torch.")
        return cls(cache.block_size, info.num_blocks, dtype, cache.enable_prefix_caching,
                   cache.gpu_memory_utilization, info.kv_cache_bytes)  # fmt: skip


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A point-in-time view of the engine for /metrics and admission control."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # share of KV blocks in use, 0..1
    num_preemptions: int  # total since start
    num_aborted: int  # total since start
    cpu_threads: tuple[int, int] | None = None  # (in use now, reductions): CPU kernels only
    num_routed: int = 0  # requests the server sent this engine (data parallel), total
    spec_decode: SpecDecodeCounts | None = None  # speculative decoding's totals, when on
    step_tokens: StepTokens | None = None  # tokens per step so far (None: a test's fake)


class EngineClient(Protocol):
    """An engine seen from the event loop. Every method is called on the event loop; none
    blocks it. Errors a client caused are InvalidRequestError (400); a full queue is
    OverloadedError, a stopped engine ServiceUnavailableError (503)."""

    on_death: Callable[[], None] | None  # called on the event loop if the engine dies

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def model_name(self) -> str:
        """What was loaded (a directory, file or hub id's name)."""
        ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def scheduling_policy(self) -> SchedulingPolicy:
        """fcfs (a request's priority must be 0) or priority."""
        ...

    @property
    def reasoning_markers(self) -> ReasoningMarkers | None:
        """The thought markers of a reasoning model (None: the model does not reason)."""
        ...

    @property
    def image_processor(self) -> ImageProcessor | None:
        """A vision model's processor (expands image placeholders); None: text only."""
        ...

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """SamplingParams field -> the model's default for requests that leave it unset."""
        ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def died(self) -> bool:
        """True once the engine died of an error (not after a clean shutdown)."""
        ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def stats(self) -> EngineStats: ...

    def stats_per_engine(self) -> list[EngineStats]:
        """One per engine (data parallel: several), for /metrics' `engine` label."""
        ...

    def cache_info(self) -> list[CacheInfo]:
        """Each engine's KV cache, in the order of stats_per_engine."""
        ...

    def check_capacity(self) -> None:
        """OverloadedError when no more requests may wait; asked before a response starts."""
        ...

    async def compile_grammar(self, spec: StructuredSpec) -> CompiledGrammar:
        """The constraint compiled (cached, off the event loop); InvalidRequestError if bad."""
        ...

    def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        cache_salt: str | None = None,
        grammar: CompiledGrammar | None = None,
        priority: int = 0,
        images: tuple[ImageInput, ...] = (),
    ) -> AsyncIterator[RequestOutput]:
        """The outputs of one request as params.output_kind asks (cumulative snapshots by
        default; queued deltas fold into one), the last one finished; closing the iterator
        early aborts the request."""
        ...

    async def encode(
        self,
        prompt_token_ids: list[int],
        params: PoolingParams,
        request_id: str,
        cache_salt: str | None = None,
    ) -> PoolingRequestOutput:
        """An embedding request's one output; cancelling the call aborts the request.
        InvalidRequestError for params the model cannot honour (dimensions)."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def cut_off(self, error: ServiceUnavailableError) -> int:
        """End every request in flight with `error` and refuse new ones; returns how many."""
        ...
