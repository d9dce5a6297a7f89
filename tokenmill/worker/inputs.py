"""What the engine sends a worker each step, and what comes back.

A step is a list of ScheduledSequence: which sequence, which of its tokens to compute,
where their KV blocks are, whether to sample. What comes back is plain data (token ids
and logprob entries per request id), which the engine writes into its requests.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import torch

from tokenmill.multimodal.inputs import ImageInput
from tokenmill.sample.interface import SamplingRequest
from tokenmill.sample.logprobs import PositionLogprobs


class SequenceState(SamplingRequest, Protocol):
    """A sequence as the worker reads it (the engine's Request)."""

    # "LAST" | "MEAN" | "CLS": an embedding request, pooled instead of sampled; else None
    pooling_type: str | None
    images: tuple[ImageInput, ...]  # the prompt's images (their tokens take encoder rows)
    num_preemptions: int  # times its blocks were freed (what the worker kept in them is gone)

    def prompt_logprob_positions(self, start: int, num_tokens: int) -> range: ...


S = TypeVar("S", bound=SequenceState)


@dataclass(slots=True)
class ScheduledSequence(Generic[S]):
    """One sequence's part of a step, as the scheduler decided it (the engine's scheduler
    makes these with its own Request type, and the executor takes them as they are)."""

    request: S
    start: int  # first position computed this step (the tokens before it are cached)
    num_new_tokens: int
    samples: bool  # the step reaches the sequence's last token: sample the next one
    # its KV blocks, in position order (int64): for a running request the KV cache
    # manager's own table, read during the step (the next schedule may grow it)
    block_table: array[int]
    # speculative decoding: guesses of the tokens after its last one, computed as decode
    # rows after it (num_new_tokens counts them) and checked by the sampler
    draft_token_ids: list[int] = field(default_factory=list)
    # a draft model's guesses to make after the step, for the next (where it samples): the
    # scheduler set aside KV slots for them past the step's tokens
    num_lookahead: int = 0

    @property
    def is_decode(self) -> bool:
        """One decode row per token: the last token, and the guesses after it, if any."""
        return self.num_new_tokens == 1 + len(self.draft_token_ids) and self.start > 0


@dataclass(slots=True)
class ModelOutput:
    """One step's results per request id."""

    # the new tokens: the guesses the sampler confirmed (speculative decoding), then its own
    sampled_token_ids: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)  # one per new token
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    # embedding requests: (the chunk's first position, its part of the pooled vector [C],
    # float32, after the final norm: the sum of its rows for MEAN, the row itself for LAST
    # and CLS, sent by the chunk that holds it)
    pooled: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)
    # a draft model's guesses for the next step: (the token count they follow, the guesses)
    draft_token_ids: dict[str, tuple[int, list[int]]] = field(default_factory=dict)

    def update(self, other: ModelOutput) -> None:
        self.sampled_token_ids.update(other.sampled_token_ids)
        self.draft_token_ids.update(other.draft_token_ids)
        self.pooled.update(other.pooled)
        self.logprobs.update(other.logprobs)
        self.prompt_logprobs.update(other.prompt_logprobs)
