"""POST /v1/completions: prompts to engine requests, engine outputs to OpenAI responses."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

from starlette.responses import JSONResponse, Response

from tokenmill.engine.input_processor import EngineInput
from tokenmill.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.choices import ChoiceDelta
from tokenmill.server.limits import check_prompt_limits
from tokenmill.server.protocol import (
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionStreamResponse,
    PromptLogprobsList,
)
from tokenmill.server.serving_base import (
    RequestIds,
    ServingBase,
    check_unsupported_fields,
    prompt_list,
    request_ids,
    usage_in_chunks,
)
from tokenmill.server.sse import EventStreamResponse, sse_event
from tokenmill.structured import CompiledGrammar
from tokenmill.tokenizer.fim import (
    MARKER_SPELLINGS,
    FimOrder,
    FimTokens,
    detect_fim,
    leading_special_ids,
)


@dataclasses.dataclass(frozen=True, slots=True)
class FimExtras:
    """What /infill adds to a FIM prompt beyond prefix and suffix."""

    files: Sequence[tuple[str, str]] = ()  # (filename, text) before the FIM prefix
    middle: str = ""  # text already in the middle, after the middle marker
    order: FimOrder = "psm"
    suffix_param: str = "suffix"  # the field a 400 names (the suffix's name in the body)


class CompletionServer(ServingBase):
    """Serves the legacy Completions API (and fill-in-the-middle: `suffix`, /infill)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # read from the tokenizer once, now (not on the event loop later): the model's FIM
        # markers (None: not a FIM model) and the special tokens its encoding starts with
        tokenizer = self.engine.tokenizer
        get_vocab = getattr(tokenizer.hf, "get_vocab", None)
        self.fim_tokens: FimTokens | None = None if get_vocab is None else detect_fim(get_vocab())
        self._leading_ids = leading_special_ids(tokenizer.encode)

    def require_fim(self, param: str) -> FimTokens:
        """The model's FIM markers; a 400 naming `param` when it has none."""
        fim = self.fim_tokens
        if fim is None:
            raise InvalidRequestError(
                f"{param} needs a fill-in-the-middle model, and the model "
                f"{self.engine.model_name} has no FIM tokens in its vocabulary (looked for "
                f"{MARKER_SPELLINGS} and their suffix/middle markers)",
                param=param,
            )
        return fim

    async def create(self, request: CompletionRequest, header_id: str | None = None) -> Response:
        model = self.check_model(request.model)
        check_unsupported_fields(request)
        self.check_alive()
        request_id, engine_id = request_ids("cmpl", header_id or request.request_id)
        inputs, prompt_texts = await self.to_engine_inputs(request)
        self.check_admission()
        self.log_request(request_id, inputs)
        echoes = prompt_texts if request.echo else [""] * len(inputs)
        if request.stream:
            return EventStreamResponse(
                self._stream(request, (request_id, engine_id), model, inputs, echoes)
            )
        response = await self._collect(request, (request_id, engine_id), model, inputs, echoes)
        return JSONResponse(response.model_dump(mode="json"))

    async def to_engine_inputs(
        self, request: CompletionRequest, fim_extras: FimExtras | None = None
    ) -> tuple[list[EngineInput], list[str]]:
        """The request as engine inputs (one per prompt) and each prompt's text (for echo).

        With `suffix` (or fim_extras, from /infill) each prompt is the prefix of a
        fill-in-the-middle prompt, and the model's FIM end tokens stop generation."""
        fim = None
        if request.suffix is not None or fim_extras is not None:
            fim = self._check_fim_options(request, fim_extras or FimExtras())
        check_prompt_limits(request.prompt, self.settings.limits)
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is None and request.echo:
            prompt_logprobs = request.logprobs  # echo + logprobs scores the prompt too
        max_tokens = request.max_tokens  # 16 when unset, unless the model says otherwise
        if "max_tokens" not in request.model_fields_set:
            max_tokens = self.engine.sampling_defaults.get("max_tokens", max_tokens)
        params = await self.sampling_params(request, max_tokens, request.logprobs, prompt_logprobs)
        if fim is not None:
            params = self._fim_params(params, fim)
        grammar = await self.compile_grammar(params)
        if fim is not None:
            extras = fim_extras or FimExtras()
            return await self.run_blocking(
                self._tokenize_fim, request, params, grammar, fim, extras
            )
        return await self.run_blocking(self._tokenize, request, params, grammar)

    def _check_fim_options(self, request: CompletionRequest, extras: FimExtras) -> FimTokens:
        fim = self.require_fim(extras.suffix_param)
        prompt = request.prompt
        num_chars = len(request.suffix or "") + len(extras.middle)
        num_chars += sum(len(name) + len(text) for name, text in extras.files)
        num_chars += len(prompt) if isinstance(prompt, str) else 0
        limit = self.settings.limits.max_input_chars
        if num_chars > limit:
            raise InvalidRequestError(
                f"the prompt and suffix hold {num_chars} characters, over the limit of {limit}",
                param=extras.suffix_param,
            )
        if request.echo and request.logprobs is not None:
            raise InvalidRequestError(
                "echo with logprobs is not supported together with suffix: the prompt the "
                "model sees is the whole fill-in-the-middle sequence, not the echoed prefix",
                param="echo",
            )
        if request.truncate_prompt_tokens is not None:
            raise InvalidRequestError(
                "truncate_prompt_tokens is not supported together with suffix: cutting the "
                "fill-in-the-middle prompt's start would drop its prefix marker",
                param="truncate_prompt_tokens",
            )
        return fim

    def _fim_params(self, params: SamplingParams, fim: FimTokens) -> SamplingParams:
        """The request's stop token ids plus the model's FIM end tokens."""
        vocab_size = self.engine.vocab_size
        ends = [i for i in fim.end_ids if i < vocab_size and i not in params.stop_token_ids]
        if not ends:
            return params
        return dataclasses.replace(params, stop_token_ids=[*params.stop_token_ids, *ends])

    def _tokenize_fim(
        self,
        request: CompletionRequest,
        params: SamplingParams,
        grammar: CompiledGrammar | None,
        fim: FimTokens,
        extras: FimExtras,
    ) -> tuple[list[EngineInput], list[str]]:
        """Each prompt as the prefix of a FIM prompt (runs in the tokenizer thread); its text
        (the prefix alone) is what echo shows."""
        tokenizer = self.engine.tokenizer

        def encode(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        leading = self._leading_ids if request.add_special_tokens else []
        suffix_ids = encode(request.suffix or "")
        extra_ids = fim.extra_context(extras.files, encode)
        middle_ids = encode(extras.middle) if extras.middle else []
        prompts = prompt_list(request.prompt, "prompt")  # an empty text: an empty prefix
        inputs, texts = [], []
        for item in prompts:
            if isinstance(item, str):
                prefix_ids, text = encode(item), item
            else:
                prefix_ids = list(item)
                if leading and prefix_ids[: len(leading)] == leading:
                    prefix_ids = prefix_ids[len(leading) :]  # its BOS goes first, once
                text = tokenizer.decode(prefix_ids) if request.echo else ""
            ids = fim.build(
                prefix_ids,
                suffix_ids,
                order=extras.order,
                leading_ids=leading,
                extra_ids=extra_ids,
                middle_ids=middle_ids,
            )
            inputs.append(self._engine_input(request, ids, params, grammar))
            texts.append(text)
        return inputs, texts

    def _engine_input(
        self,
        request: CompletionRequest,
        ids: list[int],
        params: SamplingParams,
        grammar: CompiledGrammar | None,
    ) -> EngineInput:
        return self.to_engine_input(
            ids, params, "prompt", grammar, request.cache_salt, request.priority
        )

    def _tokenize(
        self, request: CompletionRequest, params: SamplingParams, grammar: CompiledGrammar | None
    ) -> tuple[list[EngineInput], list[str]]:
        """Each prompt tokenized and validated, and its text (runs in the tokenizer thread)."""
        tokenizer = self.engine.tokenizer
        if request.prompt == "":
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        inputs, texts = [], []
        for item in prompt_list(request.prompt, "prompt"):
            if isinstance(item, str):
                ids = tokenizer.encode(item, add_special_tokens=request.add_special_tokens)
            else:
                ids = list(item)
            inputs.append(self._engine_input(request, ids, params, grammar))
            text = item if isinstance(item, str) else ""
            if request.echo and not isinstance(item, str):
                text = tokenizer.decode(inputs[-1].prompt_token_ids)
            texts.append(text)
        return inputs, texts

    async def _collect(
        self,
        request: CompletionRequest,
        ids: RequestIds,
        model: str,
        inputs: list[EngineInput],
        echoes: list[str],
    ) -> CompletionResponse:
        request_id, engine_id = ids
        tracker = self.tracker(inputs)
        finals: dict[int, RequestOutput] = {}
        async with aclosing(self.generate(inputs, engine_id)) as outputs:
            async for i, output in outputs:
                tracker.update(i, output)
                finals[i] = output
        choices = [
            self._choice(request, i * tracker.n + seq.index, echoes[i], finals[i], seq)
            for i in sorted(finals)
            for seq in finals[i].outputs
        ]
        return CompletionResponse(
            id=request_id, model=model, choices=choices, usage=tracker.usage()
        )

    def _choice(
        self,
        request: CompletionRequest,
        index: int,
        echo: str,
        output: RequestOutput,
        seq: CompletionOutput,
    ) -> CompletionResponseChoice:
        logprobs = None
        if request.logprobs is not None:
            ids, entries = _prompt_part(output) if request.echo else ([], [])
            logprobs = self.logprobs.completion(
                [*ids, *seq.token_ids],
                [*entries, *(seq.logprobs or [])],
                as_ids=self.tokens_as_ids(request),
            )
        with_ids = request.return_token_ids
        return CompletionResponseChoice(
            index=index,
            text=echo + seq.text,
            logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            prompt_logprobs=(
                self.logprobs.prompt(output.prompt_logprobs)
                if request.prompt_logprobs is not None
                else None
            ),
            prompt_token_ids=list(output.prompt_token_ids) if with_ids else None,
            token_ids=list(seq.token_ids) if with_ids else None,
        )

    async def _stream(
        self,
        request: CompletionRequest,
        ids: RequestIds,
        model: str,
        inputs: list[EngineInput],
        echoes: list[str],
    ) -> AsyncIterator[str]:
        request_id, engine_id = ids
        created = int(time.time())
        include_usage, continuous = usage_in_chunks(request, self.settings.force_include_usage)
        exclude = None if include_usage else {"usage"}
        tracker = self.tracker(inputs)
        num_chars_sent: dict[int, int] = {}  # per choice, for text_offset
        prompt_logprobs_sent: set[int] = set()  # the choices that have had them
        async with aclosing(self.generate(inputs, engine_id)) as outputs:
            async for i, output in outputs:
                for delta in tracker.update(i, output):
                    text = (echoes[i] if delta.is_first else "") + delta.text
                    offset = num_chars_sent.get(delta.index, 0)
                    num_chars_sent[delta.index] = offset + len(text)
                    with_ids = request.return_token_ids
                    choice = CompletionResponseChoice(
                        index=delta.index,
                        text=text,
                        logprobs=self._delta_logprobs(request, output, delta, offset),
                        finish_reason=delta.finish_reason,
                        stop_reason=delta.stop_reason,
                        prompt_token_ids=(
                            list(output.prompt_token_ids) if with_ids and delta.is_first else None
                        ),
                        token_ids=delta.new_token_ids if with_ids else None,
                        prompt_logprobs=self._prompt_logprobs_once(
                            request, output, delta.index, prompt_logprobs_sent
                        ),
                    )
                    chunk = CompletionStreamResponse(
                        id=request_id, created=created, model=model, choices=[choice],
                        usage=tracker.usage() if continuous else None,
                    )  # fmt: skip
                    yield sse_event(chunk, exclude=exclude)
        if include_usage:
            chunk = CompletionStreamResponse(
                id=request_id, created=created, model=model, choices=[], usage=tracker.usage()
            )
            yield sse_event(chunk)

    def _prompt_logprobs_once(
        self, request: CompletionRequest, output: RequestOutput, index: int, sent: set[int]
    ) -> PromptLogprobsList | None:
        """A choice's prompt logprobs in its first chunk that has them (once)."""
        if request.prompt_logprobs is None or index in sent or output.prompt_logprobs is None:
            return None
        sent.add(index)
        return self.logprobs.prompt(output.prompt_logprobs)

    def _delta_logprobs(
        self, request: CompletionRequest, output: RequestOutput, delta: ChoiceDelta, offset: int
    ) -> CompletionLogProbs | None:
        """Logprobs of the tokens new in this chunk (the prompt's too in the first, with echo)."""
        if request.logprobs is None:
            return None
        ids, entries = _prompt_part(output) if request.echo and delta.is_first else ([], [])
        return self.logprobs.completion(
            [*ids, *delta.new_token_ids],
            [*entries, *delta.new_logprobs],
            offset,
            as_ids=self.tokens_as_ids(request),
        )


def _prompt_part(output: RequestOutput) -> tuple[list[int], list[PositionLogprobs | None]]:
    """The prompt's token ids and logprob entries, for echo (the first entry is None)."""
    ids = list(output.prompt_token_ids)
    entries = list(output.prompt_logprobs or [None] * len(ids))
    return ids, entries
