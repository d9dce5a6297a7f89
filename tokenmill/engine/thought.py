"""A reasoning model's thought, followed token by token: the request's constraint (structured
output, tool calls) applies to the answer after the thought, not to the thought; a thinking
budget (vLLM's thinking_token_budget) ends a thought that runs too long by forcing its end
marker.

The sampler sees the request's `matcher`; `Thought.matcher` is what it should be now: none
while thinking, the forced end marker once the budget is spent, the constraint after. Before
the first token (when the prompt leaves the model outside a thought), the constraint plus the
one-token start marker: a thought may open only there.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

from tokenmill.structured.interface import GrammarMatcher
from tokenmill.tools.reasoning import ReasoningMarkers


class Phase(enum.Enum):
    OPENING = enum.auto()  # the first token may open a thought
    THINKING = enum.auto()
    ANSWERING = enum.auto()


class Thought:
    """One sequence's thought: its phase, its tokens, and the matcher the sampler should use."""

    def __init__(
        self,
        markers: ReasoningMarkers,
        in_thought: bool,
        grammar: GrammarMatcher | None,
        budget: int | None,
    ):
        self.markers, self.grammar, self.budget = markers, grammar, budget
        self.num_tokens = 0  # tokens of the thought so far (its markers excluded)
        self._recent: list[int] = []  # the thought's last tokens, to find the end marker
        self._forcing: list[int] = []  # end-marker tokens still to force
        if in_thought:
            self.phase = Phase.THINKING
        elif len(markers.start_ids) == 1:
            self.phase = Phase.OPENING
        else:
            self.phase = Phase.ANSWERING  # a multi-token start cannot be told from the answer
        if self.phase is Phase.THINKING and budget == 0:
            self._forcing = list(markers.end_ids)

    @property
    def matcher(self) -> GrammarMatcher | None:
        if self.phase is Phase.THINKING:
            return ForcedTokens(self._forcing[0]) if self._forcing else None
        if self.phase is Phase.OPENING and self.grammar is not None:
            return AlsoAllowed(self.grammar, self.markers.start_ids[0])
        return self.grammar

    def accept(self, token_id: int) -> bool:
        """Follow one output token; False when the constraint does not allow it."""
        if self.phase is Phase.OPENING:
            if token_id == self.markers.start_ids[0]:
                self._enter_thought()
                return True
            self.phase = Phase.ANSWERING
        if self.phase is Phase.ANSWERING:
            return self.grammar is None or self.grammar.accept_token(token_id)
        return self._think(token_id)

    def _enter_thought(self) -> None:
        self.phase = Phase.THINKING
        if self.budget == 0:
            self._forcing = list(self.markers.end_ids)

    def _think(self, token_id: int) -> bool:
        if self._forcing:
            if token_id != self._forcing[0]:
                return False
            self._forcing.pop(0)
        end = self.markers.end_ids
        self._recent = (self._recent + [token_id])[-len(end) :]
        if tuple(self._recent) == end:
            self.phase, self._forcing = Phase.ANSWERING, []
            return True
        self.num_tokens += 1
        if self.budget is not None and self.num_tokens >= self.budget and not self._forcing:
            self._forcing = _rest_of(end, self._recent)
        return True


def _rest_of(marker: Sequence[int], recent: Sequence[int]) -> list[int]:
    """The marker's tokens still to write, after any of its start already written."""
    for size in range(min(len(marker) - 1, len(recent)), 0, -1):
        if tuple(recent[-size:]) == tuple(marker[:size]):
            return list(marker[size:])
    return list(marker)


def _set_bit(bitmask: torch.Tensor, row: int, token_id: int) -> None:
    word, bit = divmod(token_id, 32)
    value = (int(bitmask[row, word]) & 0xFFFFFFFF) | (1 << bit)
    bitmask[row, word] = value - (1 << 32) if value >= 1 << 31 else value


class ForcedTokens:
    """A matcher that allows one token (a forced marker token)."""

    def __init__(self, token_id: int):
        self.token_id = token_id

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row].zero_()
        _set_bit(bitmask, row, self.token_id)

    def accept_token(self, token_id: int) -> bool:
        return token_id == self.token_id

    def is_terminated(self) -> bool:
        return False

    def rollback(self, num_tokens: int) -> None:
        raise NotImplementedError


class AlsoAllowed:
    """A constraint's matcher that also allows one more token (a thought's start marker)."""

    def __init__(self, inner: GrammarMatcher, token_id: int):
        self.inner, self.token_id = inner, token_id

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.inner.fill_bitmask(bitmask, row)
        _set_bit(bitmask, row, self.token_id)

    def accept_token(self, token_id: int) -> bool:
        return token_id == self.token_id or self.inner.accept_token(token_id)

    def is_terminated(self) -> bool:
        return False

    def rollback(self, num_tokens: int) -> None:
        raise NotImplementedError
