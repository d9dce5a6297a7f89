"""What Completions and Chat share: settings, model names, sampling params, engine streams."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenmill.errors import InvalidRequestError, NotFoundError, ServiceUnavailableError
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.limits import RequestLimits, check_sampling_limits, check_structured_limits
from tokenmill.server.logprobs import LogprobFormatter
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest, UsageInfo
from tokenmill.structured import CompiledGrammar, StructuredSpec, spec_from_request_fields
from tokenmill.tokenizer.detokenizer import TokenTexts

logger = logging.getLogger(__name__)

T = TypeVar("T")
AnyRequest = CompletionRequest | ChatCompletionRequest


@dataclass(slots=True)
class ServerSettings:
    """The server's own options (the engine's live in EngineConfig)."""

    served_model_names: list[str]  # names clients may send as `model`; the first is the default
    api_key: str | None = None  # required as a Bearer token on /v1/* when set
    allowed_origins: list[str] | None = None  # CORS; None = no CORS headers at all
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    disable_log_requests: bool = False
    address: str = ""  # where the server listens, for the ready line
    limits: RequestLimits = RequestLimits()  # caps on one request (each over-cap value is a 400)


@dataclass(slots=True)
class EngineInput:
    """One engine request: the prompt's token ids and how to sample its continuation."""

    prompt_token_ids: list[int]
    params: SamplingParams
    grammar: CompiledGrammar | None = None  # params.structured_outputs, compiled
    cache_salt: str | None = None  # the request's prefix-cache tenant


