"""The batched sampler on seeded tensors: every processing step does exactly what it says."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from tests.unit.engine_sampler import Sampler
from tokenmill.engine.request import Request
from tokenmill.sample.draw import draw_truncated
from tokenmill.sample.logprobs import gather_logprobs
from tokenmill.sampling_params import SamplingParams

V = 50
EOS = 0


def make_request(
    request_id: str, prompt: list[int] | None = None, output: list[int] | None = None, **params: Any
) -> Request:
    request = Request(
        request_id, prompt or [1, 2, 3], SamplingParams(**params), frozenset({EOS}), 1024
    )
    for token in output or []:
        request.append_token(token)
    return request


def sampler() -> Sampler:
    return Sampler(V, torch.device("cpu"), seed=0)


def logits_rows(num_rows: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(num_rows, V, generator=torch.Generator().manual_seed(seed)) * scale


def test_all_greedy_takes_the_argmax() -> None:
    logits = logits_rows(4)
    requests = [make_request(str(i), temperature=0.0) for i in range(4)]
    assert sampler()(logits.clone(), requests) == logits.argmax(-1).tolist()


def test_top_k_1_is_greedy_at_any_temperature() -> None:
    logits = logits_rows(6, seed=1)
    requests = [make_request(str(i), temperature=1.5, top_k=1) for i in range(6)]
    assert sampler()(logits.clone(), requests) == logits.argmax(-1).tolist()


def test_mixed_batch_keeps_greedy_rows_greedy() -> None:
    logits = logits_rows(6, seed=2, scale=0.1)  # flat: random rows rarely hit the argmax
    requests = [make_request(str(i), temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    tokens = sampler()(logits.clone(), requests)
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (1, 3, 5)] == [argmax[i] for i in (1, 3, 5)]


def test_repetition_frequency_presence_follow_the_formula() -> None:
    """vLLM: repetition over prompt+output divides positive / multiplies negative logits;
    frequency subtracts per output occurrence, presence once per output token."""
    prompt, output = [1, 2], [3, 3, 4, 2]
    request = make_request(
        "r", prompt, output, temperature=0.0, repetition_penalty=1.5,
        frequency_penalty=0.5, presence_penalty=0.25,
    )  # fmt: skip
    logits = torch.linspace(-2, 3, V)[None, :].clone()
    logits[0, 1], logits[0, 2], logits[0, 3], logits[0, 4] = 2.0, -1.0, 4.0, -3.0
    penalized = sampler().penalties.apply(logits.clone(), [request])[0]
    expected = logits[0].clone()
    expected[1] = 2.0 / 1.5  # prompt only: repetition only
    expected[2] = -1.0 * 1.5 - 0.5 * 1 - 0.25  # prompt and output once
    expected[3] = 4.0 / 1.5 - 0.5 * 2 - 0.25  # output twice
    expected[4] = -3.0 * 1.5 - 0.5 * 1 - 0.25
    torch.testing.assert_close(penalized, expected)


def test_penalty_counts_grow_incrementally_and_rows_are_reused() -> None:
    s = sampler()
    request = make_request("r", [5], [], temperature=0.0, frequency_penalty=1.0)
    for token in [7, 7, 8]:
        request.append_token(token)
        counts = s.penalties.apply(torch.zeros(1, V), [request])[0]
    assert counts[7].item() == -2.0 and counts[8].item() == -1.0 and counts[5].item() == 0.0
    s.forget("r")
    fresh = make_request("r2", [9], [7], temperature=0.0, frequency_penalty=1.0)
    again = s.penalties.apply(torch.zeros(1, V), [fresh])[0]  # the freed row, counted afresh
    assert again[7].item() == -1.0 and again[8].item() == 0.0


def test_huge_logit_bias_forces_its_token() -> None:
    logits = logits_rows(3, seed=3)
    requests = [make_request(str(i), temperature=1.0, logit_bias={17: 100}) for i in range(3)]
    assert sampler()(logits, requests) == [17, 17, 17]


def test_allowed_token_ids_confine_every_draw() -> None:
    s = sampler()
    allowed = [3, 9, 40]
    requests = [make_request(str(i), temperature=2.0, allowed_token_ids=allowed) for i in range(8)]
    requests.append(make_request("free", temperature=0.0))
    seen = set()
    for step in range(20):
        tokens = s(logits_rows(9, seed=step), requests)
        seen.update(tokens[:-1])
    assert seen <= set(allowed) and len(seen) > 1


def test_min_tokens_masks_eos_and_stop_ids_until_reached() -> None:
    logits = torch.zeros(2, V)
    logits[:, EOS] = 50.0
    logits[:, 5] = 40.0
    early = make_request("a", output=[9], temperature=0.0, min_tokens=2, stop_token_ids=[5])
    done = make_request("b", output=[9, 9], temperature=0.0, min_tokens=2, stop_token_ids=[5])
    tokens = sampler()(logits, [early, done])
    assert tokens[0] not in (EOS, 5) and tokens[1] == EOS


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    def run(batch_extra: int) -> list[int]:
        s = sampler()
        seeded = make_request("seeded", temperature=1.0, top_p=0.9, seed=42)
        drawn = []
        for step in range(10):
            others = [make_request(f"o{i}", temperature=1.0) for i in range(batch_extra)]
            rows = torch.cat([logits_rows(1, seed=100 + step, scale=1.0), logits_rows(batch_extra)])
            drawn.append(s(rows, [seeded, *others])[0])
        return drawn

    alone = run(0)
    assert alone == run(5) == run(2)
    assert len(set(alone)) > 1  # really random


def _reference_kept(row: torch.Tensor, k: int, p: float) -> tuple[list[int], list[float]]:
    """vLLM's top-k then top-p over a full sort: kept ids (descending) and their probabilities."""
    values, ids = row.sort(descending=True)
    if k > 0:
        values = values.masked_fill(torch.arange(len(values)) >= k, -math.inf)
    probs = torch.softmax(values, -1)
    keep = (probs.cumsum(-1) - probs) < p
    probs = probs * keep
    kept = int(keep.sum())
    return ids[:kept].tolist(), (probs[:kept] / probs[:kept].sum()).tolist()


