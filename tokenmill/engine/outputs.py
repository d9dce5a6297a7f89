"""What the engine hands back to its clients after each step."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Literal

import torch

from tokenmill.sample.logprobs import Logprob as Logprob  # re-exported for clients
from tokenmill.sample.logprobs import PositionLogprobs

# "error": the engine failed this request (its RequestOutput carries the message).
FinishReason = Literal["stop", "length", "abort", "error"]


SampleLogprobs = list[PositionLogprobs]  # one per generated token
PromptLogprobs = list[PositionLogprobs | None]  # one per prompt token; None for the first


@dataclass(slots=True)
class CompletionOutput:
    """One sampled sequence of a request (index i of n)."""

    index: int
    text: str = ""  # all text so far (stop string and what follows removed)
    token_ids: list[int] = field(default_factory=list)  # all generated ids so far
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop id or stop string that ended it
    cumulative_logprob: float | None = None  # sum of the tokens' logprobs, when computed
    logprobs: SampleLogprobs | None = None  # per token, when the request asked for logprobs

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def finished(self) -> bool:
        """vLLM's name of is_finished."""
        return self.is_finished

    @property
    def lora_request(self) -> None:
        return None  # (vLLM's: no LoRA adapters here)


@dataclass(slots=True)
class RequestOutput:
    """A snapshot of one request after a step: cumulative text and ids of each sequence."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    prompt: str | None = None  # the prompt text, when the client gave text
    prompt_logprobs: PromptLogprobs | None = None  # when the request asked for them
    error: str | None = None  # set (with finished=True) when the engine failed this request
    # time.monotonic() when the engine first scheduled it (its queue time ends); None before
    first_scheduled_time: float | None = None

    # vLLM's attributes that mean nothing here: no per-request stats object, no LoRA
    # adapters, no encoder-decoder models
    metrics = None
    lora_request = None
    encoder_prompt = None
    encoder_prompt_token_ids = None

    def add(self, later: RequestOutput, aggregate: bool = True) -> None:
        """Merge a later output of the same request into this one, in place (vLLM's
        RequestOutput.add): aggregate, for DELTA outputs, appends each sequence's news to
        it, as if the two were one delta; else a later sequence replaces its own."""
        mine = {c.index: c for c in self.outputs}
        for new in later.outputs:
            seq = mine.get(new.index)
            if seq is None or not aggregate:
                if seq is not None:
                    self.outputs.remove(seq)
                self.outputs.append(new)
                continue
            seq.text += new.text
            seq.token_ids.extend(new.token_ids)
            if seq.logprobs is None:
                seq.logprobs = new.logprobs
            elif new.logprobs is not None:
                seq.logprobs.extend(new.logprobs)
            seq.cumulative_logprob = new.cumulative_logprob
            seq.finish_reason, seq.stop_reason = new.finish_reason, new.stop_reason
        self.outputs.sort(key=lambda c: c.index)
        self.finished = later.finished
        self.num_cached_tokens = later.num_cached_tokens
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs
        self.error = later.error
        if self.first_scheduled_time is None:
            self.first_scheduled_time = later.first_scheduled_time


@dataclass(slots=True)
class PoolingOutput:
    """An embedding: the prompt's pooled last hidden states (float32 [C] or [dimensions])."""

    data: torch.Tensor

    @property
    def embedding(self) -> list[float]:
        return self.data.tolist()


@dataclass(slots=True)
class PoolingRequestOutput:
    """What an embedding request gets back, once (vLLM's PoolingRequestOutput)."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: PoolingOutput | None  # None when it failed or was aborted
    finished: bool = True
    num_cached_tokens: int = 0
    prompt: str | None = None
    error: str | None = None
    first_scheduled_time: float | None = None


AnyOutput = RequestOutput | PoolingRequestOutput


def take_newest(
    item: AnyOutput | BaseException, queue: asyncio.Queue[AnyOutput | BaseException], delta: bool
) -> AnyOutput | BaseException:
    """A request's first queued item and what queued after it, as one: a newer cumulative
    snapshot supersedes an older one; DELTA outputs fold into one (RequestOutput.add).
    Stops at a finished output or an error."""
    while not queue.empty() and isinstance(item, RequestOutput) and not item.finished:
        newer = queue.get_nowait()
        if delta and isinstance(newer, RequestOutput):
            item.add(newer)
        else:
            item = newer
    return item
