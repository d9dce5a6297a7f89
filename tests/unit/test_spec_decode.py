"""Speculative decoding without a model: the config, the n-gram proposer, the speculator's
choices, the scheduler's guess rows, and verification (greedy, seeded, distribution)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from tokenmill.config import SchedulerConfig
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import Scheduler
from tokenmill.errors import ModelLoadError
from tokenmill.sample.sampler import Sampler
from tokenmill.sample.speculative import verify
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec_decode import ngram
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.speculator import Speculator

# -- config ----------------------------------------------------------------------------------


def test_config_takes_vllms_keys_and_defaults() -> None:
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3})
    assert (config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max) == (
        3, 5, 5,
    )  # fmt: skip
    config = SpeculativeConfig.from_dict({"model": "[ngram]", "num_speculative_tokens": 2,
                                          "prompt_lookup_max": 4})  # fmt: skip
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == (4, 4)
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 2,
                                          "prompt_lookup_min": 2, "prompt_lookup_max": 3,
                                          "disable_by_batch_size": 8})  # fmt: skip
    assert (config.prompt_lookup_min, config.disable_by_batch_size) == (2, 8)
    assert not config.uses_draft_model


def test_config_takes_a_draft_model_by_path_as_vllm_does() -> None:
    config = SpeculativeConfig.from_dict({"model": "/models/draft", "num_speculative_tokens": 3})
    assert (config.method, config.model, config.num_speculative_tokens) == (
        "draft_model", "/models/draft", 3,
    )  # fmt: skip
    assert config.uses_draft_model and config.quantization is None
    config = SpeculativeConfig.from_dict({
        "method": "draft_model", "model": "d.gguf", "num_speculative_tokens": 2,
        "quantization": "gguf", "draft_tensor_parallel_size": 1, "disable_by_batch_size": 4,
    })  # fmt: skip
    assert (config.quantization, config.disable_by_batch_size) == ("gguf", 4)


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 1}, "lookahead"),
        ({"method": "eagle", "num_speculative_tokens": 2}, "eagle"),
        ({"method": "eagle", "model": "some/eagle-head", "num_speculative_tokens": 2}, "eagle"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "'model' path"),
        ({"model": "draft", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "ngram only"),
        ({"model": "draft", "num_speculative_tokens": 2, "revision": "main"}, "revision"),
        ({"model": "draft", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
         "draft_tensor_parallel_size"),
        ({"model": "draft"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "quantization": "fp16"},
         "draft models only"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": "3"}, "num_speculative_tokens"),
        ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
          "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ],
)  # fmt: skip
def test_config_refuses_what_it_cannot_do_by_name(value: dict, named: str) -> None:
    with pytest.raises(ModelLoadError, match=named):
        SpeculativeConfig.from_dict(value)


# -- n-gram proposer -------------------------------------------------------------------------


def propose(tokens: list[int], low: int, high: int, k: int) -> list[int]:
    return ngram.propose(np.array(tokens, dtype=np.int64), low, high, k)


def test_ngram_takes_the_longest_suffix_then_its_latest_occurrence() -> None:
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 9, 5, 2, 3, 7, 8, 1, 2, 3]
    # suffix [1, 2, 3] occurs at 0: continuation 9, 5 ...; [2, 3] alone occurs later (at 5)
    assert propose(tokens, 1, 3, 2) == [9, 5]
    assert propose(tokens, 1, 2, 2) == [7, 8]  # n <= 2: the latest [2, 3] is at 5
    assert propose(tokens, 4, 5, 2) == []  # no earlier 4-gram
    assert propose([4, 4, 4], 1, 2, 5) == [4]  # the continuation stops at the sequence's end
    assert propose([5], 1, 1, 3) == []


def test_ngram_agrees_with_a_brute_force_search() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        tokens = rng.integers(0, 3, int(rng.integers(1, 40))).tolist()
        low = int(rng.integers(1, 4))
        high = low + int(rng.integers(0, 3))
        expected: list[int] = []
        for n in range(min(high, len(tokens) - 1), low - 1, -1):
            starts = [i for i in range(len(tokens) - n) if tokens[i : i + n] == tokens[-n:]]
            if starts:
                expected = tokens[starts[-1] + n : starts[-1] + n + 3]
                break
        assert propose(tokens, low, high, 3) == expected


# -- speculator ------------------------------------------------------------------------------


def request(rid: str, prompt: list[int], max_tokens: int = 32, **params) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), frozenset({0}),
                   10_000)  # fmt: skip


def test_speculator_guesses_while_guesses_hold_and_backs_off_when_they_fail() -> None:
    spec = Speculator(SpeculativeConfig(4, 1, 3))
    good = request("good", [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5])
    good.append_token(6)
    assert spec.begin_step(1)
    assert len(spec.propose(good, 10)) >= 1
    for _ in range(5):
        spec.observe("good", 4, 4)
    assert spec.propose(good, 10) == [7, 8, 9, 5]  # every guess held: K of them
    assert spec.propose(good, 2) == [7, 8]  # never past the step's budget
    bad = request("bad", [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5])
    bad.append_token(6)
    proposals = []
    for _ in range(60):  # none of its guesses holds
        guesses = spec.propose(bad, 10)
        if guesses:
            spec.observe("bad", len(guesses), 0)
        proposals.append(len(guesses))
    # it soon guesses one token now and then, with longer and longer pauses
    assert max(proposals[20:]) == 1 and sum(proposals[20:]) <= 3
    counts = spec.counts
    assert counts.num_drafts == 5 + sum(1 for n in proposals if n)
    assert counts.num_draft_tokens == 20 + sum(proposals) and counts.num_accepted_tokens == 20
    assert counts.accepted_per_position == (5, 5, 5, 5)


def test_speculator_respects_room_and_disable_by_batch_size() -> None:
    spec = Speculator(SpeculativeConfig(4, 1, 3, disable_by_batch_size=2))
    r = request("r", [5, 6, 7, 5, 6], max_tokens=3)
    r.append_token(7)
    spec.observe("x", 4, 4)
    assert len(spec.propose(r, 10)) <= 1  # 2 tokens of room: one guess, then the next token
    assert spec.begin_step(2) and not spec.begin_step(3)


# -- scheduler -------------------------------------------------------------------------------


@dataclass
class FixedGuesses:
    """A proposer that always guesses the same tokens."""

    guesses: list[int]
    observed: list[tuple[str, int, int]] = field(default_factory=list)

    def begin_step(self, num_running: int) -> bool:
        return True

    def propose(self, request: Request, limit: int) -> list[int]:
        return self.guesses[:limit]

    def observe(self, request_id: str, num_drafts: int, num_accepted: int) -> None:
        self.observed.append((request_id, num_drafts, num_accepted))

    def lookahead(self, request: Request) -> int:
        return 0

    def forget(self, request_id: str) -> None:
        pass


def test_scheduler_gives_a_decoding_request_its_guesses_as_rows() -> None:
    guesses = FixedGuesses([11, 12, 13])
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(16, 4), guesses)  # type: ignore[arg-type]
    r = request("r", [1, 2, 3, 4, 5])
    s.add(r)
    out = s.schedule()
    assert [(x.num_new_tokens, x.draft_token_ids) for x in out.scheduled] == [(5, [])]
    s.update(out, {"r": [10]})
    out = s.schedule()  # decoding now: the last token and three guesses
    (item,) = out.scheduled
    assert (item.start, item.num_new_tokens, item.draft_token_ids, item.samples) == (
        5,
        4,
        [11, 12, 13],
        True,
    )
    assert out.is_decode_only
    s.update(out, {"r": [11, 12, 20]})  # two guesses held, then the model's own token
    assert r.output_token_ids == [10, 11, 12, 20]
    assert r.num_computed_tokens == 8  # 10, 11, 12 computed; 20 is next step's input
    assert guesses.observed == [("r", 3, 2)]


def test_scheduler_stops_at_the_first_stop_token_among_new_tokens() -> None:
    guesses = FixedGuesses([0, 12])
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(16, 4), guesses)  # type: ignore[arg-type]
    r = request("r", [1, 2, 3])
    s.add(r)
    s.update(s.schedule(), {"r": [10]})
    out = s.schedule()
    s.update(out, {"r": [0, 12, 14]})  # EOS (0) first: nothing after it is kept
    assert r.output_token_ids == [10, 0] and r.is_finished and r.finish_reason == "stop"
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(16, 4), guesses)  # type: ignore[arg-type]
    r = request("r", [1, 2, 3])
    s.add(r)
    s.update(s.schedule(), {"r": [10]})
    s.update(s.schedule(), {"r": [0]})  # the guessed EOS held and ended it: a kept guess
    assert guesses.observed[-1] == ("r", 2, 1)
    assert not s.running and s.kv_cache.pool.num_free_blocks == 16


def test_guesses_never_preempt_and_never_pass_the_budget() -> None:
    guesses = FixedGuesses([11, 12, 13, 14, 15, 16])
    # 3 blocks of 4: a 7-token prompt + its first token fill 2; guesses get what is left
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(3, 4), guesses)  # type: ignore[arg-type]
    r = request("r", [1, 2, 3, 4, 5, 6, 7])
    s.add(r)
    s.update(s.schedule(), {"r": [10]})
    out = s.schedule()
    assert out.scheduled[0].draft_token_ids == []  # 1 + 6 rows need 4 blocks: decode alone
    assert not out.preempted
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=3), KVCacheManager(16, 4), guesses)  # type: ignore[arg-type]
    r = request("r", [1, 2])
    s.add(r)
    s.update(s.schedule(), {"r": [10]})
    assert s.schedule().scheduled[0].draft_token_ids == [11, 12]  # 3 tokens of budget


def draft_model_speculator(k: int = 3) -> Speculator:
    """A draft model's speculator whose guesses have held so far."""
    spec = Speculator(SpeculativeConfig.from_dict({"model": "d", "num_speculative_tokens": k}))
    for _ in range(5):
        spec.observe("earlier", k, k)
    return spec


