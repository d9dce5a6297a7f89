"""SamplingParams.output_kind on the bundled model: DELTA outputs carry only what is new and
add up to the CUMULATIVE ones; FINAL_ONLY gives the last one alone; queued deltas fold."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tokenmill.engine.outputs import CompletionOutput, RequestOutput, take_newest
from tokenmill.errors import InvalidRequestError
from tokenmill.sampling_params import RequestOutputKind, SamplingParams

PROMPT = "The capital of France is"

# what each exercises: the plain path; stop strings (text held back, then cut); logprobs,
# prompt logprobs and several sequences (the general path); best_of (final only anyway)
CASES = {
    "plain": SamplingParams(temperature=0.0, max_tokens=12),
    "stop string": SamplingParams(temperature=0.0, max_tokens=24, stop=[" city", "."]),
    "logprobs, n=2": SamplingParams(
        temperature=0.8, seed=7, n=2, max_tokens=10, logprobs=2, prompt_logprobs=1
    ),
    "best_of": SamplingParams(temperature=0.8, seed=3, n=1, best_of=3, max_tokens=6),
}


def run(llm, params: SamplingParams, kind: RequestOutputKind) -> list[RequestOutput]:
    """Every output the engine gives one request, step by step."""
    engine = llm.engine
    request_id = f"kind-{kind.name}-{id(params)}"
    prompt = llm.tokenizer.encode(PROMPT)
    engine.add_request(request_id, prompt, dataclasses.replace(params, output_kind=kind))
    outputs = []
    while engine.has_unfinished:
        outputs += [o for o in engine.step() if o.request_id == request_id]
    assert outputs and outputs[-1].finished and not any(o.finished for o in outputs[:-1])
    return outputs


def same(a: RequestOutput, b: RequestOutput) -> None:
    assert a.finished and b.finished
    assert a.prompt_logprobs == b.prompt_logprobs
    assert len(a.outputs) == len(b.outputs)
    for x, y in zip(a.outputs, b.outputs, strict=True):
        assert (x.index, x.text, x.token_ids) == (y.index, y.text, y.token_ids)
        assert (x.finish_reason, x.stop_reason) == (y.finish_reason, y.stop_reason)
        assert x.cumulative_logprob == y.cumulative_logprob
        assert x.logprobs == y.logprobs


@pytest.mark.parametrize("case", CASES)
def test_deltas_add_up_to_the_cumulative_output(default_llm, case: str) -> None:
    params = CASES[case]
    cumulative = run(default_llm, params, RequestOutputKind.CUMULATIVE)
    deltas = run(default_llm, params, RequestOutputKind.DELTA)
    final = run(default_llm, params, RequestOutputKind.FINAL_ONLY)
    assert len(final) == 1
    same(final[0], cumulative[-1])
    # each delta holds only what is new: the ids and logprobs of a sequence, laid end to
    # end, are the cumulative ones (no id twice); prompt logprobs come once
    for seq in cumulative[-1].outputs:
        parts = [c for d in deltas for c in d.outputs if c.index == seq.index]
        assert [t for c in parts for t in c.token_ids] == seq.token_ids
        assert "".join(c.text for c in parts) == seq.text
        if seq.logprobs is not None:
            assert [e for c in parts for e in c.logprobs or []] == seq.logprobs
    assert sum(d.prompt_logprobs is not None for d in deltas) == (
        params.prompt_logprobs is not None
    )
    if params.best_of is None:  # streamed: a delta each step, not one at the end
        assert len(deltas) == len(cumulative) > 1
    folded = deltas[0]
    for later in deltas[1:]:
        folded.add(later)
    same(folded, cumulative[-1])


def test_queued_outputs_fold_into_one() -> None:
    """What a stream that fell behind gets: deltas folded; a cumulative snapshot, the newest."""

    def delta(text: str, ids: list[int], finished: bool = False) -> RequestOutput:
        reason = "length" if finished else None
        return RequestOutput("r", [1], [CompletionOutput(0, text, ids, reason)], finished)

    queue: asyncio.Queue = asyncio.Queue()
    for item in (delta("b", [2]), delta("c", [3], finished=True), delta("x", [9])):
        queue.put_nowait(item)
    folded = take_newest(delta("a", [1]), queue, delta=True)
    assert isinstance(folded, RequestOutput) and folded.finished
    assert (folded.outputs[0].text, folded.outputs[0].token_ids) == ("abc", [1, 2, 3])
    assert queue.qsize() == 1  # it stopped at the finished one
    queue.get_nowait()
    replaced = delta("a", [1])
    replaced.add(delta("ab", [1, 2], finished=True), aggregate=False)  # (vLLM's other mode)
    assert (replaced.outputs[0].text, replaced.outputs[0].token_ids) == ("ab", [1, 2])
    assert replaced.finished
    newest = delta("ab", [1, 2])
    queue.put_nowait(newest)
    assert take_newest(delta("a", [1]), queue, delta=False) is newest


def test_generate_asks_for_final_outputs_without_changing_the_callers_params(
    default_llm,
) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=5)
    [output] = default_llm.generate(PROMPT, params)
    assert params.output_kind is RequestOutputKind.CUMULATIVE  # the caller's, unchanged
    assert len(output.outputs[0].token_ids) == 5
    cumulative = run(default_llm, params, RequestOutputKind.CUMULATIVE)
    same(output, cumulative[-1])


def test_output_kind_must_be_one_of_the_kinds() -> None:
    assert SamplingParams(output_kind=1).output_kind is RequestOutputKind.DELTA  # type: ignore[arg-type]
    for bad in (3, "delta", None):
        with pytest.raises(InvalidRequestError, match="output_kind"):
            SamplingParams(output_kind=bad)  # type: ignore[arg-type]
