"""Tokenizer: the one wrapper the engine and server use around a Hugging Face fast tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Tokenizer:
    """A loaded tokenizer plus the facts about it the engine needs."""

    hf: Any  # transformers PreTrainedTokenizerFast
    eos_token_ids: list[int]  # every id that ends generation (tokenizer + generation_config)
    chat_template: str | None  # Jinja source, or None when the model has none
    bos_token: str | None = None
    eos_token: str | None = None
    # detokenizer.py's table of tokens' own texts, filled as tokens are first generated
    pieces: Any = field(default=None, repr=False, compare=False)

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer knows (may be below the model's embedding rows)."""
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return str(self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return list(self.hf.convert_ids_to_tokens(token_ids))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return str(self.hf.convert_tokens_to_string(tokens))

    @property
    def all_special_ids(self) -> set[int]:
        return set(self.hf.all_special_ids)