def test_scheduler_sets_slots_aside_for_a_draft_models_guesses_and_hands_them_out() -> None:
    spec = draft_model_speculator()
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(16, 4), spec)
    r = request("r", [1, 2, 3, 4, 5])
    s.add(r)
    out = s.schedule()
    (item,) = out.scheduled
    assert (item.num_new_tokens, item.num_lookahead) == (5, 3)  # the draft writes 3 ahead
    assert len(s.kv_cache.block_ids(r)) == 2  # 5 tokens + the newest + 2 guesses: 8 slots
    s.update(out, {"r": [10]})
    spec.offer({"r": (6, [11, 12, 13])})  # what the worker's draft model guessed
    out = s.schedule()
    (item,) = out.scheduled
    assert (item.start, item.draft_token_ids, item.num_lookahead) == (5, [11, 12, 13], 3)
    assert len(s.kv_cache.block_ids(r)) == 3  # 6 + 3 rows + 3 ahead of the newest token
    s.update(out, {"r": [11, 30]})
    assert r.num_tokens == 8
    spec.offer({"r": (7, [40])})  # made for a token count it no longer has: dropped
    assert s.schedule().scheduled[0].draft_token_ids == []


def test_a_draft_models_slots_never_preempt() -> None:
    spec = draft_model_speculator(k=4)
    # 2 blocks of 4: the 6-token prompt fits, 4 slots ahead do not: it prefills without them
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), KVCacheManager(2, 4), spec)
    r = request("r", [1, 2, 3, 4, 5, 6])
    s.add(r)
    out = s.schedule()
    assert out.scheduled[0].num_lookahead == 0 and not out.preempted
    s.update(out, {"r": [10]})
    spec.offer({"r": (7, [11])})
    out = s.schedule()  # 1 + 1 rows fit the 8 slots; nothing ahead of them does
    (item,) = out.scheduled
    assert (item.draft_token_ids, item.num_lookahead, out.preempted) == ([11], 0, [])


