"""The lm-format-enforcer backend: JSON schema, regex and choice, checked character by character."""

from __future__ import annotations

import json
from collections.abc import Hashable
from typing import Any

import torch
from lmformatenforcer import (
    CharacterLevelParser,
    JsonSchemaParser,
    RegexParser,
    TokenEnforcer,
    TokenEnforcerTokenizerData,
)
from lmformatenforcer.tokenizerprefixtree import JsonFreetextTokenCache

from tokenmill.structured import constraints
from tokenmill.structured.interface import BackendMatcher
from tokenmill.structured.spec import StructuredSpec
from tokenmill.structured.vocab import TokenVocab


class LMFormatEnforcerBackend:
    """Builds lm-format-enforcer's token prefix tree once; each spec becomes a parser."""

    name = "lm-format-enforcer"

    def __init__(self, vocab: TokenVocab) -> None:
        self._vocab = vocab
        self._tokenizer_data = _tokenizer_data(vocab)  # the expensive part: once per manager

    def compile(self, spec: StructuredSpec) -> LMFormatEnforcerCompiled:
        if spec.kind == "grammar":
            raise constraints.invalid(
                spec,
                "the lm-format-enforcer backend cannot express context-free grammars; use xgrammar",
            )
        if spec.whitespace_pattern is not None:
            raise constraints.invalid(
                spec, "the lm-format-enforcer backend does not support a JSON whitespace pattern"
            )
        compiled = LMFormatEnforcerCompiled(self._parser(spec), self._tokenizer_data, self._vocab)
        compiled.new_matcher().is_terminated()  # the first mask: parser errors surface here
        return compiled

    def _parser(self, spec: StructuredSpec) -> CharacterLevelParser:
        if spec.kind in ("json", "json_object"):
            schema = json.loads(constraints.schema_text(spec))
            try:
                return JsonSchemaParser(schema)
            except Exception as exc:  # the parser raises bare Exceptions for what it lacks
                raise constraints.invalid(spec, f"unsupported JSON schema: {exc}") from exc
        regex = (
            constraints.choice_regex(spec)
            if spec.kind == "choice"
            else constraints.strip_anchors(spec.value)
        )
        try:
            return RegexParser(regex)
        except Exception as exc:  # interegular's syntax and support errors
            message = constraints.compiler_message(exc)
            raise constraints.invalid(spec, constraints.regex_problem(regex, message)) from exc


def _tokenizer_data(vocab: TokenVocab) -> TokenEnforcerTokenizerData:
    """lm-format-enforcer's view of the vocabulary, from the same token bytes as the others.

    It works on characters, so only tokens that are whole UTF-8 text take part (pieces of a
    multi-byte character are left out), each read directly as its text.
    """
    regular = [
        (token_id, text, True)  # True: "starts a word", i.e. read the token's text as is
        for token_id, text in _text_tokens(vocab)
    ]

    def decode(token_ids: list[int]) -> str:
        return b"".join(vocab.token_bytes[i] for i in token_ids).decode("utf-8", errors="replace")

    data = TokenEnforcerTokenizerData(
        regular, decode, list(vocab.eos_token_ids), use_bitmask=True, vocab_size=vocab.vocab_size
    )
    # lm-format-enforcer lets raw control characters (invalid JSON) into JSON strings, through
    # its string-token cache and its alphabet: rebuild both without them
    data.tokenizer_tree.json_freetext_tokens = _json_string_tokens(regular, vocab.vocab_size)
    data.tokenizer_alphabet = "".join(c for c in data.tokenizer_alphabet if c >= " ")
    return data


def _text_tokens(vocab: TokenVocab) -> list[tuple[int, str]]:
    """(id, text) of every non-special token whose bytes are whole UTF-8 text."""
    tokens = []
    for token_id, token in enumerate(vocab.token_bytes):
        if token and token_id not in vocab.special_token_ids:
            try:
                tokens.append((token_id, token.decode("utf-8")))
            except UnicodeDecodeError:
                continue
    return tokens


def _json_string_tokens(
    regular: list[tuple[int, str, bool]], vocab_size: int
) -> JsonFreetextTokenCache:
    """The tokens allowed inside a JSON string, without raw control characters."""
    cache = JsonFreetextTokenCache(use_bitmask=True, vocab_size=vocab_size)
    for token_id, text, _ in regular:
        if all(c >= " " for c in text):
            cache.add_token(text, token_id)
    cache.freeze()
    return cache


class LMFormatEnforcerCompiled:
    """A root parser plus the allowed-token cache its matchers share."""

    def __init__(
        self, parser: CharacterLevelParser, data: TokenEnforcerTokenizerData, vocab: TokenVocab
    ) -> None:
        self.parser = parser
        self._data = data
        self._vocab = vocab
        self._shared_cache: dict[Hashable, Any] = {}  # parser state key -> allowed tokens

    def new_matcher(self) -> LMFormatEnforcerMatcher:
        enforcer = TokenEnforcer(self._data, self.parser)
        enforcer.allowed_token_cache = self._shared_cache
        return LMFormatEnforcerMatcher(enforcer, self._vocab)


class LMFormatEnforcerMatcher(BackendMatcher):
    """One sequence: lm-format-enforcer keys its states by the tokens generated so far."""

    def __init__(self, enforcer: TokenEnforcer, vocab: TokenVocab) -> None:
        super().__init__(vocab)
        self._enforcer = enforcer
        self._token_ids: list[int] = []

    def _allowed(self) -> torch.Tensor:
        return self._enforcer.get_allowed_tokens(self._token_ids).allowed_tokens  # [W] int32

    def _fill(self) -> None:
        self._mask.copy_(self._allowed())

    def _accept(self, token_id: int) -> bool:
        if not 0 <= token_id < self._vocab.vocab_size:
            return False
        if not (int(self._allowed()[token_id >> 5]) >> (token_id & 31)) & 1:
            return False
        self._token_ids.append(token_id)
        return True

    def _rollback(self, num_tokens: int) -> None:
        del self._token_ids[len(self._token_ids) - num_tokens :]
