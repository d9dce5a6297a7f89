"""Structured outputs: constraints (JSON schema, regex, choice, grammar) as token bitmasks."""

from tokenmill.structured.backends import BACKEND_NAMES, BACKENDS, BackendInfo
from tokenmill.structured.bitmask import allocate_bitmask, apply_bitmask
from tokenmill.structured.interface import CompiledGrammar, GrammarBackend, GrammarMatcher
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.structured.spec import StructuredKind, StructuredSpec, spec_from_request_fields

__all__ = [
    "BACKENDS",
    "BACKEND_NAMES",
    "BackendInfo",
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarMatcher",
    "StructuredKind",
    "StructuredOutputManager",
    "StructuredSpec",
    "allocate_bitmask",
    "apply_bitmask",
    "spec_from_request_fields",
]
