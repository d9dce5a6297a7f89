"""The xgrammar backend (default): JSON schema, regex, choice, GBNF/EBNF and Lark grammars."""

from __future__ import annotations

import os
from typing import Any

import torch
import xgrammar

from tokenmill.structured import constraints
from tokenmill.structured.interface import BackendMatcher
from tokenmill.structured.json_regex import json_regex
from tokenmill.structured.spec import StructuredSpec
from tokenmill.structured.vocab import TokenVocab

_MAX_COMPILE_THREADS = 8
_BOUNDED_STRING_CHAR = r"[^\"\\\r\n]"  # how xgrammar writes a character of a bounded string
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\]"  # any character JSON allows unescaped in a string


class XGrammarBackend:
    """Compiles with xgrammar against one tokenizer (the manager caches compiled grammars)."""

    name = "xgrammar"

    def __init__(self, vocab: TokenVocab) -> None:
        self._vocab = vocab
        self._compiler = xgrammar.GrammarCompiler(
            vocab.xgrammar_info(),
            max_threads=min(_MAX_COMPILE_THREADS, os.cpu_count() or 1),
            cache_enabled=False,
        )
        self._batch = xgrammar.BatchGrammarMatcher(max_threads="auto")

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Fill bitmask[rows[i]] for xgrammar's matchers[i] (batch handles) on C++ threads."""
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)

    def compile(self, spec: StructuredSpec) -> XGrammarCompiled:
        try:
            compiled = self._compile(spec)
        except (RuntimeError, ValueError) as exc:
            raise constraints.invalid(spec, _problem(spec, exc)) from exc
        return XGrammarCompiled(compiled, self._vocab)

    def _compile(self, spec: StructuredSpec) -> Any:
        if spec.kind in ("json", "json_object"):
            return self._compile_json(spec)
        if spec.kind == "regex":
            return self._compiler.compile_regex(spec.value)
        if spec.kind == "choice":
            return self._compiler.compile_grammar(constraints.choice_ebnf(spec))
        if spec.kind == "structural_tag":
            return self._compiler.compile_structural_tag(spec.value)
        if constraints.is_ebnf(spec.value):
            return self._compiler.compile_grammar(spec.value)
        return self._compiler.compile_lark(spec.value)

    def _compile_json(self, spec: StructuredSpec) -> Any:
        """Native JSON schema support; a custom whitespace pattern goes through a regex."""
        pattern = spec.whitespace_pattern
        if pattern is not None and pattern != "":
            return self._compiler.compile_regex(json_regex(spec))
        grammar = xgrammar.Grammar.from_json_schema(
            constraints.schema_text(spec),
            any_whitespace=pattern is None,
            separators=None if pattern is None else (",", ":"),
        )
        return self._compiler.compile_grammar(_fix_bounded_strings(str(grammar)))


def _fix_bounded_strings(ebnf: str) -> str:
    """xgrammar 0.2.8 lets raw control characters (invalid JSON) into strings that have
    minLength/maxLength; allow there what its unbounded strings allow (no escapes: valid JSON).
    """
    return ebnf.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR)


def _problem(spec: StructuredSpec, exc: BaseException) -> str:
    what = {"regex": "regex", "grammar": "grammar", "choice": "choice",
            "structural_tag": "tool parameters schema"}.get(spec.kind)  # fmt: skip
    return f"invalid {what or 'JSON schema'}: {constraints.compiler_message(exc)}"


class XGrammarCompiled:
    """A compiled xgrammar grammar; matchers share it."""

    def __init__(self, compiled: Any, vocab: TokenVocab) -> None:
        self.compiled = compiled
        self._vocab = vocab

    def new_matcher(self) -> XGrammarMatcher:
        return XGrammarMatcher(self.compiled, self._vocab)


class XGrammarMatcher(BackendMatcher):
    """One sequence in an xgrammar grammar."""

    def __init__(self, compiled: Any, vocab: TokenVocab) -> None:
        super().__init__(vocab)
        self._matcher = xgrammar.GrammarMatcher(compiled)
        self._mask_2d = self._mask.view(1, -1)  # [1, W]: xgrammar fills rows of 2-D masks

    def batch_handle(self) -> Any | None:
        """The xgrammar matcher, when a batched fill writes exactly what fill_bitmask would
        (not after EOS; not when this state's mask is already computed: copying it is cheaper).
        """
        return None if self._has_ended or self._is_mask_fresh else self._matcher

    def _fill(self) -> None:
        self._matcher.fill_next_token_bitmask(self._mask_2d)

    def _accept(self, token_id: int) -> bool:
        return bool(self._matcher.accept_token(token_id))

    def _rollback(self, num_tokens: int) -> None:
        self._matcher.rollback(num_tokens)
