"""bad_words: tokenized as vLLM does (on the bundled tokenizer), banned by vLLM v1's rule."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.unit.engine_sampler import Sampler
from tests.unit.test_sampler_grammar import AllowOnly
from tokenmill.engine.request import Request
from tokenmill.errors import InvalidRequestError
from tokenmill.sample.bad_words import banned_token_ids
from tokenmill.sampling_params import MAX_NUM_BAD_WORDS, SamplingParams, bad_words_token_ids
from tokenmill.tokenizer.tokenizer import Tokenizer

V = 50
EOS = 0


@pytest.fixture(scope="module")
def tokenizer(bundled_gguf_path: str) -> Tokenizer:
    from tokenmill.model.gguf_reader import GGUFFile
    from tokenmill.model.gguf_tokenizer import load_gguf_tokenizer

    return load_gguf_tokenizer(GGUFFile(bundled_gguf_path))


# -- resolution on the real tokenizer --------------------------------------------------------


def test_each_word_alone_and_after_a_space(tokenizer: Tokenizer) -> None:
    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    paris, spaced_paris = encode("Paris"), encode(" Paris")
    assert len(paris) == len(spaced_paris) == 1 and paris != spaced_paris
    assert bad_words_token_ids(["Paris"], tokenizer.encode) == [paris, spaced_paris]
    # leading whitespace is dropped first: the same two sequences, never a third
    assert bad_words_token_ids(["   Paris"], tokenizer.encode) == [paris, spaced_paris]
    two = encode("hello world")
    assert len(two) == 2 and bad_words_token_ids(["hello world"], tokenizer.encode) == [
        two,
        encode(" hello world"),
    ]


def test_the_spaced_variant_is_kept_only_when_it_starts_differently_with_as_many_tokens() -> None:
    vocab = {"ab": [5, 6], " ab": [7, 6], "cd": [8], " cd": [8], "ef": [9], " ef": [10, 9]}

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        return vocab[text]

    assert bad_words_token_ids(["ab"], encode) == [[5, 6], [7, 6]]
    assert bad_words_token_ids(["cd"], encode) == [[8]]  # same first token
    assert bad_words_token_ids(["ef"], encode) == [[9]]  # more tokens with the space


def test_resolution_happens_once_and_leaves_the_callers_params_alone(tokenizer: Tokenizer) -> None:
    params = SamplingParams(bad_words=["Paris"])
    resolved = params.resolve_bad_words(tokenizer.encode)
    assert params.bad_words_token_ids is None and resolved.bad_words_token_ids
    assert resolved.resolve_bad_words(lambda *a, **k: pytest.fail("tokenized twice")) is resolved
    assert SamplingParams().resolve_bad_words(tokenizer.encode).bad_words_token_ids is None


def test_words_that_tokenize_to_nothing_or_too_many_sequences_are_400s(
    tokenizer: Tokenizer,
) -> None:
    with pytest.raises(InvalidRequestError, match="no tokens") as empty:
        bad_words_token_ids(["ok", "   "], tokenizer.encode)
    assert empty.value.param == "bad_words"
    words = [f"word{i}" for i in range(MAX_NUM_BAD_WORDS)]  # two sequences each
    with pytest.raises(InvalidRequestError, match=f"most allowed is {MAX_NUM_BAD_WORDS}"):
        bad_words_token_ids(words, tokenizer.encode)


def test_params_checks_name_bad_words() -> None:
    with pytest.raises(InvalidRequestError, match="beam search") as beams:
        SamplingParams(bad_words=["x"], use_beam_search=True, n=2)
    assert beams.value.param == "bad_words"
    with pytest.raises(InvalidRequestError, match="list of strings"):
        SamplingParams(bad_words=[3])  # type: ignore[list-item]
    params = SamplingParams(bad_words=["x"], bad_words_token_ids=[[4, 60]])
    with pytest.raises(InvalidRequestError, match=r"bad_words has token ids outside.*\[60\]"):
        params.check_vocab(V)


# -- the ban in the sampler --------------------------------------------------------------------


def make_request(
    output: list[int], words: list[list[int]] | None, prompt: list[int] | None = None, **params: Any
) -> Request:
    params.setdefault("temperature", 0.0)
    request = Request(
        params.pop("request_id", "r"),
        prompt or [1, 2, 3],
        SamplingParams(bad_words_token_ids=words, **params),
        frozenset({EOS}),
        1024,
    )
    for token in output:
        request.append_token(token)
    return request


def test_one_token_words_are_always_banned_and_longer_ones_after_their_prefix() -> None:
    words = [[7], [3, 4, 9], [5, 8]]
    assert banned_token_ids(make_request([], words)) == [7]
    assert banned_token_ids(make_request([5], words)) == [7, 8]
    assert banned_token_ids(make_request([3, 4], words)) == [7, 9]
    assert banned_token_ids(make_request([1, 3, 4], words)) == [7, 9]
    assert banned_token_ids(make_request([3, 4, 1], words)) == [7]


def test_the_prefix_must_be_in_the_output_not_the_prompt() -> None:
    words = [[3, 4, 9], [2, 8]]
    # the prompt ends with both prefixes; nothing is generated yet
    assert banned_token_ids(make_request([], words, prompt=[1, 3, 4])) == []
    # one output token: 4 is the last output token but 3 is the prompt's
    assert banned_token_ids(make_request([4], words, prompt=[1, 3])) == []


def logits_rows(num_rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_rows, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_the_sampler_takes_the_best_token_left_and_leaves_other_rows_alone() -> None:
    logits = logits_rows(3)
    top = logits.argsort(dim=-1, descending=True)
    first, second = int(top[0, 0]), int(top[0, 1])
    requests = [
        make_request([], [[first]]),
        make_request([], None, request_id="free"),
        make_request([11, 12], [[11, 12, int(top[2, 0])]], request_id="m"),  # ends with prefix
    ]
    tokens = Sampler(V, torch.device("cpu"))(logits.clone(), requests)
    assert tokens == [second, int(top[1, 0]), int(top[2, 1])]


def test_random_rows_never_draw_a_banned_token() -> None:
    logits = torch.zeros(1, V)
    logits[0, :4] = 10.0  # almost all the mass on 0..3
    sampler = Sampler(V, torch.device("cpu"), seed=3)
    for _ in range(50):
        request = make_request([], [[1], [2]], temperature=1.0)
        assert sampler(logits.clone(), [request])[0] in (0, 3)


def test_bad_words_combine_with_allowed_token_ids_and_a_grammar() -> None:
    logits = logits_rows(2, seed=4)
    allowed = sorted(range(10, 20), key=lambda t: -float(logits[0, t]))
    masked = make_request([], [[allowed[0]]], allowed_token_ids=list(range(10, 20)))
    constrained = make_request([], [[allowed[0]]], request_id="g")
    constrained.matcher = AllowOnly(set(range(10, 20)))
    logits[1] = logits[0]
    tokens = Sampler(V, torch.device("cpu"))(logits.clone(), [masked, constrained])
    assert tokens == [allowed[1], allowed[1]]
