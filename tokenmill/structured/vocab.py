"""TokenVocab: the facts about a tokenizer that every grammar backend needs, built once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.structured.bitmask import num_bitmask_words
from tokenmill.tokenizer.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class TokenVocab:
    """Token ids as the grammar backends see them.

    Ids in [tokenizer_vocab_size, vocab_size) are model vocab padding and never allowed;
    special tokens (EOS included) are never allowed as text; EOS is allowed only when the
    constraint is complete.
    """

    vocab_size: int  # the model's logits width
    tokenizer_vocab_size: int  # ids the tokenizer knows (<= vocab_size)
    eos_token_ids: tuple[int, ...]
    special_token_ids: frozenset[int]  # control tokens, EOS included
    encoded_vocab: list[str]  # raw vocab entry per id, "" for special tokens (xgrammar's input)
    token_bytes: list[bytes]  # the bytes each id stands for, b"" for special tokens
    vocab_type: Any  # xgrammar.VocabType: RAW, BYTE_FALLBACK or BYTE_LEVEL
    add_prefix_space: bool

    @property
    def num_words(self) -> int:
        """int32 words per bitmask row: ceil(vocab_size / 32)."""
        return num_bitmask_words(self.vocab_size)

    def xgrammar_info(self) -> Any:
        """An xgrammar.TokenizerInfo with special tokens blanked (never generated as text)."""
        import xgrammar

        return xgrammar.TokenizerInfo(
            self.encoded_vocab,
            self.vocab_type,
            vocab_size=self.vocab_size,
            stop_token_ids=list(self.eos_token_ids),
            add_prefix_space=self.add_prefix_space,
        )


def build_token_vocab(tokenizer: Tokenizer, vocab_size: int) -> TokenVocab:
    """Decode every token of `tokenizer` once; `vocab_size` is the model's logits width."""
    import xgrammar

    size = min(tokenizer.vocab_size, vocab_size)
    eos_ids = tuple(i for i in dict.fromkeys(tokenizer.eos_token_ids) if i < size)
    if not eos_ids:
        raise ValueError("structured outputs need an EOS token id below the vocab size")
    special = frozenset(i for i in _special_ids(tokenizer.hf) | set(eos_ids) if i < size)
    detected = xgrammar.TokenizerInfo.from_huggingface(
        tokenizer.hf, vocab_size=vocab_size, stop_token_ids=list(eos_ids)
    )
    encoded = [""] * size
    for text, token_id in tokenizer.hf.get_vocab().items():
        if token_id < size and token_id not in special:
            encoded[token_id] = text
    vocab = TokenVocab(
        vocab_size=vocab_size,
        tokenizer_vocab_size=size,
        eos_token_ids=eos_ids,
        special_token_ids=special,
        encoded_vocab=encoded,
        token_bytes=[],
        vocab_type=detected.vocab_type,
        add_prefix_space=detected.add_prefix_space,
    )
    vocab.token_bytes.extend(vocab.xgrammar_info().decoded_vocab[:size])
    return vocab


def _special_ids(hf: Any) -> set[int]:
    """Ids of the tokenizer's special tokens: declared ones and added tokens marked special."""
    added = getattr(hf, "added_tokens_decoder", {}) or {}
    return set(hf.all_special_ids) | {i for i, token in added.items() if token.special}