class ServingBase:
    """Engine access shared by the endpoint handlers."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: ServerSettings,
        metrics: ServerMetrics,
        executor: ThreadPoolExecutor,
    ):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.executor = executor  # one thread: tokenizing and templates stay off the event loop
        self.logprobs = LogprobFormatter(TokenTexts(engine.tokenizer))

    def check_model(self, name: str | None) -> str:
        """The served name to report back; 404 for a name this server does not serve."""
        names = self.settings.served_model_names
        if name is None:
            return names[0]
        if name not in names:
            raise NotFoundError(
                f"The model `{name}` does not exist.", param="model", code="model_not_found"
            )
        return name

    def check_alive(self) -> None:
        if not self.engine.is_alive:
            raise ServiceUnavailableError("the engine is not running")

    def check_admission(self) -> None:
        """Right before answering: the engine runs, and has room in its waiting queue."""
        self.check_alive()
        self.engine.check_capacity()

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.engine.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{param} has token ids outside the vocabulary [0, {self.engine.vocab_size}): "
                f"{bad[:5]}",
                param=param,
            )

    def sampling_params(
        self,
        request: AnyRequest,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None,
    ) -> SamplingParams:
        """The request as SamplingParams (range checks live there); the one place they are built.

        max_tokens and the logprob counts come from the fields each endpoint names its own way.
        """
        limits = self.settings.limits
        check_sampling_limits(request, limits, self.engine.vocab_size)  # first: n may be huge
        reject_unsupported(request)
        params = SamplingParams(
            n=request.n,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=request.top_k,
            min_p=request.min_p,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            logit_bias=_logit_bias(request.logit_bias),
            seed=request.seed,
            stop=[request.stop] if isinstance(request.stop, str) else list(request.stop or []),
            stop_token_ids=list(request.stop_token_ids or []),
            include_stop_str_in_output=request.include_stop_str_in_output,
            ignore_eos=request.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=request.min_tokens,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            best_of=request.best_of,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            allowed_token_ids=request.allowed_token_ids,
            truncate_prompt_tokens=request.truncate_prompt_tokens,
            use_beam_search=request.use_beam_search,
            length_penalty=request.length_penalty,
            early_stopping=request.early_stopping,
            structured_outputs=structured_spec(request, limits),
        )
        params.check_vocab(self.engine.vocab_size)
        params.check_max_logprobs(limits.max_logprobs)
        _check_streaming(request, params)
        return params

    async def compile_grammar(self, params: SamplingParams) -> CompiledGrammar | None:
        """The request's constraint compiled off the event loop (cached; shared with concurrent
        requests), before it is admitted: an invalid schema, regex or grammar is a 400 here."""
        spec = params.structured_outputs
        return None if spec is None else await self.engine.structured_outputs.compile_async(spec)

    def fit_to_context(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt_param: str,
        grammar: CompiledGrammar | None = None,
        cache_salt: str | None = None,
    ) -> EngineInput:
        """Check prompt + max_tokens against the context; max_tokens None fills the context."""
        prompt_token_ids = params.truncate_prompt(prompt_token_ids)
        num_prompt, max_len = len(prompt_token_ids), self.engine.max_model_len
        if num_prompt == 0:
            raise InvalidRequestError(
                f"{prompt_param} must contain at least one token", param=prompt_param
            )
        if params.max_tokens is None:
            if num_prompt >= max_len:
                raise InvalidRequestError(
                    f"This model's maximum context length is {max_len} tokens. However, your "
                    f"{prompt_param} has {num_prompt} tokens, leaving no room for the completion.",
                    param=prompt_param,
                )
            params = dataclasses.replace(params, max_tokens=max_len - num_prompt)
            return EngineInput(prompt_token_ids, params, grammar, cache_salt)
        if num_prompt + params.max_tokens > max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {num_prompt + params.max_tokens} tokens ({num_prompt} in the "
                f"{prompt_param}, {params.max_tokens} in the completion). Please reduce the "
                f"length of the {prompt_param} or completion.",
                param="max_tokens",
            )
        return EngineInput(prompt_token_ids, params, grammar, cache_salt)

    def log_request(self, request_id: str, inputs: list[EngineInput]) -> None:
        if self.settings.disable_log_requests:
            return
        params = inputs[0].params
        logger.info(
            "request %s: %d prompt(s), prompt tokens %s, n=%d, max_tokens=%s, temperature=%g",
            request_id, len(inputs), [len(i.prompt_token_ids) for i in inputs],
            params.n, params.max_tokens, params.temperature,
        )  # fmt: skip

    def generate(
        self, inputs: list[EngineInput], request_id: str
    ) -> AsyncGenerator[tuple[int, RequestOutput]]:
        """Run every prompt as its own engine request; yield (prompt index, snapshot)."""
        self.check_alive()
        streams = [self._engine_stream(item, f"{request_id}-{i}") for i, item in enumerate(inputs)]
        return merge_streams(streams)

    async def _engine_stream(
        self, item: EngineInput, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """One engine request with its metrics; leaving early aborts it in the engine."""
        timer = self.metrics.start_request(len(item.prompt_token_ids))
        if item.params.max_tokens == 0 and item.params.prompt_logprobs is None:  # echo only
            yield _empty_output(item, request_id)
            return
        stream = self.engine.generate(
            item.prompt_token_ids,
            item.params,
            request_id,
            cache_salt=item.cache_salt,
            grammar=item.grammar,
        )
        finished = False
        try:
            async for output in stream:
                timer.on_output(sum(len(o.token_ids) for o in output.outputs))
                finished = output.finished
                if finished:
                    timer.on_finish([o.finish_reason for o in output.outputs])
                yield output
        finally:
            if not finished:
                timer.on_abort()
                _spawn_abort(self.engine, request_id)
            await _aclose(stream)


@dataclass(slots=True)
class ChoiceDelta:
    """What is new in one choice since the last snapshot."""

    index: int  # prompt index * n + sequence index
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    is_first: bool  # nothing was sent for this choice before
    output: CompletionOutput  # the sequence as of this snapshot
    token_start: int  # output.token_ids[token_start:] are new since the last delta

    @property
    def new_token_ids(self) -> list[int]:
        return self.output.token_ids[self.token_start :]

    @property
    def new_logprobs(self) -> list[PositionLogprobs]:
        return (self.output.logprobs or [])[self.token_start :]


class ChoiceTracker:
    """Turns cumulative engine snapshots into per-choice deltas and token counts."""

    def __init__(self, inputs: list[EngineInput]):
        self.n = inputs[0].params.n
        self.num_prompt_tokens = sum(len(item.prompt_token_ids) for item in inputs)
        self._num_chars: dict[int, int] = {}
        self._num_tokens: dict[int, int] = {}
        self._num_tokens_sent: dict[int, int] = {}
        self._finished: set[int] = set()

    @property
    def num_completion_tokens(self) -> int:
        return sum(self._num_tokens.values())

    def usage(self) -> UsageInfo:
        prompt, completion = self.num_prompt_tokens, self.num_completion_tokens
        return UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def update(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        for seq in output.outputs:
            index = prompt_index * self.n + seq.index
            self._num_tokens[index] = len(seq.token_ids)
            sent = self._num_chars.get(index)
            text = seq.text[sent or 0 :]
            is_finishing = seq.finish_reason is not None and index not in self._finished
            if not text and not is_finishing and sent is not None:
                continue
            self._num_chars[index] = len(seq.text)
            token_start = self._num_tokens_sent.get(index, 0)
            self._num_tokens_sent[index] = len(seq.token_ids)
            if is_finishing:
                self._finished.add(index)
            reason, stop = (seq.finish_reason, seq.stop_reason) if is_finishing else (None, None)
            deltas.append(ChoiceDelta(index, text, reason, stop, sent is None, seq, token_start))
        return deltas


def _empty_output(item: EngineInput, request_id: str) -> RequestOutput:
    sequences = [CompletionOutput(index=j, finish_reason="length") for j in range(item.params.n)]
    return RequestOutput(request_id, item.prompt_token_ids, sequences, finished=True)


def structured_spec(request: AnyRequest, limits: RequestLimits) -> StructuredSpec | None:
    """The request's one output constraint (guided_*, response_format or structured_outputs),
    within the limits on its size and nesting."""
    spec = spec_from_request_fields(
        guided_json=request.guided_json,
        guided_regex=request.guided_regex,
        guided_choice=request.guided_choice,
        guided_grammar=request.guided_grammar,
        guided_whitespace_pattern=request.guided_whitespace_pattern,
        guided_decoding_backend=request.guided_decoding_backend,
        response_format=request.response_format,
        structured_outputs=request.structured_outputs,
        max_json_depth=limits.max_json_schema_depth,
    )
    check_structured_limits(spec, limits)
    return spec


def reject_unsupported(request: AnyRequest) -> None:
    """400 for option combinations the server cannot serve."""
    if request.stream_options is not None and not request.stream:
        raise InvalidRequestError(
            "stream_options is only allowed when stream is true", param="stream_options"
        )


def _check_streaming(request: AnyRequest, params: SamplingParams) -> None:
    """What vLLM cannot stream: best_of ranking and prompt logprobs need the whole output."""
    if not request.stream:
        return
    if params.num_sequences > params.n and not params.use_beam_search:
        raise InvalidRequestError(
            "best_of > n is not supported with streaming: the best sequences are known only at "
            "the end",
            param="best_of",
        )
    if request.prompt_logprobs is not None:
        raise InvalidRequestError(
            "prompt_logprobs are not available when stream is true", param="prompt_logprobs"
        )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    result: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            result[int(key)] = value
        except ValueError:
            raise InvalidRequestError(
                f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
    return result


_background: set[asyncio.Task[None]] = set()  # strong refs until the abort tasks finish


def _spawn_abort(engine: AsyncEngine, request_id: str) -> None:
    """Abort in a task of its own: the caller may be inside a cancelled scope."""
    try:
        task = asyncio.get_running_loop().create_task(_abort(engine, request_id))
    except RuntimeError:  # no loop (interpreter shutdown): nothing left to abort
        return
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _abort(engine: AsyncEngine, request_id: str) -> None:
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
            await _aclose(streams[0])
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


async def _aclose(stream: object) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()
