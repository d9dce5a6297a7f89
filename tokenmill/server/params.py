"""OpenAI request fields to SamplingParams: the one place they are built, after the caps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenmill.engine.input_processor import InputProcessor
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.limits import RequestLimits, check_sampling_limits, check_structured_limits
from tokenmill.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenmill.structured import StructuredSpec, spec_from_request_fields

AnyRequest = CompletionRequest | ChatCompletionRequest


def to_sampling_params(
    request: AnyRequest,
    limits: RequestLimits,
    input_processor: InputProcessor,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None,
    defaults: Mapping[str, Any],
) -> SamplingParams:
    """The request as SamplingParams (range checks live there), checked against the server's
    caps first (n may be huge) and the engine's after.

    max_tokens and the logprob counts come from the fields each endpoint names its own way
    (max_tokens None: the endpoint's request left it unset). `defaults` (the model's
    generation config) fill the fields the request did not send.
    """
    check_sampling_limits(request, limits, input_processor.vocab_size)
    reject_unsupported(request)
    sent = request.model_fields_set

    def value(name: str, given: Any, default: Any) -> Any:
        if name in sent and given is not None:
            return given
        return defaults.get(name, default if given is None else given)

    params = SamplingParams(
        n=request.n,
        temperature=value("temperature", request.temperature, 1.0),
        top_p=value("top_p", request.top_p, 1.0),
        top_k=value("top_k", request.top_k, -1),
        min_p=value("min_p", request.min_p, 0.0),
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=value("repetition_penalty", request.repetition_penalty, 1.0),
        logit_bias=_logit_bias(request.logit_bias),
        seed=request.seed,
        stop=[request.stop] if isinstance(request.stop, str) else list(request.stop or []),
        stop_token_ids=list(request.stop_token_ids or []),
        include_stop_str_in_output=request.include_stop_str_in_output,
        ignore_eos=request.ignore_eos,
        max_tokens=defaults.get("max_tokens") if max_tokens is None else max_tokens,
        min_tokens=request.min_tokens,
        skip_special_tokens=request.skip_special_tokens,
        spaces_between_special_tokens=request.spaces_between_special_tokens,
        best_of=request.best_of,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        allowed_token_ids=request.allowed_token_ids,
        bad_words=request.bad_words or None,
        truncate_prompt_tokens=request.truncate_prompt_tokens,
        use_beam_search=request.use_beam_search,
        length_penalty=request.length_penalty,
        early_stopping=request.early_stopping,
        structured_outputs=structured_spec(request, limits),
    )
    input_processor.check_params(params)
    _check_streaming(request, params)
    return params


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
    """What cannot stream: best_of ranking needs the whole output. (Prompt logprobs stream in
    the first chunk that follows the prefill, where vLLM refuses any but 0.)"""
    if not request.stream:
        return
    if params.num_sequences > params.n and not params.use_beam_search:
        raise InvalidRequestError(
            "best_of > n is not supported with streaming: the best sequences are known only at "
            "the end",
            param="best_of",
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
