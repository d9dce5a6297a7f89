"""The outlines backend (outlines-core): JSON schema (as a regex), regex and choice."""

from __future__ import annotations

from outlines_core import Guide, Index, Vocabulary

from tokenmill.structured import constraints
from tokenmill.structured.interface import BackendMatcher
from tokenmill.structured.json_regex import json_regex
from tokenmill.structured.spec import StructuredSpec
from tokenmill.structured.vocab import TokenVocab

_MAX_ROLLBACK = 64  # tokens a matcher can undo (speculative decoding needs a few)


class OutlinesBackend:
    """Compiles a regex into a token-level DFA index over the tokenizer's vocabulary."""

    name = "outlines"

    def __init__(self, vocab: TokenVocab) -> None:
        self._vocab = vocab
        self._vocabulary = _outlines_vocabulary(vocab)  # built once per manager

    def compile(self, spec: StructuredSpec) -> OutlinesCompiled:
        if spec.kind == "grammar":
            raise constraints.invalid(
                spec, "the outlines backend cannot express context-free grammars; use xgrammar"
            )
        regex = self._regex(spec)
        try:
            index = Index(regex, self._vocabulary)
        except ValueError as exc:
            raise constraints.invalid(spec, self._problem(spec, regex, exc)) from exc
        return OutlinesCompiled(index, self._vocab)

    def _regex(self, spec: StructuredSpec) -> str:
        if spec.kind in ("json", "json_object"):
            return json_regex(spec)
        if spec.kind == "choice":
            return constraints.choice_regex(spec)
        return constraints.strip_anchors(spec.value)

    @staticmethod
    def _problem(spec: StructuredSpec, regex: str, exc: ValueError) -> str:
        message = constraints.compiler_message(exc)
        if spec.kind == "regex":
            hint = "; outlines-core has no lookaround, backreferences or inner anchors"
            return constraints.regex_problem(regex, message + hint)
        return f"cannot compile: {message}"


def _outlines_vocabulary(vocab: TokenVocab) -> Vocabulary:
    """outlines-core's vocabulary: text tokens by their bytes (specials and padding left out)."""
    by_bytes: dict[bytes, list[int]] = {}
    for token_id, token in enumerate(vocab.token_bytes):
        if token and token_id not in vocab.special_token_ids:
            by_bytes.setdefault(token, []).append(token_id)
    return Vocabulary(vocab.eos_token_ids[0], by_bytes)


class OutlinesCompiled:
    """A compiled outlines-core index; matchers share it."""

    def __init__(self, index: Index, vocab: TokenVocab) -> None:
        self.index = index
        self._vocab = vocab

    def new_matcher(self) -> OutlinesMatcher:
        return OutlinesMatcher(self.index, self._vocab)


class OutlinesMatcher(BackendMatcher):
    """One sequence walking an outlines-core index."""

    def __init__(self, index: Index, vocab: TokenVocab) -> None:
        super().__init__(vocab)
        self._guide = Guide(index, max_rollback=_MAX_ROLLBACK)
        self._mask_ptr = self._mask.data_ptr()

    def _fill(self) -> None:
        self._guide.write_mask_into(self._mask_ptr, self._mask.numel(), 4)  # 4: int32 words

    def _accept(self, token_id: int) -> bool:
        try:
            self._guide.advance(token_id, return_tokens=False)
        except ValueError:  # no transition on this token
            return False
        return True

    def _rollback(self, num_tokens: int) -> None:
        if num_tokens > _MAX_ROLLBACK:
            raise NotImplementedError(f"the outlines backend rolls back at most {_MAX_ROLLBACK}")
        self._guide.rollback_state(num_tokens)
