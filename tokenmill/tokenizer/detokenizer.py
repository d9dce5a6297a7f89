"""Incremental detokenization with stop strings found across token boundaries."""

from __future__ import annotations

import logging
import re
from typing import Any, Protocol

from tokenizers.decoders import ByteLevel, DecodeStream

from tokenmill.tokenizer.tokenizer import Tokenizer


class DetokenizeOptions(Protocol):
    """The request options detokenizing follows (SamplingParams has them)."""

    @property
    def skip_special_tokens(self) -> bool: ...
    @property
    def spaces_between_special_tokens(self) -> bool: ...
    @property
    def stop(self) -> list[str]: ...
    @property
    def include_stop_str_in_output(self) -> bool: ...
    @property
    def min_tokens(self) -> int: ...


logger = logging.getLogger(__name__)

_PROMPT_CONTEXT = 6  # prompt tokens the stream starts from, so the first word gets its space
_INVALID_PREFIX = "Invalid prefix encountered"  # DecodeStream lost its state; start it afresh
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte-fallback tokens


class IncrementalDetokenizer:
    """Text of one sequence, grown one token at a time; never splits a UTF-8 character.

    `text` is everything decoded (cut at a stop string once one is found);
    `visible_text` withholds a tail only while it may still turn out to start a
    stop string. As in vLLM, stop strings count only after min_tokens tokens, and
    with spaces_between_special_tokens=False no space is put between two
    consecutive added (special) tokens.
    """

    def __init__(
        self, tokenizer: Tokenizer, params: DetokenizeOptions, prompt_token_ids: list[int]
    ):
        self._backend = tokenizer.hf.backend_tokenizer
        self._skip_special = params.skip_special_tokens
        self._stream = DecodeStream(
            ids=prompt_token_ids[-_PROMPT_CONTEXT:], skip_special_tokens=self._skip_special
        )
        self._pieces = _byte_pieces(tokenizer)
        self._table: dict[int, str] = {} if self._pieces is None else self._pieces
        # the text so far is whole characters, so a token that is whole characters adds
        # exactly its own text (its table entry); set once the stream gives text. The stream
        # does not see the tokens taken from the table: byte-level text is their bytes one
        # after another, so what it holds still decodes the next token's text the same.
        self._clean = False
        self._added = _added_tokens(tokenizer, params)
        self._last_added = False
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # no stop strings and no added-token spacing rule: a token's text is its piece
        self.is_plain = not self._stops and self._added is None
        self.num_tokens = 0
        self.text = ""
        self.stop_string: str | None = None  # the stop string that ended the text, if any
        self._stop_index = -1

    def add_token(self, token_id: int) -> None:
        """Decode one more token; afterwards check `stop_string`."""
        if self.stop_string is not None:
            return
        self.num_tokens += 1
        if self.is_plain:
            if self._clean:  # (most tokens: the table's, inline)
                piece = self._table.get(token_id)
                if piece:
                    self.text += piece
                    return
            self.text += self._step(token_id) or ""
            return
        piece = self._decode(token_id)
        if piece:
            start = max(0, len(self.text) - self._max_stop_len + 1)
            self.text += piece
            if self._stops and self.num_tokens > self._min_tokens:
                self._find_stop(start)

    def _decode(self, token_id: int) -> str:
        piece = self._step(token_id)
        if self._added is not None:
            content = self._added.get(token_id)
            if content is not None and self._last_added:
                piece = content  # the added token alone, without the space the decoder put
            self._last_added = content is not None
        return piece or ""

    def _step(self, token_id: int) -> str | None:
        pieces = self._pieces
        if self._clean and pieces is not None:
            piece = pieces.get(token_id)
            if piece is None:
                piece = pieces.learn(token_id)
            if piece:  # (most tokens: no call into the tokenizer)
                return piece
        try:
            piece = self._stream.step(self._backend, token_id)
        except Exception as e:
            if not str(e).startswith(_INVALID_PREFIX):
                raise
            logger.warning("detokenizer state reset after an invalid UTF-8 prefix")
            self._stream = DecodeStream(skip_special_tokens=self._skip_special)
            piece = self._stream.step(self._backend, token_id)
        self._clean = piece is not None
        return piece

    def _find_stop(self, search_from: int) -> None:
        for stop in self._stops:
            index = self.text.find(stop, search_from)
            if index != -1 and (self.stop_string is None or index < self._stop_index):
                self.stop_string, self._stop_index = stop, index
        if self.stop_string is not None:
            end = self._stop_index + (len(self.stop_string) if self._include_stop else 0)
            self.text = self.text[:end]

    def visible_text(self, finished: bool) -> str:
        """The text safe to show: all of it once finished, else minus a possible stop prefix."""
        if finished or self.stop_string is not None or not self._stops:
            return self.text
        return self.text[: len(self.text) - self._stop_prefix_len()]

    def _stop_prefix_len(self) -> int:
        """Length of the longest text suffix that is a proper prefix of a stop string."""
        return max((partial_suffix(self.text, stop) for stop in self._stops), default=0)


