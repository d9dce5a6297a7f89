"""Sampling parameters on the bundled model: each one's effect, logprobs and beam search vs HF."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.engine.outputs import CompletionOutput

FRANCE = "The capital of France is"
STORY = "Once upon a time, in a land far away, there lived a"
YES_NO = "<|im_start|>user\nSay yes or no: is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
EOS = 2
LOGPROB_ATOL = 5e-3  # logits agree within 2e-3 (test_parity); log_softmax at most doubles it


@pytest.fixture(scope="module")
def llm(bundled_gguf_path: str) -> LLM:
    return LLM(bundled_gguf_path, dtype="float32", kv_cache_memory=128 << 20)


def generate(llm: LLM, prompt: str | list[int], **params: Any) -> list[CompletionOutput]:
    return llm.generate([prompt], SamplingParams(**params))[0].outputs


def tokens(llm: LLM, prompt: str, **params: Any) -> list[int]:
    return generate(llm, prompt, **params)[0].token_ids


def generate_each(llm: LLM, runs: list[tuple[str, dict[str, Any]]]) -> list[list[CompletionOutput]]:
    """Several (prompt, params) runs batched in one generate call (fewer engine steps)."""
    results = llm.generate([p for p, _ in runs], [SamplingParams(**kw) for _, kw in runs])
    return [r.outputs for r in results]


def test_top_k_1_equals_greedy(llm: LLM) -> None:
    common = dict(max_tokens=8, ignore_eos=True)
    greedy, *top1 = generate_each(
        llm,
        [(STORY, dict(temperature=0.0, **common))]
        + [(STORY, dict(temperature=1.3, top_k=1, seed=seed, **common)) for seed in (1, 2)],
    )
    assert [o[0].token_ids for o in top1] == [greedy[0].token_ids] * 2


def test_logit_bias_forces_and_allowed_token_ids_confine(llm: LLM) -> None:
    (banana,) = llm.tokenizer.encode(" banana", add_special_tokens=False)
    allowed = llm.tokenizer.encode(" red green blue", add_special_tokens=False)
    forced, confined = generate_each(
        llm,
        [
            (FRANCE, dict(temperature=0.0, max_tokens=4, logit_bias={banana: 100})),
            (FRANCE, dict(temperature=1.5, max_tokens=6, n=3, seed=3, allowed_token_ids=allowed)),
        ],
    )
    assert forced[0].token_ids == [banana] * 4 and forced[0].text == " banana" * 4
    drawn = {t for o in confined for t in o.token_ids}
    assert drawn <= set(allowed) and len(drawn) > 1


def test_min_tokens_and_ignore_eos_give_exact_lengths(llm: LLM) -> None:
    natural, exact, longer = generate_each(
        llm,
        [
            (YES_NO, dict(temperature=0.0, max_tokens=12)),
            (YES_NO, dict(temperature=0.0, max_tokens=9, min_tokens=9, ignore_eos=True)),
            (YES_NO, dict(temperature=0.0, max_tokens=12, min_tokens=6)),
        ],
    )
    ids = natural[0].token_ids
    assert ids[-1] == EOS and len(ids) < 6  # without min_tokens it ends early
    assert len(exact[0].token_ids) == 9
    assert len(longer[0].token_ids) >= 6 and EOS not in longer[0].token_ids[:5]


def test_stop_token_ids_and_stop_reason(llm: LLM) -> None:
    base = generate(llm, STORY, temperature=0.0, max_tokens=5, ignore_eos=True)[0].token_ids
    (out,) = generate(llm, STORY, temperature=0.0, max_tokens=5, stop_token_ids=[base[3]])
    assert out.token_ids == base[:4] and out.finish_reason == "stop" and out.stop_reason == base[3]
    assert out.text == llm.tokenizer.decode(base[:3])  # the stop id's text is left out


def test_seed_reproduces_whatever_else_is_batched(llm: LLM) -> None:
    seeded = dict(temperature=1.0, top_p=0.95, seed=1234, max_tokens=6, ignore_eos=True)
    ((alone,),) = generate_each(llm, [(STORY, seeded)])
    batch = generate_each(
        llm,
        [
            (FRANCE, dict(temperature=0.8, max_tokens=4)),
            (STORY, dict(temperature=1.0, top_p=0.95, max_tokens=6, n=2, ignore_eos=True)),
            (STORY, seeded),
        ],
    )
    assert batch[2][0].token_ids == alone.token_ids
    assert batch[1][0].token_ids != batch[1][1].token_ids  # unseeded: different samples


def test_repetition_penalty_changes_repetitive_output(llm: LLM) -> None:
    apples = "List: apple, apple, apple, apple,"
    base, penalised = generate_each(
        llm,
        [
            (apples, dict(temperature=0.0, max_tokens=6)),
            (apples, dict(temperature=0.0, max_tokens=6, repetition_penalty=1.8)),
        ],
    )
    assert base[0].text.count("apple") > penalised[0].text.count("apple")


def test_logprobs_are_log_softmax_of_reference_logits(llm: LLM, hf_reference: Any) -> None:
    prompt_ids = llm.tokenizer.encode(FRANCE)
    result = llm.generate(
        [prompt_ids], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2)
    )[0]
    out = result.outputs[0]
    full = prompt_ids + out.token_ids
    with torch.no_grad():
        reference = torch.log_softmax(hf_reference(torch.tensor([full])).logits[0].float(), -1)
    assert result.prompt_logprobs is not None and result.prompt_logprobs[0] is None
    scored = [*result.prompt_logprobs[1:], *(out.logprobs or [])]
    assert len(scored) == len(full) - 1
    for position, entry in enumerate(scored):
        assert entry is not None
        token = full[position + 1]
        assert next(iter(entry)) == token  # the chosen token comes first
        for token_id, logprob in entry.items():
            expected = reference[position, token_id].item()
            assert logprob.logprob == pytest.approx(expected, abs=LOGPROB_ATOL)
            assert logprob.decoded_token == llm.tokenizer.decode([token_id])
        top = reference[position].topk(2).indices.tolist()
        assert all(entry[t].rank == r for r, t in enumerate(top, 1) if t in entry)
    assert out.cumulative_logprob == pytest.approx(sum(e[t].logprob for e, t in
                                                       zip(out.logprobs or [], out.token_ids, strict=True)))  # fmt: skip


def test_prompt_logprobs_survive_chunked_prefill(llm: LLM) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    whole = llm.generate([STORY], params)[0].prompt_logprobs
    config = llm.engine.core.scheduler.config
    saved, config.max_num_batched_tokens = config.max_num_batched_tokens, 3
    try:
        chunked = llm.generate([STORY], params)[0].prompt_logprobs
    finally:
        config.max_num_batched_tokens = saved
    assert whole is not None and chunked is not None and len(whole) == len(chunked)
    for a, b in zip(whole[1:], chunked[1:], strict=True):
        assert a is not None and b is not None and list(a) == list(b)
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 for t in a)


def test_echo_style_prompt_only_request(llm: LLM) -> None:
    result = llm.generate([FRANCE], SamplingParams(max_tokens=0, prompt_logprobs=0, n=2))[0]
    assert [o.token_ids for o in result.outputs] == [[], []]
    assert result.prompt_logprobs is not None
    assert len(result.prompt_logprobs) == len(result.prompt_token_ids)


def test_best_of_returns_the_highest_scoring_candidates(llm: LLM) -> None:
    common = dict(temperature=1.0, max_tokens=5, seed=7, ignore_eos=True)
    candidates, best = generate_each(
        llm, [(STORY, dict(n=4, logprobs=0, **common)), (STORY, dict(n=2, best_of=4, **common))]
    )
    ranked = sorted(candidates, key=lambda o: o.cumulative_logprob or 0.0, reverse=True)
    assert [o.token_ids for o in best] == [o.token_ids for o in ranked[:2]]
    assert [o.index for o in best] == [0, 1] and best[0].logprobs is None


BEAM_CASES = [
    # prompt, num_beams, num_return_sequences, length_penalty, early_stopping, max_new_tokens
    (YES_NO, 3, 2, 1.0, True, 7),
    (YES_NO, 3, 3, 1.0, False, 7),
    (FRANCE, 2, 2, 2.0, "never", 5),
]


def test_beam_search_matches_transformers(llm: LLM, hf_reference: Any) -> None:
    prompts = [llm.tokenizer.encode(case[0]) for case in BEAM_CASES]
    params = [
        SamplingParams(
            use_beam_search=True,
            best_of=beams,
            n=n,
            length_penalty=lp,
            early_stopping=early,
            max_tokens=max_new,
        )  # fmt: skip
        for _, beams, n, lp, early, max_new in BEAM_CASES
    ]
    ours = llm.generate(prompts, params)
    for ids, case, result in zip(prompts, BEAM_CASES, ours, strict=True):
        _, beams, n, lp, early, max_new = case
        with torch.no_grad():
            expected = hf_reference.generate(
                torch.tensor([ids]), num_beams=beams, num_return_sequences=n, do_sample=False,
                length_penalty=lp, early_stopping=early, max_new_tokens=max_new,
            )[:, len(ids):].tolist()  # fmt: skip
        got = [o.token_ids for o in result.outputs]
        assert got == [_strip_padding(seq) for seq in expected], case
        for output in result.outputs:
            assert output.finish_reason == ("stop" if output.token_ids[-1] == EOS else "length")


def _strip_padding(token_ids: list[int]) -> list[int]:
    """transformers pads finished beams with pad (= EOS here): keep up to the first EOS."""
    return token_ids[: token_ids.index(EOS) + 1] if EOS in token_ids else token_ids
