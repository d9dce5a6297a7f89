"""Structured outputs in the engine: free rows unaffected, preemption, n, EOS rules, offline API."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tokenmill import SamplingParams
from tokenmill.engine.scheduler import SchedulerOutput
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import structured_spec

FREE_PROMPTS = ["The capital of France is", "def add(a, b):", "List three colors:"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SCHEMA = {
    "type": "object",
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["n"],
}
CONSTRAINED = [
    ("Give JSON:", {"json": SCHEMA}, None),
    ("Digits:", {"regex": r"[0-9]{2,12}"}, "outlines"),
    ("Yes or no?", {"choice": ["yes", "no"]}, None),
    ("Math:", {"grammar": 'root ::= [0-9]{1,2} ("+" [0-9]{1,2}){0,4}'}, None),
]


def token_ids(outputs: list[Any]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def constrained_params(options: dict[str, Any], backend: str | None, **kw: Any) -> SamplingParams:
    spec = structured_spec(backend, **options)
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 24, **kw}, structured_outputs=spec)


def assert_valid(text: str, options: dict[str, Any]) -> None:
    if "json" in options:
        assert 0 <= json.loads(text)["n"] <= 99, text
    elif "regex" in options:
        assert re.fullmatch(options["regex"], text), text
    elif "choice" in options:
        assert text in options["choice"], text
    else:
        assert re.fullmatch(r"[0-9]{1,2}(\+[0-9]{1,2}){0,4}", text), text


def test_free_requests_are_unaffected_by_constrained_neighbours(default_llm: Any) -> None:
    alone = token_ids(default_llm.generate(FREE_PROMPTS, GREEDY))
    prompts: list[str] = []
    params: list[SamplingParams] = []
    for free, (prompt, options, backend) in zip(FREE_PROMPTS, CONSTRAINED, strict=False):
        prompts += [prompt, free]
        params += [constrained_params(options, backend), GREEDY]
    prompt, options, backend = CONSTRAINED[-1]
    outputs = default_llm.generate(
        [*prompts, prompt], [*params, constrained_params(options, backend)]
    )
    assert token_ids(outputs[1::2]) == alone
    for output, (_, options, _) in zip(outputs[0::2], CONSTRAINED, strict=True):
        assert output.outputs[0].finish_reason == "stop"
        assert_valid(output.outputs[0].text, options)


def test_preemption_recomputes_without_advancing_the_grammar(default_llm: Any) -> None:
    params = constrained_params({"regex": r"[0-9]{8}"}, None)
    (expected,) = default_llm.generate(["Digits:"], params)
    engine = default_llm.engine
    ids = default_llm.tokenizer.encode("Digits:")
    engine.add_request("preempted", ids, params)
    for _ in range(4):
        engine.step()
    scheduler = engine.core.scheduler
    (request,) = scheduler.running
    scheduler.running.remove(request)
    scheduler._preempt(request, SchedulerOutput())  # its KV is recomputed from the tokens
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    assert scheduler.num_preemptions >= 1
    assert outputs[-1].outputs[0].token_ids == expected.outputs[0].token_ids
    assert re.fullmatch(r"[0-9]{8}", outputs[-1].outputs[0].text)


def test_ignore_eos_and_min_tokens_still_end_with_the_grammar(default_llm: Any) -> None:
    choice = {"choice": ["yes", "no"]}
    digits = {"regex": r"[0-9]{1,8}"}
    outputs = default_llm.generate(
        ["Yes or no?", "Yes or no?", "Digits:"],
        [
            constrained_params(choice, None, ignore_eos=True, max_tokens=50),
            constrained_params(choice, "outlines", min_tokens=10, max_tokens=50),
            constrained_params(digits, None, min_tokens=5, max_tokens=50),
        ],
    )
    for output, options in zip(outputs, (choice, choice, digits), strict=True):
        assert output.outputs[0].finish_reason == "stop"
        assert_valid(output.outputs[0].text, options)
    assert len(outputs[2].outputs[0].token_ids) >= 5  # EOS was held back until then


def test_n_and_best_of_give_each_sequence_its_own_matcher(default_llm: Any) -> None:
    options = {"regex": r"[a-z]{2,4} [a-z]{2,4}"}
    params = constrained_params(options, None, temperature=1.0, n=2, best_of=3, seed=11)
    (output,) = default_llm.generate(["Two words:"], params)
    assert len(output.outputs) == 2
    for sequence in output.outputs:
        assert_valid(sequence.text, options)


def test_offline_spellings_and_errors(default_llm: Any) -> None:
    by_dict = SamplingParams(temperature=0.0, structured_outputs={"choice": ["up", "down"]})
    (output,) = default_llm.generate(["Up or down?"], by_dict)
    assert output.outputs[0].text in ("up", "down")
    with pytest.raises(InvalidRequestError, match="beam search"):
        SamplingParams(use_beam_search=True, n=2, structured_outputs={"regex": "a+"})
    with pytest.raises(InvalidRequestError, match="regex") as info:
        default_llm.generate(["x"], SamplingParams(structured_outputs={"regex": "(a"}))
    assert info.value.param == "structured_outputs.regex"
    assert not default_llm.engine.has_unfinished
