"""InputProcessor: the checks a request passes before the engine takes it, each in one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tokenmill.config import SchedulingPolicy
from tokenmill.errors import InvalidRequestError
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import MAX_LOGPROBS, SamplingParams, keep_last_tokens
from tokenmill.structured.interface import CompiledGrammar


@dataclass(frozen=True, slots=True)
class EngineInput:
    """One request as the engine runs it: its prompt (truncated) and params, validated."""

    prompt_token_ids: list[int]
    params: SamplingParams
    grammar: CompiledGrammar | None = None  # params.structured_outputs, compiled
    cache_salt: str | None = None  # the request's prefix-cache tenant
    priority: int = 0  # lower runs first under the priority scheduling policy
    images: tuple[ImageInput, ...] = ()  # the prompt's images, at their (truncated) positions


@dataclass(frozen=True, slots=True)
class InputProcessor:
    """Validates a request against the engine's vocabulary, context and logprob cap.

    LLMEngine.add_request (the offline API, AsyncEngine) runs every request through it; the
    server runs it too, before it answers, because a stream's 200 cannot become a 400 later.
    A failed check raises InvalidRequestError naming the parameter and the numbers.
    """

    vocab_size: int
    max_model_len: int  # tokens of prompt + output
    max_logprobs: int = MAX_LOGPROBS  # most logprobs / prompt_logprobs one position may ask for
    # OpenAI's server rule (True): prompt + max_tokens must fit the context, else a 400 naming
    # max_tokens, and max_tokens None becomes the room left. The offline API (False) lets a
    # request run until the context is full (finish_reason "length").
    fit_max_tokens: bool = False
    scheduling_policy: SchedulingPolicy = "fcfs"  # under fcfs a request's priority must be 0

    def validate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prompt_param: str = "prompt",
        grammar: CompiledGrammar | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        images: tuple[ImageInput, ...] = (),
    ) -> EngineInput:
        """Every check: the params, then the prompt. `prompt_param` names the prompt in errors."""
        self.check_params(params)
        return self.validate_prompt(
            prompt_token_ids,
            params,
            prompt_param=prompt_param,
            grammar=grammar,
            cache_salt=cache_salt,
            priority=priority,
            images=images,
        )

    def check_params(self, params: SamplingParams) -> None:
        """The token ids the params name exist; logprob counts are within the cap. The server
        calls it once per request, as soon as the params are built (before any tokenizing or
        compiling), then validate_prompt for each of its prompts."""
        params.check_vocab(self.vocab_size)
        params.check_max_logprobs(self.max_logprobs)

    def validate_prompt(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prompt_param: str = "prompt",
        grammar: CompiledGrammar | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        images: tuple[ImageInput, ...] = (),
    ) -> EngineInput:
        """The prompt as the engine will run it (its last truncate_prompt_tokens tokens): not
        empty, within the context, every token id in the vocabulary."""
        prompt = params.truncate_prompt(list(prompt_token_ids), self.max_model_len)
        self._check_prompt(prompt, params, prompt_param)
        if images:
            images = _images_after_truncation(images, len(prompt_token_ids) - len(prompt))
            if params.use_beam_search:
                raise InvalidRequestError(
                    "beam search does not take images yet", param="use_beam_search"
                )
        if self.fit_max_tokens and params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(prompt))
        self.check_priority(priority)
        return EngineInput(prompt, params, grammar, cache_salt, priority, images)

    def check_priority(self, priority: int) -> None:
        """A priority other than 0 needs the priority scheduling policy (as vLLM)."""
        if priority != 0 and self.scheduling_policy != "priority":
            raise InvalidRequestError(
                f"priority is only allowed with the priority scheduling policy "
                f"(--scheduling-policy priority); got {priority} under {self.scheduling_policy}",
                param="priority",
            )

    def validate_pooling(
        self, prompt_token_ids: list[int], params: PoolingParams, prompt_param: str = "input"
    ) -> list[int]:
        """An embedding's prompt as the engine runs it (its last truncate_prompt_tokens
        tokens): not empty, within the context (all of it: nothing is generated), every
        token id in the vocabulary."""
        prompt = keep_last_tokens(
            list(prompt_token_ids), params.truncate_prompt_tokens, self.max_model_len
        )
        if not prompt:
            raise InvalidRequestError(
                f"{prompt_param} must contain at least one token", param=prompt_param
            )
        if len(prompt) > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {len(prompt)} tokens in the {prompt_param} for embedding "
                f"generation. Please reduce the length of the {prompt_param}.",
                param=prompt_param,
            )
        self.check_token_ids(prompt, prompt_param)
        return prompt

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        # min and max run in C: a long prompt costs little on whichever thread checks it
        if not token_ids or (min(token_ids) >= 0 and max(token_ids) < self.vocab_size):
            return
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        raise InvalidRequestError(
            f"{param} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}",
            param=param,
        )

    def _check_prompt(self, prompt: list[int], params: SamplingParams, prompt_param: str) -> None:
        """Not empty, fits the context (cheap, first), then its token ids (linear in it)."""
        num_prompt, max_len, max_tokens = len(prompt), self.max_model_len, params.max_tokens
        if num_prompt == 0:
            raise InvalidRequestError(
                f"{prompt_param} must contain at least one token", param=prompt_param
            )
        if self.fit_max_tokens and max_tokens is not None and num_prompt + max_tokens > max_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, you "
                f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the "
                f"{prompt_param}, {max_tokens} in the completion). Please reduce the "
                f"length of the {prompt_param} or completion.",
                param="max_tokens",
            )
        if num_prompt >= max_len and _runs_in_engine(params):
            raise InvalidRequestError(
                f"This model's maximum context length is {max_len} tokens. However, your "
                f"{prompt_param} has {num_prompt} tokens, leaving no room for the completion.",
                param=prompt_param,
            )
        self.check_token_ids(prompt, prompt_param)


def _images_after_truncation(
    images: tuple[ImageInput, ...], dropped: int
) -> tuple[ImageInput, ...]:
    """The images at their positions once the first `dropped` prompt tokens are cut; an
    image the cut would split or remove is a 400."""
    if dropped == 0:
        return images
    if images[0].offset < dropped:
        raise InvalidRequestError(
            f"truncate_prompt_tokens would cut the prompt's first image (it starts at token "
            f"{images[0].offset}; {dropped} tokens are cut)",
            param="truncate_prompt_tokens",
        )
    return tuple(image.moved(-dropped) for image in images)


def _runs_in_engine(params: SamplingParams) -> bool:
    """Whether the model runs at all: max_tokens 0 without prompt logprobs only echoes."""
    return params.max_tokens != 0 or params.prompt_logprobs is not None
