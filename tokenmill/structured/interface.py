"""The grammar-backend interface, and the EOS/termination logic every backend's matcher shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import numpy as np
import torch

from tokenmill.structured.spec import StructuredSpec
from tokenmill.structured.vocab import TokenVocab


class GrammarMatcher(Protocol):
    """One sequence's position in its constraint (one per request choice; not thread-safe)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a shared [N, ceil(V/32)] int32 mask."""
        ...

    def accept_token(self, token_id: int) -> bool:
        """Advance by one token; False (state unchanged) if the token is not allowed."""
        ...

    def is_terminated(self) -> bool:
        """The output is complete: EOS was accepted, or nothing but EOS can follow."""
        ...

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (NotImplementedError if unsupported)."""
        ...


class CompiledGrammar(Protocol):
    """A compiled constraint: immutable, shared by every request with the same spec."""

    def new_matcher(self) -> GrammarMatcher: ...


class GrammarBackend(Protocol):
    """Compiles specs for one tokenizer; InvalidRequestError for what it cannot compile."""

    name: str

    def compile(self, spec: StructuredSpec) -> CompiledGrammar: ...


class BackendMatcher(ABC):
    """A GrammarMatcher over a backend that can fill a mask row and advance on text tokens.

    EOS is handled here, the same way for every backend: the backend never sees it. The mask of
    the current state is computed once (fill_bitmask and is_terminated share it), every EOS id
    is allowed when any is, and after EOS only EOS is allowed.
    """

    def __init__(self, vocab: TokenVocab) -> None:
        self._vocab = vocab
        self._mask = torch.zeros(vocab.num_words, dtype=torch.int32)  # [W] current state
        self._mask_np = self._mask.numpy()  # same memory: numpy is cheaper for small ops
        self._eos_words = token_words(vocab.eos_token_ids, vocab.num_words)  # [W] EOS bits
        self._eos_bits = [(i >> 5, i & 31) for i in vocab.eos_token_ids]  # (word, bit) per EOS
        self._eos_set = frozenset(vocab.eos_token_ids)
        self._is_mask_fresh = False
        self._has_ended = False  # EOS accepted
        self._num_tokens = 0  # text tokens accepted

    # -- the backend's part ------------------------------------------------------------------

    @abstractmethod
    def _fill(self) -> None:
        """Write the full mask of the current state into self._mask ([W] int32)."""

    @abstractmethod
    def _accept(self, token_id: int) -> bool:
        """Advance by one non-EOS token; False (state unchanged) if it is not allowed."""

    def _rollback(self, num_tokens: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot roll back")

    def batch_handle(self) -> Any | None:
        """What the backend's batched fill takes for this matcher now; None: fill one by one."""
        return None

    # -- GrammarMatcher ----------------------------------------------------------------------

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        mask = self._current_mask()
        if bitmask.device.type == "cpu":
            np.copyto(bitmask.numpy()[row], mask)  # a few times cheaper than torch's copy_
        else:
            bitmask[row].copy_(self._mask)

    def accept_token(self, token_id: int) -> bool:
        if token_id in self._eos_set:
            if not self._can_end():
                return False
            self._has_ended = True
            self._is_mask_fresh = False
            return True
        if self._has_ended or not self._accept(token_id):
            return False
        self._num_tokens += 1
        self._is_mask_fresh = False
        return True

    def is_terminated(self) -> bool:
        if self._has_ended:
            return True
        return self._can_end() and not (self._current_mask() & ~self._eos_words).any()

    def rollback(self, num_tokens: int) -> None:
        if num_tokens < 0 or num_tokens > self._num_tokens + self._has_ended:
            raise ValueError(f"cannot roll back {num_tokens} tokens")
        if self._has_ended and num_tokens > 0:
            self._has_ended = False
            num_tokens -= 1
        if num_tokens:
            self._rollback(num_tokens)
            self._num_tokens -= num_tokens
        self._is_mask_fresh = False

    # -- shared state ------------------------------------------------------------------------

    def _current_mask(self) -> np.ndarray:
        """The [W] mask of the current state, computed at most once per state."""
        if not self._is_mask_fresh:
            if self._has_ended:
                self._mask_np[:] = self._eos_words
            else:
                self._fill()
                # any EOS allows every EOS; a dead end (nothing allowed) ends the output
                if self._eos_in_mask() or not self._mask_np.any():
                    self._mask_np |= self._eos_words
            self._is_mask_fresh = True
        return self._mask_np

    def _eos_in_mask(self) -> bool:
        mask = self._mask_np
        return any((int(mask[word]) >> bit) & 1 for word, bit in self._eos_bits)

    def _can_end(self) -> bool:
        """EOS is allowed now: the constraint is satisfied by the output so far."""
        self._current_mask()
        return self._eos_in_mask()


def token_words(token_ids: tuple[int, ...] | list[int], num_words: int) -> np.ndarray:
    """A [num_words] int32 bitmask row with exactly `token_ids` set."""
    words = np.zeros(num_words, dtype=np.uint32)
    for token_id in token_ids:
        words[token_id >> 5] |= np.uint32(1 << (token_id & 31))
    return words.view(np.int32)