@pytest.mark.parametrize(
    ("top_k", "top_p", "scale"),
    [
        (1, 1.0, 3.0),
        (5, 1.0, 3.0),
        (7, 0.6, 2.0),
        (-1, 0.5, 2.0),
        (-1, 0.95, 0.05),
        (3, 0.999, 1.0),
    ],
)
@pytest.mark.parametrize("candidates", [None, 600], ids=["cpu-pool", "whole-vocabulary"])
def test_top_k_top_p_keep_exactly_vllm_s_set(
    top_k: int, top_p: float, scale: float, candidates: int | None
) -> None:
    """Every kept token is drawn at the midpoint of its CDF interval; nothing else ever is:
    from the CPU's first pool of 256 candidates (redone wider when short) and from the whole
    vocabulary at once (a GPU's pool: no redo, no wait on the host)."""
    vocab = 600  # > the 256 top-p candidates, so flat rows take the exact fallback
    row = torch.randn(vocab, generator=torch.Generator().manual_seed(7)) * scale
    ids, probs = _reference_kept(row, top_k, top_p)
    cdf = torch.tensor(probs).cumsum(0)
    midpoints = ((cdf - torch.tensor(probs) / 2) / cdf[-1]).tolist() + [0.0, 0.999999]
    n = len(midpoints)
    drawn = draw_truncated(
        row.repeat(n, 1), [top_k] * n, [top_p] * n, torch.tensor(midpoints), candidates
    )
    assert drawn.tolist() == [*ids, ids[0], ids[-1]]


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.full((1, V), -10.0)
    logits[0, 4], logits[0, 6] = 5.0, 5.0 + math.log(0.3)  # p6 / p4 = 0.3
    s = sampler()
    keep = {
        s(logits.clone(), [make_request("a", temperature=1.0, min_p=0.2)])[0] for _ in range(40)
    }
    drop = {
        s(logits.clone(), [make_request("b", temperature=1.0, min_p=0.5)])[0] for _ in range(40)
    }
    assert keep == {4, 6} and drop == {4}


def test_logprobs_are_raw_with_rank_and_top_k() -> None:
    logits = logits_rows(2, seed=9)
    requests = [
        make_request("a", temperature=0.0, logprobs=3, logit_bias={11: 100}),
        make_request("b", temperature=0.7, logprobs=0, presence_penalty=1.0),
    ]
    tokens = sampler()(logits.clone(), requests)
    raw = torch.log_softmax(logits, -1)
    assert tokens[0] == 11  # the bias decides the draw, not the reported logprobs
    entry = requests[0].logprobs[0]
    assert list(entry)[0] == 11 and len(entry) == 4
    assert entry[11].logprob == pytest.approx(raw[0, 11].item(), abs=1e-5)
    assert entry[11].rank == int((raw[0] >= raw[0, 11]).sum())
    top = raw[0].topk(3)
    for rank, (value, token) in enumerate(zip(top.values, top.indices, strict=True), start=1):
        assert entry[int(token)].rank == rank
        assert entry[int(token)].logprob == pytest.approx(value.item(), abs=1e-5)
    (only,) = requests[1].logprobs[0].items()
    assert only[0] == tokens[1] and only[1].logprob == pytest.approx(raw[1, tokens[1]].item())
    assert requests[1].cumulative_logprob == pytest.approx(only[1].logprob)


def test_gather_logprobs_rank_counts_ties() -> None:
    logprobs = torch.log_softmax(torch.tensor([[1.0, 1.0, 0.0]]), -1)
    (entry,) = gather_logprobs(logprobs, torch.tensor([1]), [2])
    assert entry[1].rank == 2 and set(entry) == {0, 1}


def test_prompt_logprob_positions_skip_what_was_scored_before_a_preemption() -> None:
    request = make_request("p", prompt=list(range(10, 20)), prompt_logprobs=1)
    assert list(request.prompt_logprob_positions(0, 4)) == [0, 1, 2, 3]
    request.prompt_logprobs.extend({} for _ in range(4))  # positions 0..3 scored
    assert list(request.prompt_logprob_positions(0, 6)) == [4, 5]  # recomputed from 0
    assert list(request.prompt_logprob_positions(6, 4)) == [6, 7, 8]  # 9 predicts the output
    assert list(make_request("q").prompt_logprob_positions(0, 3)) == []
