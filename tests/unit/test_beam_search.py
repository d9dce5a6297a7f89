"""Beam search bookkeeping on a hand-made model: scores, early_stopping, min_tokens, widths."""

from __future__ import annotations

import math

from tokenmill.engine.beam_search import BeamSearch
from tokenmill.engine.outputs import Logprob
from tokenmill.sampling_params import EarlyStopping

EOS, A, B, C = 0, 1, 2, 3
# next-token probabilities after each prefix; anything unlisted continues with C, then EOS
MODEL: dict[tuple[int, ...], dict[int, float]] = {
    (): {EOS: 0.40, A: 0.35, B: 0.25},
    (A,): {EOS: 0.90, C: 0.10},
    (B,): {C: 0.60, EOS: 0.40},
}


def next_tokens(prefix: list[int]) -> list[tuple[int, float, dict[int, Logprob]]]:
    probs = MODEL.get(tuple(prefix), {C: 0.7, EOS: 0.3})
    ranked = sorted(probs.items(), key=lambda item: -item[1])
    return [(t, math.log(p), {t: Logprob(math.log(p), r)}) for r, (t, p) in enumerate(ranked, 1)]


def run(width: int, early: EarlyStopping, penalty: float = 1.0, **kwargs: int) -> BeamSearch:
    search = BeamSearch(width, kwargs.get("max_tokens", 6), {EOS}, penalty, early,
                        kwargs.get("min_tokens", 0))  # fmt: skip
    while not search.is_done:
        search.step([next_tokens(beam.token_ids) for beam in search.running])
    return search


def test_early_stopping_true_stops_with_the_first_full_set() -> None:
    (best,) = run(1, True).best(1)
    assert best.token_ids == [EOS] and best.is_stopped
    assert best.score == best.cumulative_logprob == math.log(0.40)


def test_false_stops_when_the_running_beam_cannot_win_at_its_length() -> None:
    # after step 1 the running beam [A] scores log(.35)/1 < log(.40): stop, as transformers does
    assert run(1, False).best(1)[0].token_ids == [EOS]


def test_never_keeps_searching_while_a_longer_beam_could_win() -> None:
    # with length_penalty 1 and max_tokens 6, [A] could reach log(.35)/6 > log(.40): go on
    (best,) = run(1, "never").best(1)
    assert best.token_ids == [A, EOS]
    assert best.score == (math.log(0.35) + math.log(0.90)) / 2


def test_length_penalty_zero_ranks_by_cumulative_logprob() -> None:
    search = run(2, "never", penalty=0.0)
    scores = [b.score for b in search.best(2)]
    assert scores == sorted(scores, reverse=True)
    assert [b.token_ids for b in search.best(2)] == [[EOS], [A, EOS]]
    assert all(b.score == b.cumulative_logprob for b in search.best(2))


def test_min_tokens_keeps_stop_tokens_out_until_reached() -> None:
    for beam in run(2, True, min_tokens=2).best(2):
        assert len(beam.token_ids) >= 3 or not beam.is_stopped


def test_max_tokens_ends_every_beam_on_length() -> None:
    search = run(2, "never", penalty=-1.0, max_tokens=2)  # negative penalty: shorter wins
    assert all(len(b.token_ids) <= 2 for b in search.best(2))
    assert search.num_candidates == 4  # max(2, 1 + one stop id) * width
