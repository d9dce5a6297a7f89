"""Grammar masks in the sampler and the request: only allowed tokens, in the right order."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.engine_sampler import Sampler
from tokenmill.engine.request import Request
from tokenmill.sample.grammar import GrammarMasks
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.interface import token_words

V = 50
EOS = 0


class AllowOnly:
    """A GrammarMatcher that allows a fixed token set and records what it accepts."""

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed
        self.accepted: list[int] = []
        self.num_fills = 0

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.num_fills += 1
        bitmask[row] = torch.from_numpy(token_words(sorted(self.allowed), bitmask.shape[1]))

    def accept_token(self, token_id: int) -> bool:
        if token_id not in self.allowed:
            return False
        self.accepted.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return self.allowed == {EOS}

    def rollback(self, num_tokens: int) -> None:
        raise NotImplementedError


def make_request(request_id: str, allowed: set[int] | None = None, **params: Any) -> Request:
    request = Request(request_id, [1, 2, 3], SamplingParams(**params), frozenset({EOS}), 1024)
    request.matcher = AllowOnly(allowed) if allowed is not None else None
    return request


def logits_rows(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_best_allowed_token_and_free_rows_are_untouched() -> None:
    logits = logits_rows(4)
    allowed = {7, 11, 12}
    requests = [make_request(str(i), allowed if i % 2 else None, temperature=0.0) for i in range(4)]
    tokens = Sampler(V, torch.device("cpu"))(logits.clone(), requests)
    best_allowed = max(allowed, key=lambda t: float(logits[1, t]))
    assert tokens[1] == best_allowed and tokens[3] == max(allowed, key=lambda t: logits[3, t])
    assert [tokens[0], tokens[2]] == [int(logits[0].argmax()), int(logits[2].argmax())]


@pytest.mark.parametrize("params", [{"temperature": 1.5}, {"top_p": 0.9, "top_k": 5}])
def test_random_rows_draw_only_allowed_tokens(params: dict[str, Any]) -> None:
    sampler = Sampler(V, torch.device("cpu"), seed=3)
    allowed = {4, 9, 30, 31}
    seen = set()
    for step in range(40):
        requests = [make_request(f"{step}-{i}", allowed, **params) for i in range(3)]
        seen.update(sampler(logits_rows(3, seed=step), requests))
    assert seen <= allowed and len(seen) > 1


def test_the_mask_comes_after_logit_bias_and_penalties() -> None:
    logits = torch.zeros(1, V)
    logits[0, 5] = 10.0
    request = make_request("r", {5, 6}, temperature=0.0, logit_bias={20: 100.0})
    request.append_token(5)  # seen once: the frequency penalty pushes 5 below 6
    request.params.frequency_penalty = 2.0
    logits[0, 6] = 9.0
    assert Sampler(V, torch.device("cpu"))(logits, [request]) == [6]


def test_unconstrained_batches_do_no_bitmask_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any) -> None:
        raise AssertionError("bitmask work for an unconstrained batch")

    monkeypatch.setattr(GrammarMasks, "apply", fail)
    requests = [make_request(str(i), temperature=t) for i, t in enumerate((0.0, 1.0))]
    assert len(Sampler(V, torch.device("cpu"))(logits_rows(2), requests)) == 2


def test_constrained_logprobs_come_from_the_raw_distribution() -> None:
    logits = logits_rows(1, seed=5)
    request = make_request("r", {3}, temperature=0.0, logprobs=2)
    assert Sampler(V, torch.device("cpu"))(logits.clone(), [request]) == [3]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert request.logprobs[0][3].logprob == pytest.approx(float(raw[3]), abs=1e-5)
    assert request.logprobs[0][3].rank == int((raw > raw[3]).sum()) + 1


def test_min_tokens_bans_eos_only_while_the_grammar_allows_more() -> None:
    logits = torch.zeros(2, V)
    logits[:, EOS] = 10.0
    going_on = make_request("a", {EOS, 8}, temperature=0.0, min_tokens=3)
    complete = make_request("b", {EOS}, temperature=0.0, min_tokens=3)
    assert Sampler(V, torch.device("cpu"))(logits, [going_on, complete]) == [8, EOS]


def test_eos_ends_a_constrained_request_even_with_ignore_eos_and_min_tokens() -> None:
    request = make_request("r", {EOS, 4}, ignore_eos=True, min_tokens=5, max_tokens=100)
    request.append_token(4)
    assert not request.check_stop()
    request.append_token(EOS)
    assert request.check_stop() and request.finish_reason == "stop"
    assert request.matcher is not None and request.matcher.accepted == [4, EOS]  # type: ignore[attr-defined]


def test_a_token_the_grammar_rejects_aborts_the_request() -> None:
    request = make_request("r", {4})
    request.append_token(5)
    assert request.check_stop() and request.finish_reason == "abort"
