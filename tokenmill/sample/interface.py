"""What the sampler reads of each row's sequence (the engine's Request has all of it),
and what it returns. The sampler never writes into a sequence: the engine does, from
SamplerOutput."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.sample.logprobs import LogprobsTensors
    from tokenmill.structured.interface import GrammarMatcher


class SamplingRequest(Protocol):
    """One row's sequence, read-only."""

    @property
    def request_id(self) -> str: ...
    @property
    def params(self) -> SamplingParams: ...
    @property
    def prompt_token_ids(self) -> list[int]: ...
    @property
    def token_ids(self) -> list[int]: ...  # prompt + output
    @property
    def eos_token_ids(self) -> frozenset[int]: ...
    @property
    def matcher(self) -> GrammarMatcher | None: ...  # its place in its grammar, if any
    @property
    def num_prompt_tokens(self) -> int: ...
    @property
    def num_output_tokens(self) -> int: ...


@dataclass(slots=True)
class SamplerOutput:
    """One step's draws: a token per row, and the logprobs of the rows that asked."""

    token_ids: torch.Tensor  # [N] int64
    logprobs: LogprobsTensors | None  # rows `logprob_rows` of the batch, in order
    logprob_rows: list[int]