class NoText:
    """A sequence with detokenize=False (vLLM's): token ids only, no text, no stop strings."""

    text = ""
    stop_string: str | None = None
    is_plain = False  # (the engine's fast path decodes: not this one)

    def add_token(self, token_id: int) -> None:
        pass

    def visible_text(self, finished: bool) -> str:
        return ""


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker` (a stop string
    or a marker still arriving)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def detokenize(
    tokenizer: Tokenizer,
    params: DetokenizeOptions,
    prompt_token_ids: list[int],
    token_ids: list[int],
) -> IncrementalDetokenizer:
    """A finished sequence's text (stop strings applied) in one go."""
    detokenizer = IncrementalDetokenizer(tokenizer, params, prompt_token_ids)
    for token_id in token_ids:
        detokenizer.add_token(token_id)
    return detokenizer


def _added_tokens(tokenizer: Tokenizer, params: DetokenizeOptions) -> dict[int, str] | None:
    """Added tokens by id, when spaces between consecutive ones must be suppressed."""
    if params.skip_special_tokens or params.spaces_between_special_tokens:
        return None
    decoder = getattr(tokenizer.hf, "added_tokens_decoder", None) or {}
    return {int(i): str(getattr(t, "content", t)) for i, t in decoder.items()} or None


class _BytePieces(dict[int, str]):
    """The text of each token that decodes on its own to whole characters, for byte-level
    tokenizers (GPT-2's alphabet: a token's text is its bytes, whatever came before).

    A DecodeStream step costs ~1 us, a lookup ~0.05 us: at batch 256 the difference is a
    quarter of a millisecond per step. An entry "" marks a token the stream must decode:
    an added or special token, one with part of a UTF-8 character (or U+FFFD itself, which
    the stream also holds back), one with no text.
    """

    def __init__(self, backend: Any):
        super().__init__()
        self._backend = backend
        self._added = set(backend.get_added_tokens_decoder())

    def learn(self, token_id: int) -> str:
        piece = "" if token_id in self._added else self._backend.decode([token_id], False)
        if "\ufffd" in piece:
            piece = ""
        self[token_id] = piece
        return piece


def _byte_pieces(tokenizer: Tokenizer) -> _BytePieces | None:
    """The tokenizer's table of token texts, when it decodes byte-level (else None)."""
    if tokenizer.pieces is None:
        backend = getattr(tokenizer.hf, "backend_tokenizer", None)
        is_byte_level = backend is not None and type(backend.decoder) is ByteLevel
        tokenizer.pieces = _BytePieces(backend) if is_byte_level else False
    return tokenizer.pieces if isinstance(tokenizer.pieces, _BytePieces) else None


class TokenTexts:
    """Text and bytes of single tokens, for logprobs; cached per token id."""

    def __init__(self, tokenizer: Tokenizer):
        self._hf = tokenizer.hf
        decoder = getattr(getattr(self._hf, "backend_tokenizer", None), "decoder", None)
        self._is_byte_level = "ByteLevel" in repr(decoder)
        self._texts: dict[int, str] = {}
        self._bytes: dict[int, list[int]] = {}

    def text(self, token_id: int) -> str:
        """The token decoded on its own (a split UTF-8 character shows as U+FFFD, as in vLLM)."""
        text = self._texts.get(token_id)
        if text is None:
            token = self._hf.convert_ids_to_tokens(token_id)
            text = self._texts[token_id] = str(self._hf.convert_tokens_to_string([token]))
        return text

    def bytes(self, token_id: int) -> list[int]:
        """The token's own bytes (OpenAI's `bytes`): exact even for part of a UTF-8 character."""
        value = self._bytes.get(token_id)
        if value is None:
            value = self._bytes[token_id] = self._raw_bytes(token_id)
        return value

    def _raw_bytes(self, token_id: int) -> list[int]:
        token: Any = self._hf.convert_ids_to_tokens(token_id)
        if isinstance(token, str):
            if self._is_byte_level and all(c in _BYTE_DECODER for c in token):
                return [_BYTE_DECODER[c] for c in token]
            match = _BYTE_TOKEN.fullmatch(token)
            if match:
                return [int(match.group(1), 16)]
        return list(self.text(token_id).encode("utf-8"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_DECODER = {char: byte for byte, char in _bytes_to_unicode().items()}
