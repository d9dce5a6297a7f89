"""SamplingParams: vLLM's defaults, and a 400 naming the parameter for every bad value."""

from __future__ import annotations

from typing import Any

import pytest

from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import SamplingParams


def test_defaults_are_vllm_s() -> None:
    p = SamplingParams()
    assert (p.n, p.best_of, p.temperature, p.top_p, p.top_k, p.min_p) == (
        1,
        None,
        1.0,
        1.0,
        -1,
        0.0,
    )
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert (p.max_tokens, p.min_tokens, p.logprobs, p.prompt_logprobs) == (16, 0, None, None)
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not (p.use_beam_search or p.ignore_eos or p.include_stop_str_in_output)
    assert (p.length_penalty, p.early_stopping, p.truncate_prompt_tokens) == (1.0, False, None)
    assert SamplingParams(top_k=0).top_k == -1  # 0 means all, like -1
    assert SamplingParams(stop="x").stop == ["x"]  # type: ignore[arg-type]
    assert SamplingParams(n=2, best_of=5).num_sequences == 5


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 0}, "n"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": {1: 101}}, "logit_bias"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"stop": [""]}, "stop"),
        ({"logprobs": -1}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"early_stopping": True}, "early_stopping"),  # without beam search
        ({"length_penalty": 0.5}, "length_penalty"),  # without beam search
        ({"use_beam_search": True, "early_stopping": "sometimes"}, "early_stopping"),
        ({"use_beam_search": True, "length_penalty": float("inf")}, "length_penalty"),
        ({"use_beam_search": True, "n": 2, "prompt_logprobs": 0}, "prompt_logprobs"),
    ],
)
def test_out_of_range_names_the_parameter(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == param and info.value.status_code == 400


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logit_bias": {100: 1.0}}, "logit_bias"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"allowed_token_ids": [1, 100]}, "allowed_token_ids"),
    ],
)
def test_token_ids_must_be_in_the_vocabulary(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs).check_vocab(100)
    assert info.value.param == param and "[0, 100)" in info.value.message


def test_logprobs_cap_is_vllm_s_max_logprobs() -> None:
    SamplingParams(logprobs=20, prompt_logprobs=20).check_max_logprobs()
    for name in ("logprobs", "prompt_logprobs"):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(**{name: 21}).check_max_logprobs()
        assert info.value.param == name and "max allowed: 20" in info.value.message


def test_beam_search_options_are_accepted_with_beam_search() -> None:
    for early in (True, False, "never"):
        p = SamplingParams(use_beam_search=True, early_stopping=early, length_penalty=0.0, n=2)
        assert p.num_sequences == 2


def test_truncate_prompt_keeps_the_last_tokens() -> None:
    assert SamplingParams(truncate_prompt_tokens=2).truncate_prompt([1, 2, 3], 8) == [2, 3]
    assert SamplingParams().truncate_prompt([1, 2, 3], 8) == [1, 2, 3]
    # vLLM's -1: the last max_model_len tokens
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt([1, 2, 3], 2) == [2, 3]
    assert SamplingParams(truncate_prompt_tokens=-1).truncate_prompt([1, 2, 3], 8) == [1, 2, 3]
