"""Beam search over per-beam top-K logprobs, with Hugging Face transformers' semantics.

The engine runs it from the front (as vLLM v1 does): each step every running
beam is one engine request of a single token whose top-K logprobs (the raw
model distribution) are the candidates; prefix caching keeps the shared prefix
from being recomputed. Per step, as transformers' `_beam_search` does:

1. Candidates are (beam, token) pairs scored by the beam's cumulative logprob plus
   the token's; the best K = max(2, 1 + #stop ids) * width of them are kept.
2. Among the best `width`, those that end (a stop id, or max_tokens reached) join
   the finished hypotheses with score = cumulative logprob / length ** length_penalty
   (length = generated tokens, the stop token included); the best `width` stay.
3. The best `width` candidates that did not end are the next running beams.
4. The search ends when every candidate ended, max_tokens is reached, or per
   early_stopping: True - `width` hypotheses are finished; False - the best running
   beam, scored at its current length, cannot beat the worst finished one;
   "never" - the same, but with length_penalty > 0 scored at max_tokens.

vLLM V0 used the same rules with the prompt counted in the length; tokenmill
follows transformers (the length of the generated part).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.outputs import PositionLogprobs
from tokenmill.sampling_params import EarlyStopping

_NO_SCORE = -1.0e9  # transformers' stand-in for "no finished hypothesis in this slot"


@dataclass(slots=True)
class Beam:
    """One hypothesis: generated tokens, their summed logprob, and per-token logprob entries."""

    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    is_stopped: bool = False  # ended on a stop token (else on length)
    score: float = 0.0  # length-penalised; set when finished


@dataclass(slots=True)
class _Candidate:
    score: float  # the beam's cumulative logprob plus this token's
    beam: int  # index into the running beams
    token_id: int
    entry: PositionLogprobs  # the logprobs of this position, the chosen token first


class BeamSearch:
    """State of one request's beam search; `step()` consumes one round of candidates."""

    def __init__(
        self,
        width: int,
        max_tokens: int,
        stop_token_ids: set[int],
        length_penalty: float = 1.0,
        early_stopping: EarlyStopping = False,
        min_tokens: int = 0,
    ):
        self.width = width
        self.max_tokens = max_tokens
        self.stop_token_ids = stop_token_ids
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.min_tokens = min_tokens
        self.running: list[Beam] = [Beam()]
        self.finished: list[Beam] = []  # best first, at most `width`
        self.is_done = max_tokens == 0
        self._can_improve = True

    @property
    def num_candidates(self) -> int:
        """Top-K logprobs each beam needs per step."""
        return max(2, 1 + len(self.stop_token_ids)) * self.width

    @property
    def num_generated(self) -> int:
        return len(self.running[0].token_ids) if self.running else 0

    def step(self, candidates: list[list[tuple[int, float, PositionLogprobs]]]) -> None:
        """candidates[i]: (token id, logprob, position entry) of running beam i's top tokens."""
        length = self.num_generated + 1
        pool = self._top_candidates(candidates, length)
        ends = [self._ends(c.token_id, length) for c in pool]
        if self._can_improve and not (self.early_stopping is True and self._is_full):
            for candidate, ended in zip(pool[: self.width], ends, strict=False):
                if ended:
                    self._add_finished(candidate, length)
        self.running = [
            self._extend(c, is_stopped=False) for c, e in zip(pool, ends, strict=True) if not e
        ][: self.width]
        self._can_improve = self._can_improve and self._improvable(length)
        self.is_done = (
            not self._can_improve
            or (self.early_stopping is True and self._is_full)
            or not self.running
            or length >= self.max_tokens
        )

    def best(self, n: int) -> list[Beam]:
        """The n best finished hypotheses (running ones fill in if too few finished)."""
        ranked = list(self.finished)
        if len(ranked) < n:
            extra = [self._finish(b, b.is_stopped) for b in self.running]
            ranked += sorted(extra, key=lambda b: b.score, reverse=True)
        return ranked[:n]

    @property
    def _is_full(self) -> bool:
        return len(self.finished) >= self.width

    def _top_candidates(
        self, candidates: list[list[tuple[int, float, PositionLogprobs]]], length: int
    ) -> list[_Candidate]:
        pool = []
        for i, (beam, options) in enumerate(zip(self.running, candidates, strict=True)):
            for token_id, logprob, entry in options:
                if length <= self.min_tokens and token_id in self.stop_token_ids:
                    continue  # like transformers' min_new_tokens: stop ids score -inf until then
                pool.append(_Candidate(beam.cumulative_logprob + logprob, i, token_id, entry))
        pool.sort(key=lambda c: (-c.score, c.beam, c.token_id))
        return pool[: self.num_candidates]

    def _ends(self, token_id: int, length: int) -> bool:
        return token_id in self.stop_token_ids or length >= self.max_tokens

    def _extend(self, candidate: _Candidate, is_stopped: bool) -> Beam:
        parent = self.running[candidate.beam]
        return Beam(
            token_ids=[*parent.token_ids, candidate.token_id],
            cumulative_logprob=candidate.score,
            logprobs=[*parent.logprobs, candidate.entry],
            is_stopped=is_stopped,
        )

    def _add_finished(self, candidate: _Candidate, length: int) -> None:
        stopped = candidate.token_id in self.stop_token_ids
        beam = self._finish(self._extend(candidate, stopped), stopped)
        self.finished.append(beam)
        self.finished.sort(key=lambda b: b.score, reverse=True)
        del self.finished[self.width :]

    def _finish(self, beam: Beam, is_stopped: bool) -> Beam:
        beam.is_stopped = is_stopped
        length = max(1, len(beam.token_ids))
        beam.score = beam.cumulative_logprob / (length**self.length_penalty)
        return beam

    def _improvable(self, length: int) -> bool:
        """Can the best running beam still beat the worst finished hypothesis?"""
        if not self.running:
            return False
        if not self._is_full:
            return True
        best_length = length
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_tokens
        best_possible = self.running[0].cumulative_logprob / (best_length**self.length_penalty)
        return best_possible > self.finished[-1].score
