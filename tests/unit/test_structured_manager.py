"""StructuredOutputManager: 400s with the compiler's message, the compile cache, concurrency,
and the matcher contract every backend shares (EOS, padding, rejection, rollback)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tokenmill.errors import InvalidRequestError
from tokenmill.model.loader import load_model_source
from tokenmill.structured import StructuredOutputManager, StructuredSpec, spec_from_request_fields
from tokenmill.structured.bitmask import unpack_bitmask
from tokenmill.tokenizer.tokenizer import Tokenizer

BACKENDS = ["xgrammar", "outlines", "lm-format-enforcer"]
_unique = itertools.count()


def fresh_regex() -> str:
    """A regex no earlier test compiled: a cache miss."""
    return f"(id{next(_unique)}|x)[0-9]{{1,3}}"


def spec(backend: str | None = None, **fields: Any) -> StructuredSpec:
    result = spec_from_request_fields(guided_decoding_backend=backend, **fields)
    assert result is not None
    return result


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_model_source(None).tokenizer


@pytest.fixture(scope="module")
def manager(tokenizer: Tokenizer) -> Iterator[StructuredOutputManager]:
    manager = StructuredOutputManager(tokenizer, tokenizer.vocab_size + 64, max_workers=2)
    yield manager
    manager.close()


def allowed_ids(matcher: Any, vocab_size: int) -> list[int]:
    mask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)
    matcher.fill_bitmask(mask, 0)
    return unpack_bitmask(mask, vocab_size)[0].nonzero().flatten().tolist()


def text_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# -- 400s ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "fields", "message"),
    [
        ("xgrammar", {"guided_regex": "(ab"}, "parenthesis is not closed"),
        ("outlines", {"guided_regex": "(ab"}, "missing \\), unterminated subpattern"),
        ("lm-format-enforcer", {"guided_regex": "(ab"}, "missing \\), unterminated subpattern"),
        ("outlines", {"guided_regex": "a(?=b)"}, "unsupported regex"),
        ("xgrammar", {"guided_regex": "a(?=b)"}, "Lookahead is not supported"),
        ("xgrammar", {"guided_json": {"type": "nope"}}, "invalid JSON schema at type: 'nope'"),
        ("outlines", {"guided_json": {"type": "nope"}}, "invalid JSON schema at type"),
        ("lm-format-enforcer", {"guided_json": {"type": "nope"}}, "invalid JSON schema at type"),
        (
            "xgrammar",
            {"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}},
            "minimum greater than maximum",
        ),
        (
            "outlines",
            {"guided_json": {"type": "integer", "minimum": 5, "maximum": 1}},
            "integer range \\[5, 1\\] is empty",
        ),
        ("xgrammar", {"guided_grammar": "root ::= foo"}, 'Rule "foo" is not defined'),
        ("xgrammar", {"guided_grammar": "start: foo"}, "unknown name 'foo'"),
        ("outlines", {"guided_grammar": 'root ::= "a"'}, "cannot express a grammar"),
        ("lm-format-enforcer", {"guided_grammar": 'root ::= "a"'}, "cannot express a grammar"),
    ],
)
def test_invalid_constraints_are_a_400_carrying_the_compilers_message(
    manager: StructuredOutputManager, backend: str, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message) as info:
        manager.compile(spec(backend, **fields))
    assert info.value.status_code == 400
    assert info.value.param == next(iter(fields))
    assert manager.compile(spec(backend, guided_regex="[0-9]")) is not None  # still serving


def test_unknown_backend_and_unsupported_options_are_400s(
    manager: StructuredOutputManager,
) -> None:
    with pytest.raises(InvalidRequestError, match="choose one of xgrammar") as info:
        manager.validate(spec("guidance", guided_regex="a"))
    assert info.value.param == "guided_decoding_backend"
    with pytest.raises(InvalidRequestError, match="whitespace pattern"):
        manager.validate(spec("lm-format-enforcer", guided_json={}, guided_whitespace_pattern=" "))
    with pytest.raises(InvalidRequestError, match="limit is 1000000") as info:
        manager.validate(spec(guided_regex="a" * 1_000_001))
    assert info.value.param == "guided_regex"
    with pytest.raises(ValueError, match="unknown guided decoding backend"):
        StructuredOutputManager(manager.tokenizer, manager.vocab_size, default_backend="nope")


def test_errors_are_not_cached(manager: StructuredOutputManager) -> None:
    bad = spec(guided_regex="(" + fresh_regex())
    for attempt in range(2):
        before = manager.num_compilations
        with pytest.raises(InvalidRequestError):
            manager.compile(bad)
        assert manager.num_compilations == before + 1, attempt


# -- cache and concurrency -------------------------------------------------------------------


def test_a_cache_hit_returns_the_same_compiled_grammar_without_compiling(
    manager: StructuredOutputManager,
) -> None:
    regex = fresh_regex()
    first = manager.compile(spec(guided_regex=regex))
    before = manager.num_compilations
    assert manager.compile(spec(guided_regex=regex)) is first
    assert manager.compile(spec("xgrammar", guided_regex=regex)) is first  # default = xgrammar
    assert asyncio.run(manager.compile_async(spec(guided_regex=regex))) is first
    assert manager.num_compilations == before
    assert manager.compile(spec("outlines", guided_regex=regex)) is not first
    assert manager.num_compilations == before + 1


def test_the_cache_is_a_bounded_lru(tokenizer: Tokenizer) -> None:
    manager = StructuredOutputManager(tokenizer, tokenizer.vocab_size, max_cache_entries=2)
    a, b, c = (spec(guided_regex=fresh_regex()) for _ in range(3))
    compiled_a = manager.compile(a)
    manager.compile(b)
    assert manager.compile(a) is compiled_a  # a is now the most recent
    manager.compile(c)  # evicts b
    assert manager.compile(a) is compiled_a
    before = manager.num_compilations
    manager.compile(b)
    assert manager.num_compilations == before + 1
    manager.close()


def test_concurrent_requests_for_one_spec_share_one_compilation(
    manager: StructuredOutputManager,
) -> None:
    shared = spec(guided_regex=fresh_regex())

    async def main() -> list[Any]:
        return await asyncio.gather(*(manager.compile_async(shared) for _ in range(8)))

    before = manager.num_compilations
    results = asyncio.run(main())
    assert manager.num_compilations == before + 1
    assert all(result is results[0] for result in results)


def test_a_cancelled_waiter_does_not_cancel_the_shared_compilation(
    manager: StructuredOutputManager,
) -> None:
    shared = spec(guided_json={"type": "object", "properties": {"k": {"enum": [fresh_regex()]}}})

    async def main() -> Any:
        doomed = asyncio.create_task(manager.compile_async(shared))
        survivor = asyncio.create_task(manager.compile_async(shared))
        await asyncio.sleep(0)
        doomed.cancel()
        return await survivor

    assert asyncio.run(main()) is manager.compile(shared)


def test_compilation_runs_off_the_event_loop(manager: StructuredOutputManager) -> None:
    schema = {
        "type": "object",
        "properties": {f"field_{i}_{next(_unique)}": {"type": "string"} for i in range(40)},
    }

    async def main() -> int:
        ticks = 0
        task = asyncio.create_task(manager.compile_async(spec(guided_json=schema)))
        while not task.done():
            ticks += 1
            await asyncio.sleep(0.001)
        await task
        return ticks

    assert asyncio.run(main()) > 1  # the loop kept running while the grammar compiled


def test_a_compile_over_the_timeout_is_a_400_and_later_requests_get_the_result(
    manager: StructuredOutputManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    compile_now = manager._compile_now

    def slow(backend_name: str, s: Any) -> Any:
        time.sleep(0.5)
        return compile_now(backend_name, s)

    monkeypatch.setattr(manager, "_compile_now", slow)
    monkeypatch.setattr(manager, "compile_timeout_s", 0.05)
    slow_spec = spec(guided_regex=f"slow{next(_unique)}[0-9]+")
    with pytest.raises(InvalidRequestError, match="did not compile within 0.05 s"):
        asyncio.run(manager.compile_async(slow_spec))
    monkeypatch.setattr(manager, "compile_timeout_s", 60.0)
    assert asyncio.run(manager.compile_async(slow_spec)) is not None  # the same compilation


# -- the matcher contract --------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_eos_only_when_complete_every_eos_id_and_never_padding(
    tokenizer: Tokenizer, backend: str
) -> None:
    two_eos = Tokenizer(tokenizer.hf, eos_token_ids=[2, 0], chat_template=None)
    manager = StructuredOutputManager(two_eos, tokenizer.vocab_size + 64)
    matcher = manager.compile(spec(backend, guided_regex="[0-9]{2,3}")).new_matcher()
    for expected_eos, digit in [(False, "4"), (False, "2"), (True, "7")]:
        allowed = allowed_ids(matcher, manager.vocab_size)
        assert (0 in allowed and 2 in allowed) == expected_eos and (0 in allowed) == (2 in allowed)
        assert max(allowed) < tokenizer.vocab_size
        assert not matcher.is_terminated()
        assert matcher.accept_token(text_ids(tokenizer, digit)[0])
    assert matcher.is_terminated()  # three digits: nothing but EOS can follow
    assert allowed_ids(matcher, manager.vocab_size) == [0, 2]
    assert matcher.accept_token(0)
    assert not matcher.accept_token(text_ids(tokenizer, "5")[0])  # nothing after EOS
    manager.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_rejected_token_leaves_the_state_unchanged(
    tokenizer: Tokenizer, manager: StructuredOutputManager, backend: str
) -> None:
    matcher = manager.compile(spec(backend, guided_choice=["apple", "banana"])).new_matcher()
    before = allowed_ids(matcher, manager.vocab_size)
    assert not matcher.accept_token(text_ids(tokenizer, "cherry")[0])
    assert not matcher.accept_token(tokenizer.eos_token_ids[0])  # empty output is not a choice
    assert not matcher.accept_token(manager.vocab_size - 1)  # padding
    assert allowed_ids(matcher, manager.vocab_size) == before
    for token_id in text_ids(tokenizer, "banana"):
        assert matcher.accept_token(token_id)
    assert matcher.is_terminated()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rollback_restores_earlier_states(
    tokenizer: Tokenizer, manager: StructuredOutputManager, backend: str
) -> None:
    matcher = manager.compile(spec(backend, guided_regex="[a-z]+=[0-9]+")).new_matcher()
    token_ids = text_ids(tokenizer, "speed=42")
    masks = []
    for token_id in token_ids:
        masks.append(allowed_ids(matcher, manager.vocab_size))
        assert matcher.accept_token(token_id)
    end_mask = allowed_ids(matcher, manager.vocab_size)
    assert matcher.accept_token(tokenizer.eos_token_ids[0])
    matcher.rollback(1)  # undo EOS
    assert not matcher.is_terminated()
    assert allowed_ids(matcher, manager.vocab_size) == end_mask
    matcher.rollback(2)
    assert allowed_ids(matcher, manager.vocab_size) == masks[-2]
    for token_id in token_ids[-2:]:
        assert matcher.accept_token(token_id)
    assert allowed_ids(matcher, manager.vocab_size) == end_mask
    with pytest.raises(ValueError, match="cannot roll back"):
        matcher.rollback(len(token_ids) + 1)


def test_fill_bitmasks_matches_row_by_row_fills_for_a_mixed_batch(
    tokenizer: Tokenizer, manager: StructuredOutputManager
) -> None:
    """xgrammar rows go through the batched fill; the others, and ended ones, row by row."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    (c_id,) = text_ids(tokenizer, "c")

    def make_matchers() -> list[Any]:
        matchers = []
        for backend in BACKENDS:
            for i, fields in enumerate(({"guided_json": schema}, {"guided_choice": ["ab", "c"]})):
                matcher = manager.compile(spec(backend, **fields)).new_matcher()
                prefix = text_ids(tokenizer, '{"n": 12}')[: len(matchers)] if i == 0 else [c_id]
                for token_id in prefix:  # a different JSON state per backend
                    assert matcher.accept_token(token_id)
                matchers.append(matcher)
        assert matchers[1].accept_token(tokenizer.eos_token_ids[0])  # an ended xgrammar matcher
        return matchers

    rows = [7, 0, 3, 5, 1, 2]
    expected = manager.allocate_bitmask(8)
    for matcher, row in zip(make_matchers(), rows, strict=True):
        matcher.fill_bitmask(expected, row)
    batched = manager.allocate_bitmask(8)
    manager.fill_bitmasks(make_matchers(), batched, rows)
    assert torch.equal(batched[rows], expected[rows])
