"""Speculator: how many tokens each running request guesses this step, and what the
guesses earned.

A guess pays when the tokens it is expected to add outweigh the extra rows it costs.
For each request the speculator keeps its guesses' acceptance rate `a` (the chance a
guess holds once the ones before it did; a decaying count, starting from the engine's
rate over all requests), so k guesses are expected to add (1 - a^(k+1)) / (1 - a)
tokens to the one the step gives anyway. What a row costs it learns from the decode
steps themselves: a line `seconds = t0 + t1 * rows` fitted over recent steps (decaying
sums), so one more row costs t1 / (t0 + t1 * rows) of a step - little on a GPU or in a
memory-bound step, much where the step is compute-bound. Each request guesses the k
(0 to K) with the most tokens per unit of step time; where that is 0 (open chat, where
n-gram guesses rarely hold), it waits 1, 2, 4 ... 32 steps before trying one guess
again, so a request whose text later starts repeating is noticed.

A draft model's guesses come from the worker after each step (`offer`), made for the
requests the scheduler set KV slots aside for (`lookahead`); `propose` hands them out as
it does n-gram guesses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tokenmill.spec_decode import ngram
from tokenmill.spec_decode.config import SpeculativeConfig

_MAX_PAUSE = 32  # steps a request waits, at most, before guessing again
_DECAY = 0.9  # weight of a request's past guesses against its newest
_PRIOR_TRIALS = 2.0  # the engine-wide rate counts as this many guesses of a new request
_STEP_DECAY = 0.98  # weight of past steps in the fit of step time against rows
_ROW_COST = 0.4  # a row's share of a one-row step's time, until steps have been measured


class DecodingRequest(Protocol):
    """What the speculator reads of a request (the engine's Request)."""

    @property
    def request_id(self) -> str: ...
    @property
    def token_ids(self) -> list[int]: ...  # prompt + output
    @property
    def num_output_tokens(self) -> int: ...
    @property
    def max_output_tokens(self) -> int: ...
    @property
    def thought(self) -> Any: ...  # a reasoning model's place in its thought, if any
    @property
    def pooling_type(self) -> str | None: ...  # an embedding request's


@dataclass(frozen=True, slots=True)
class SpecDecodeCounts:
    """Totals since start, as vLLM's vllm:spec_decode_* counters count them."""

    num_drafts: int = 0  # steps in which a request guessed
    num_draft_tokens: int = 0  # tokens guessed
    num_accepted_tokens: int = 0  # guessed tokens the model confirmed
    accepted_per_position: tuple[int, ...] = ()  # confirmed guesses at position 0, 1, ...


@dataclass(slots=True)
class _Rate:
    """Decaying counts of guesses that held (hits) out of those tried."""

    hits: float
    trials: float

    @property
    def value(self) -> float:
        return self.hits / self.trials if self.trials > 0 else 0.0

    def add(self, num_drafts: int, num_accepted: int, decay: float) -> None:
        # a guess is tried only when the ones before it held: accepted + 1 trials, unless all held
        self.hits = decay * self.hits + num_accepted
        self.trials = decay * self.trials + num_accepted + (num_accepted < num_drafts)


@dataclass(slots=True)
class _Pace:
    rate: _Rate
    pause: int = 0  # steps left before guessing again
    backoff: int = 1  # the next pause's length
    # the request's tokens as an array, appended to as they come (its first `num_tokens`)
    tokens: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    num_tokens: int = 0

    def token_array(self, token_ids: list[int]) -> np.ndarray:
        total = len(token_ids)
        if total > len(self.tokens):
            grown = np.empty(max(total, 2 * len(self.tokens)), dtype=np.int64)
            grown[: self.num_tokens] = self.tokens[: self.num_tokens]
            self.tokens = grown
        self.tokens[self.num_tokens : total] = token_ids[self.num_tokens :]
        self.num_tokens = total
        return self.tokens[:total]


@dataclass(slots=True)
class _StepFit:
    """Least squares of step seconds against rows, over decaying sums."""

    n: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0

    def add(self, rows: int, seconds: float) -> None:
        d = _STEP_DECAY
        self.n, self.x, self.y = d * self.n + 1, d * self.x + rows, d * self.y + seconds
        self.xx, self.xy = d * self.xx + rows * rows, d * self.xy + rows * seconds

    def row_cost(self, rows: int) -> float:
        """One more row's share of the time of a step of `rows` rows."""
        if self.n < 4:
            return _ROW_COST / rows
        spread = self.xx - self.x * self.x / self.n
        if spread < 0.5 * self.n * 0.25:  # rows barely vary: no slope to fit yet
            return _ROW_COST / rows
        slope = (self.xy - self.x * self.y / self.n) / spread
        intercept = (self.y - slope * self.x) / self.n
        step = intercept + slope * rows
        if slope <= 0 or step <= 0:
            return 0.0
        return slope / step


@dataclass(slots=True)
class Speculator:
    config: SpeculativeConfig
    _pace: dict[str, _Pace] = field(default_factory=dict)
    _engine_rate: _Rate = field(default_factory=lambda: _Rate(1.0, 2.0))
    _fit: _StepFit = field(default_factory=_StepFit)
    _row_cost: float = _ROW_COST
    _counts: SpecDecodeCounts = field(default_factory=SpecDecodeCounts)
    _per_position: list[int] = field(default_factory=list)
    # a draft model's guesses per request: (the token count they follow, the guesses)
    _offered: dict[str, tuple[int, list[int]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._per_position = [0] * self.config.num_speculative_tokens

    @property
    def counts(self) -> SpecDecodeCounts:
        return SpecDecodeCounts(
            self._counts.num_drafts,
            self._counts.num_draft_tokens,
            self._counts.num_accepted_tokens,
            tuple(self._per_position),
        )

    def begin_step(self, num_running: int) -> bool:
        """Whether requests may guess in a step with this many running; sets the cost of
        a row for the step's choices."""
        limit = self.config.disable_by_batch_size
        if limit is not None and num_running > limit:
            return False
        self._row_cost = self._fit.row_cost(max(1, num_running))
        return True

    def observe_step(self, num_rows: int, seconds: float) -> None:
        """A decode step's time (prefill chunks cost differently: they are not counted)."""
        self._fit.add(num_rows, seconds)

    def propose(self, request: DecodingRequest, limit: int) -> list[int]:
        """Up to `limit` guessed next tokens for a request about to decode ([] for none)."""
        limit = min(limit, self._room(request, 0))
        if limit < 1:
            return []
        pace = self._pace.get(request.request_id)
        if pace is None:
            rate = self._engine_rate
            prior = _Rate(_PRIOR_TRIALS * rate.value, _PRIOR_TRIALS)
            pace = self._pace[request.request_id] = _Pace(prior)
        if pace.pause:
            pace.pause -= 1
            return []
        k = self._best_k(pace.rate.value, min(limit, self.config.num_speculative_tokens))
        if k == 0:  # not worth it now: look again later, with one guess
            pace.pause, pace.backoff = pace.backoff, min(2 * pace.backoff, _MAX_PAUSE)
            k = 1
        config = self.config
        if config.uses_draft_model:
            offered = self._offered.pop(request.request_id, None)
            if offered is None or offered[0] != len(request.token_ids):
                return []  # none made, or made for tokens it no longer has
            return offered[1][:k]
        tokens = pace.token_array(request.token_ids)
        return ngram.propose(tokens, config.prompt_lookup_min, config.prompt_lookup_max, k)

    def lookahead(self, request: DecodingRequest) -> int:
        """How many guesses a draft model should make for a request after this step (it
        samples in it): as many as its next step may take, 0 while it pauses."""
        if not self.config.uses_draft_model:
            return 0
        left = self._room(request, 1)  # (after this step's token)
        if left < 1:
            return 0
        pace = self._pace.get(request.request_id)
        if pace is not None and pace.pause:
            return 0
        rate = (pace.rate if pace is not None else self._engine_rate).value
        limit = min(left, self.config.num_speculative_tokens)
        return max(1, self._best_k(rate, limit))

    @staticmethod
    def _room(request: DecodingRequest, ahead: int) -> int:
        """Guesses a request may take once `ahead` more tokens are out, leaving room for the
        step's own token; none while it thinks (a thought's state moves as tokens come: it
        is not speculated on) or pools."""
        if request.thought is not None or request.pooling_type is not None:
            return 0
        return request.max_output_tokens - request.num_output_tokens - ahead - 1

    def offer(self, guesses: dict[str, tuple[int, list[int]]]) -> None:
        """A draft model's guesses for the next step."""
        self._offered.update(guesses)

    def _best_k(self, rate: float, limit: int) -> int:
        """The number of guesses with the most expected tokens per unit of step time."""
        best, best_value = 0, 1.0
        expected, hold = 1.0, 1.0
        for k in range(1, limit + 1):
            hold *= rate
            expected += hold
            value = expected / (1.0 + self._row_cost * k)
            if value > best_value:
                best, best_value = k, value
        return best

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        """What a verification step made of a request's guesses."""
        counts = self._counts
        self._counts = SpecDecodeCounts(
            counts.num_drafts + 1,
            counts.num_draft_tokens + num_drafts,
            counts.num_accepted_tokens + num_accepted,
        )
        for position in range(num_accepted):
            self._per_position[position] += 1
        self._engine_rate.add(num_drafts, num_accepted, _DECAY)
        pace = self._pace.get(request_id)
        if pace is not None:
            pace.rate.add(num_drafts, num_accepted, _DECAY)
            if num_accepted:
                pace.backoff = 1

    def forget(self, request_id: str) -> None:
        self._pace.pop(request_id, None)
        self._offered.pop(request_id, None)
