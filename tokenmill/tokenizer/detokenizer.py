"""Incremental detokenization with stop strings found across token boundaries."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer.tokenizer import Tokenizer

_PROMPT_CONTEXT = 6  # prompt tokens the stream starts from, so the first word gets its space


class IncrementalDetokenizer:
    """Text of one sequence, grown one token at a time; never splits a UTF-8 character.

    `text` is everything decoded (cut at a stop string once one is found);
    `visible_text` withholds a tail that may still turn out to start a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, prompt_token_ids: list[int]):
        self._backend = tokenizer.hf.backend_tokenizer
        self._stream = DecodeStream(
            ids=prompt_token_ids[-_PROMPT_CONTEXT:], skip_special_tokens=params.skip_special_tokens
        )
        self._stops = params.stop
        self._include_stop = params.include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self.text = ""
        self.stop_string: str | None = None  # the stop string that ended the text, if any
        self._stop_index = -1

    def add_token(self, token_id: int) -> None:
        """Decode one more token; afterwards check `stop_string`."""
        if self.stop_string is not None:
            return
        piece = self._stream.step(self._backend, token_id)
        if piece:
            start = max(0, len(self.text) - self._max_stop_len + 1)
            self.text += piece
            self._find_stop(start)

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
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
