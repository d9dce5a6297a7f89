"""The grammar backends by name, what each can express, and their lazy construction."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from tokenmill.structured.interface import GrammarBackend
from tokenmill.structured.spec import StructuredKind
from tokenmill.structured.vocab import TokenVocab

_REGULAR_KINDS: frozenset[StructuredKind] = frozenset({"json", "regex", "choice", "json_object"})


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """A backend's name, what it supports, and where it lives (imported on first use)."""

    name: str
    kinds: frozenset[StructuredKind]
    supports_whitespace_pattern: bool
    module: str
    class_name: str

    def create(self, vocab: TokenVocab) -> GrammarBackend:
        backend_class = getattr(importlib.import_module(self.module), self.class_name)
        backend: GrammarBackend = backend_class(vocab)
        return backend


BACKENDS: dict[str, BackendInfo] = {
    info.name: info
    for info in (
        BackendInfo(
            "xgrammar",
            _REGULAR_KINDS | {"grammar", "structural_tag"},
            True,
            "tokenmill.structured.backends.xgrammar_backend",
            "XGrammarBackend",
        ),
        BackendInfo(
            "outlines",
            _REGULAR_KINDS,
            True,
            "tokenmill.structured.backends.outlines_backend",
            "OutlinesBackend",
        ),
        BackendInfo(
            "lm-format-enforcer",
            _REGULAR_KINDS,
            False,
            "tokenmill.structured.backends.lm_format_enforcer_backend",
            "LMFormatEnforcerBackend",
        ),
    )
}
BACKEND_NAMES = tuple(BACKENDS)
