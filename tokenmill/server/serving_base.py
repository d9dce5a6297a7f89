"""ServingBase: what the Completions and Chat handlers share on their way to the engine."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from tokenmill.engine.client import EngineClient
from tokenmill.engine.input_processor import EngineInput, InputProcessor
from tokenmill.engine.outputs import RequestOutput
from tokenmill.errors import InvalidRequestError, NotFoundError, ServiceUnavailableError
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.sampling_params import SamplingParams
from tokenmill.server import streams
from tokenmill.server.choices import ChoiceTracker
from tokenmill.server.logprobs import LogprobFormatter
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.params import AnyRequest, to_sampling_params
from tokenmill.server.protocol import REQUEST_ID_PATTERN
from tokenmill.server.settings import ServerSettings
from tokenmill.structured import CompiledGrammar
from tokenmill.tokenizer.detokenizer import TokenTexts

logger = logging.getLogger(__name__)

T = TypeVar("T")
RequestIds = tuple[str, str]  # (the response's id, the engine's)


def request_ids(prefix: str, client_id: str | None) -> RequestIds:
    """A request's ids as vLLM names it: `prefix-` and the client's id (its X-Request-Id
    header, else the body's request_id) or a new one. A client's id need not be unique, so
    the engine's id adds a random part to it."""
    if not client_id:
        new = f"{prefix}-{uuid.uuid4().hex}"
        return new, new
    if not re.fullmatch(REQUEST_ID_PATTERN, client_id):  # (the header; the body's is checked)
        raise InvalidRequestError(
            "X-Request-Id must be 1 to 256 visible ASCII characters", param="X-Request-Id"
        )
    given = f"{prefix}-{client_id}"
    return given, f"{given}-{uuid.uuid4().hex[:12]}"


class ServingBase:
    """Model names, admission, params and prompt validation, and the engine streams."""

    def __init__(
        self,
        engine: EngineClient,
        settings: ServerSettings,
        metrics: ServerMetrics,
        executor: ThreadPoolExecutor,
    ):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.executor = executor  # one thread: tokenizing and templates stay off the event loop
        self.logprobs = LogprobFormatter(TokenTexts(engine.tokenizer))
        # the engine's checks, with the server's logprob cap and OpenAI's max_tokens rule
        self.input_processor = InputProcessor(
            engine.vocab_size,
            engine.max_model_len,
            settings.limits.max_logprobs,
            fit_max_tokens=True,
            scheduling_policy=engine.scheduling_policy,
        )

    def tracker(self, inputs: list[EngineInput]) -> ChoiceTracker:
        """Per-choice deltas and the usage of one request's engine streams."""
        return ChoiceTracker(inputs, self.settings.prompt_tokens_details)

    def check_model(self, name: str | None) -> str:
        """The served name to report back; 404 for a name this server does not serve."""
        names = self.settings.served_model_names
        if name is None:
            return names[0]
        if name not in names:
            raise NotFoundError(f"The model `{name}` does not exist.", param="model")
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

    async def sampling_params(
        self,
        request: AnyRequest,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None,
    ) -> SamplingParams:
        """The request's SamplingParams, checked, with its bad_words tokenized (off the event
        loop); its priority checked against the scheduling policy."""
        params = to_sampling_params(
            request,
            self.settings.limits,
            self.input_processor,
            max_tokens,
            logprobs,
            prompt_logprobs,
            self.engine.sampling_defaults,
        )
        self.input_processor.check_priority(request.priority)
        if params.bad_words:
            params = await self.run_blocking(params.resolve_bad_words, self.engine.tokenizer.encode)
            params.check_vocab(self.engine.vocab_size)
        return params

    def tokens_as_ids(self, request: AnyRequest) -> bool:
        """Whether logprobs name tokens "token_id:{id}": the request's choice, else the
        server's --return-tokens-as-token-ids."""
        if request.return_tokens_as_token_ids is None:
            return self.settings.return_tokens_as_token_ids
        return request.return_tokens_as_token_ids

    async def compile_grammar(self, params: SamplingParams) -> CompiledGrammar | None:
        """The request's constraint compiled off the event loop (cached; shared with concurrent
        requests), before it is admitted: an invalid schema, regex or grammar is a 400 here."""
        spec = params.structured_outputs
        return None if spec is None else await self.engine.compile_grammar(spec)

    def to_engine_input(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt_param: str,
        grammar: CompiledGrammar | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        images: tuple[ImageInput, ...] = (),
    ) -> EngineInput:
        """One prompt validated (params already checked); max_tokens None fills the context."""
        return self.input_processor.validate_prompt(
            prompt_token_ids,
            params,
            prompt_param=prompt_param,
            grammar=grammar,
            cache_salt=cache_salt,
            priority=priority,
            images=images,
        )

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
        return streams.generate(self.engine, self.metrics, inputs, request_id)


# OpenAI's and vLLM's fields tokenmill cannot honour: the values that mean "not used"
# (what clients send when they do not use it), and what a 400 says otherwise
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "kv_transfer_params": ((None,), "is not supported by tokenmill yet"),
    "vllm_xargs": ((None, {}), "is not supported by tokenmill yet"),
    "logits_processors": (
        (None, []),
        "is not supported: tokenmill runs no code a request names (vLLM needs "
        "--logits-processor-pattern for it); logit_bias, allowed_token_ids, bad_words and "
        "structured outputs shape the logits instead",
    ),
    "structural_tag": (
        (None,),
        "is not supported yet: tools (whose calls xgrammar's structural tags hold to their "
        "schemas) or a structured_outputs constraint instead",
    ),
    "functions": ((None,), "is OpenAI's deprecated form of tools: send tools instead"),
    "function_call": (
        (None,),
        "is OpenAI's deprecated form of tool_choice: send tools and tool_choice instead",
    ),
    "audio": ((None,), "is not supported: this server's outputs are text"),
    "modalities": ((None, ["text"]), "is not supported: this server's outputs are text"),
    "web_search_options": ((None,), "is not supported: tokenmill runs no search"),
    "prediction": (
        (None,),
        "(predicted outputs) is not supported yet; --speculative-config "
        '\'{"method": "ngram"}\' speeds up outputs that copy the prompt',
    ),
    "verbosity": ((None, "medium"), "is not supported: no served model takes a verbosity"),
    "prompt_embeds": ((None,), "is not supported yet: send the prompt's text or token ids"),
}


def usage_in_chunks(request: Any, forced: bool = False) -> tuple[bool, bool]:
    """(usage in a last chunk, usage in every chunk): stream_options' include_usage (or
    --enable-force-include-usage), and continuous_usage_stats with it (as vLLM)."""
    options = request.stream_options
    final = forced or bool(options and options.include_usage)
    return final, final and bool(options and options.continuous_usage_stats)


def check_unsupported_fields(request: Any) -> None:
    """A 400 naming the first OpenAI or vLLM field the request uses that tokenmill cannot
    honour (a field only sent at its "not used" value passes)."""
    for name, (unused, why) in _UNSUPPORTED.items():
        if getattr(request, name, None) not in unused:
            raise InvalidRequestError(f"{name} {why}", param=name)


def prompt_list(prompt: Any, param: str) -> list[Any]:
    """A prompt field (a text, token ids, or a list of either) as its list of prompts; an
    empty list is a 400 naming `param`."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError(f"{param} must not be empty", param=param)
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return list(prompt)
