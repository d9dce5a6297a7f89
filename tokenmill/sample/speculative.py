"""Verification of guessed tokens (speculative decoding): keep the guesses the sampler
would have drawn anyway, then the token it draws after them.

A request with guesses d_1..d_k has k + 1 rows of logits: row j scores the token after
its last token and d_1..d_j. Round j samples row j with the request's own parameters,
as if d_1..d_j were already generated (penalties count them, its grammar has accepted
them). A draw equal to d_{j+1} keeps that guess and round j + 1 follows; any other draw
is the request's last new token this step, and so is the draw after the last guess.

A guess is one token, not a distribution (its draft probability is one-hot), and for
such drafts this is exactly rejection sampling: d is kept with probability p(d), and a
rejected round's draw follows p without d, renormalised. The output's distribution is
the model's own. Each new token takes one uniform from the request's generator, as it
would without speculation, so a seeded request gives the same tokens either way; and
greedy rows compute the argmax of rows computed like plain decode rows, so greedy
output is the same bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokenmill.sample.draw import greedy_tokens
from tokenmill.sample.interface import SamplingRequest
from tokenmill.sample.logprobs import PositionLogprobs
from tokenmill.sample.sampler import Sampler, argmax_only
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.interface import GrammarMatcher


@dataclass(slots=True)
class Verified:
    """Per request, in the order given: its new tokens, and their logprobs if it asked."""

    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[PositionLogprobs]] = field(default_factory=list)


@dataclass(slots=True)
class _Extended:
    """A request as the sampler reads it with the tokens emitted so far appended."""

    base: SamplingRequest
    emitted: list[int] = field(default_factory=list)

    @property
    def request_id(self) -> str:
        return self.base.request_id

    @property
    def params(self) -> SamplingParams:
        return self.base.params

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.base.prompt_token_ids

    @property
    def token_ids(self) -> list[int]:
        return self.base.token_ids + self.emitted if self.emitted else self.base.token_ids

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.base.eos_token_ids

    @property
    def matcher(self) -> GrammarMatcher | None:
        return self.base.matcher

    @property
    def num_prompt_tokens(self) -> int:
        return self.base.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return self.base.num_output_tokens + len(self.emitted)


def verify(
    sampler: Sampler,
    logits: torch.Tensor,  # [sum(1 + len(d) for d in drafts), V]: each request's rows in turn
    requests: Sequence[SamplingRequest],
    drafts: Sequence[list[int]],
) -> Verified:
    """Each request's new tokens: the guesses its own sampling confirms, then one drawn."""
    if argmax_only(requests):
        return _verify_greedy(logits, drafts)
    first_rows, row = [], 0
    for guesses in drafts:
        first_rows.append(row)
        row += 1 + len(guesses)
    views = [_Extended(r) for r in requests]
    result = Verified([[] for _ in requests], [[] for _ in requests])
    active = list(range(len(requests)))
    for round_ in range(1 + max(len(d) for d in drafts)):
        out = sampler(logits[[first_rows[i] + round_ for i in active]], [views[i] for i in active])
        tokens = out.token_ids.tolist()
        entries = out.logprobs.entries() if out.logprobs is not None else []
        for row, entry in zip(out.logprob_rows, entries, strict=True):
            result.logprobs[active[row]].append(entry)
        still = []
        for i, token in zip(active, tokens, strict=True):
            result.token_ids[i].append(token)
            guesses = drafts[i]
            if round_ < len(guesses) and token == guesses[round_] and _goes_on(views[i], token):
                views[i].emitted.append(token)
                still.append(i)
        active = still
        if not active:
            break
    for view in views:  # the engine accepts them for real when it appends the tokens
        if view.emitted and view.matcher is not None:
            view.matcher.rollback(len(view.emitted))
    return result


def _verify_greedy(logits: torch.Tensor, drafts: Sequence[list[int]]) -> Verified:
    """Every row's argmax at once; each request keeps its guesses up to the first miss."""
    best = greedy_tokens(logits).tolist()
    result = Verified()
    row = 0
    for guesses in drafts:
        tokens = [best[row]]
        for j, guess in enumerate(guesses):
            if tokens[-1] != guess:
                break
            tokens.append(best[row + j + 1])
        result.token_ids.append(tokens)
        result.logprobs.append([])
        row += 1 + len(guesses)
    return result


def _goes_on(view: _Extended, token: int) -> bool:
    """Whether a kept guess leaves the request running: a stop token ends it (the later
    rows scored tokens it never generates), and a grammar must accept the guess."""
    params = view.params
    if token in view.eos_token_ids or token in params.stop_token_ids:
        return False
    matcher = view.matcher
    return matcher is None or matcher.accept_token(token)
