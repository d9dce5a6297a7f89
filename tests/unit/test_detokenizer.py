"""Incremental detokenization: split UTF-8, special tokens, stop strings and their hold-back."""

from __future__ import annotations

import random
from typing import Any

import pytest

from tokenmill.model.gguf_reader import GGUFFile
from tokenmill.model.gguf_tokenizer import load_gguf_tokenizer
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer, TokenTexts, detokenize
from tokenmill.tokenizer.tokenizer import Tokenizer

IM_END = 2


@pytest.fixture(scope="module")
def tokenizer(bundled_gguf_path: str) -> Tokenizer:
    """The bundled SmolLM2 tokenizer (byte-level BPE): read from the GGUF header, no weights."""
    return load_gguf_tokenizer(GGUFFile(bundled_gguf_path))


def stream(
    tokenizer: Tokenizer, token_ids: list[int], **params: Any
) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed tokens one by one; return the detokenizer and the visible text after each."""
    detok = IncrementalDetokenizer(tokenizer, SamplingParams(**params), tokenizer.encode("Say:"))
    seen = []
    for token_id in token_ids:
        detok.add_token(token_id)
        seen.append(detok.visible_text(finished=False))
    return detok, seen


def test_emoji_and_cjk_never_show_a_broken_character(tokenizer: Tokenizer) -> None:
    text = " héllo 😀 你好，世界 🎉🎉"
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert len(ids) > len(text.split())  # multi-byte characters really are split across tokens
    detok, seen = stream(tokenizer, ids)
    assert detok.text == text
    assert all("\ufffd" not in s for s in seen), pieces
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:], strict=False))  # only grows


def test_token_bytes_reassemble_split_characters(tokenizer: Tokenizer) -> None:
    texts = TokenTexts(tokenizer)
    ids = tokenizer.encode(" 😀你好", add_special_tokens=False)
    assert bytes(b for i in ids for b in texts.bytes(i)) == " 😀你好".encode()
    assert "\ufffd" in "".join(texts.text(i) for i in ids)  # single tokens: vLLM's U+FFFD
    assert texts.text(IM_END) == "<|im_end|>" and texts.bytes(IM_END) == list(b"<|im_end|>")


def test_stop_string_across_two_tokens_is_withheld_then_cut(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" The end of the story.", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert " end" in pieces and " of" in pieces  # "end of" spans two tokens
    detok, seen = stream(tokenizer, ids, stop=["end of"])
    assert detok.stop_string == "end of" and detok.text == " The "
    assert "end" not in "".join(seen)  # " end" might start the stop string: never shown
    with_stop, _ = stream(tokenizer, ids, stop=["end of"], include_stop_str_in_output=True)
    assert with_stop.text == " The end of"


def test_hold_back_only_while_it_may_still_be_a_stop(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" The end is near", add_special_tokens=False)
    detok, seen = stream(tokenizer, ids, stop=["end of"])
    assert detok.stop_string is None
    at_end = seen[[tokenizer.decode(ids[: i + 1]) for i in range(len(ids))].index(" The end")]
    assert at_end == " The "  # " end" could still become "end of"
    assert seen[-1] == " The end is near"  # " end is" cannot: released


def test_stop_strings_count_only_after_min_tokens(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode(" a b a b", add_special_tokens=False)
    assert len(ids) == 4
    assert stream(tokenizer, ids, stop=[" a"])[0].text == ""
    late, _ = stream(tokenizer, ids, stop=[" a"], min_tokens=2, max_tokens=16)
    assert late.text == " a b"  # the first " a" came before min_tokens


def test_skip_special_tokens(tokenizer: Tokenizer) -> None:
    ids = [*tokenizer.encode(" Paris", add_special_tokens=False), IM_END]
    assert stream(tokenizer, ids)[0].text == " Paris"
    assert stream(tokenizer, ids, skip_special_tokens=False)[0].text == " Paris<|im_end|>"


@pytest.mark.parametrize("skip_special", [True, False])
def test_table_of_token_texts_gives_the_streams_text(
    tokenizer: Tokenizer, skip_special: bool
) -> None:
    """Byte-level tokens that are whole characters come from a table, not the tokenizer's
    stream: text after every token is the stream's own, through split characters, special
    tokens, U+FFFD and random ids."""
    from tokenizers.decoders import DecodeStream

    rng = random.Random(7)
    mixed = tokenizer.encode(" héllo 😀 你好，世界 🎉\ufffd <|im_end|> x", add_special_tokens=False)
    ids = [*mixed, IM_END, *mixed]
    ids += [rng.randrange(tokenizer.vocab_size) for _ in range(3000)]
    ids += [rng.choice([*mixed, IM_END, 0, 1]) for _ in range(500)]
    prompt = tokenizer.encode("Say:")
    params = SamplingParams(skip_special_tokens=skip_special)
    detok = IncrementalDetokenizer(tokenizer, params, prompt)
    reference = DecodeStream(ids=prompt[-6:], skip_special_tokens=skip_special)
    backend, expected = tokenizer.hf.backend_tokenizer, ""
    for i, token_id in enumerate(ids):
        try:
            expected += reference.step(backend, token_id) or ""
        except Exception:  # an invalid prefix: the detokenizer starts its stream afresh too
            reference = DecodeStream(skip_special_tokens=skip_special)
            expected += reference.step(backend, token_id) or ""
        detok.add_token(token_id)
        assert detok.text == expected, (i, token_id)
    table = tokenizer.pieces
    assert table and sum(1 for piece in table.values() if piece) > 1000  # the table served
    assert any(piece == "" for piece in table.values())  # and the stream the rest


def _wordpiece_tokenizer() -> Tokenizer:
    """A WordPiece tokenizer, whose decoder puts spaces between tokens (special ones too)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "hello": 3, "world": 4, "##s": 5}
    backend = Backend(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )
    return Tokenizer(hf, [2], None)


def test_spaces_between_special_tokens() -> None:
    tokenizer = _wordpiece_tokenizer()
    ids = [3, 1, 2, 4, 5, 2]
    keep = SamplingParams(skip_special_tokens=False)
    tight = SamplingParams(skip_special_tokens=False, spaces_between_special_tokens=False)
    assert detokenize(tokenizer, keep, [], ids).text == "hello [CLS] [SEP] worlds [SEP]"
    assert detokenize(tokenizer, tight, [], ids).text == "hello [CLS][SEP] worlds [SEP]"
    assert detokenize(tokenizer, SamplingParams(), [], ids).text == "hello worlds"