# -- verification ----------------------------------------------------------------------------


@dataclass
class Seq:
    """A sequence as the sampler reads it."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2])
    output: list[int] = field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset({0})
    matcher: object = None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output)


V = 8


def test_greedy_keeps_guesses_up_to_the_first_miss() -> None:
    logits = torch.full((7, V), -1.0)
    best = [3, 4, 6, 2, 5, 1, 7]  # the argmax of each row
    logits[torch.arange(7), torch.tensor(best)] = 1.0
    sampler = Sampler(V, torch.device("cpu"))
    greedy = SamplingParams(temperature=0.0)
    seqs = [Seq("a", greedy), Seq("b", greedy)]
    # a: rows 0-3, guesses 3, 4, 5 (the third misses: 6); b: rows 4-6, guesses 5, 1
    result = verify(sampler, logits, seqs, [[3, 4, 5], [5, 1]])
    assert result.token_ids == [[3, 4, 6], [5, 1, 7]]
    with_logprobs = SamplingParams(temperature=0.0, logprobs=1)
    result = verify(
        sampler, logits, [Seq("a", with_logprobs), Seq("b", greedy)], [[3, 4, 5], [5, 1]]
    )
    assert result.token_ids == [[3, 4, 6], [5, 1, 7]]  # row by row, the same choices
    assert [list(entry)[0] for entry in result.logprobs[0]] == [3, 4, 6] and not result.logprobs[1]


def test_a_seeded_request_draws_the_same_tokens_with_or_without_guesses() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, V) * 2
    params = SamplingParams(temperature=1.0, seed=7, top_p=0.9)
    plain = Sampler(V, torch.device("cpu"))
    seq = Seq("s", params)
    alone = []
    for row in range(6):  # one row a step, as without speculation
        token = int(plain(logits[row : row + 1], [seq]).token_ids[0])
        alone.append(token)
        seq.output.append(token)
    guessing = Sampler(V, torch.device("cpu"))
    seq = Seq("s", params)
    while len(seq.output) < 6:
        pos = len(seq.output)  # guess two tokens right and the third wrong, while rows last
        guesses = alone[pos : pos + 2] + [(alone[pos + 2] + 1) % V] if pos + 3 < 6 else []
        rows = logits[pos : pos + 1 + len(guesses)]
        new = verify(guessing, rows, [seq], [guesses]).token_ids[0]
        assert len(new) == 1 + min(len(guesses), 2)
        seq.output.extend(new)
    assert seq.output == alone


def test_verification_keeps_the_models_distribution() -> None:
    """Guess token 2 then 5; over many draws, the first new token follows row 0's
    distribution and the second (after a kept guess) row 1's: chi-square, fixed seed."""
    probs = torch.tensor([[0.05, 0.1, 0.3, 0.05, 0.2, 0.1, 0.15, 0.05],
                          [0.2, 0.05, 0.05, 0.1, 0.1, 0.3, 0.1, 0.1],
                          [0.125] * 8])  # fmt: skip
    n = 20_000
    logits = probs.log().repeat(n, 1)  # each request's 3 rows in turn
    sampler = Sampler(V, torch.device("cpu"), seed=1)
    params = SamplingParams(temperature=1.0)
    result = verify(sampler, logits, [Seq(str(i), params, eos_token_ids=frozenset()) for i in range(n)],
                    [[2, 5]] * n)  # fmt: skip
    first = np.bincount([t[0] for t in result.token_ids], minlength=V)
    second = np.bincount([t[1] for t in result.token_ids if t[0] == 2], minlength=V)
    for counts, p in ((first, probs[0]), (second, probs[1])):
        expected = counts.sum() * p.numpy()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001
    assert first[2] / n == pytest.approx(0.3, abs=0.02)  # the guess held as often as p(2)


class CountingMatcher:
    """A grammar that allows only even tokens (and EOS 0), counting what it accepted."""

    def __init__(self) -> None:
        self.accepted: list[int] = []

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bitmask[row] = 0
        bitmask[row, 0] = sum(1 << t for t in range(0, V, 2))

    def accept_token(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        return token_id % 2 == 0

    def rollback(self, num_tokens: int) -> None:
        del self.accepted[len(self.accepted) - num_tokens :]

    def is_terminated(self) -> bool:
        return False


def test_grammar_guesses_are_masked_accepted_between_rounds_and_rolled_back() -> None:
    logits = torch.zeros(4, V)
    logits[0, 3], logits[0, 2] = 5.0, 4.0  # 3 is best but odd: the grammar picks 2
    logits[1, 4] = 5.0
    logits[2, 7], logits[2, 6] = 5.0, 1.0
    matcher = CountingMatcher()
    seq = Seq("g", SamplingParams(temperature=0.0), matcher=matcher)
    result = verify(Sampler(V, torch.device("cpu")), logits, [seq], [[2, 4, 8 % V]])
    assert result.token_ids == [[2, 4, 6]]  # 2 and 4 held, then 6 (7 is masked)
    assert matcher.accepted == []  # the engine accepts them for real when it appends them
