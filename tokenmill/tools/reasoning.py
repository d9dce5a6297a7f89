"""Reasoning models' thoughts: the markers around them (`<think>` ... `</think>` for Qwen3,
QwQ and the DeepSeek-R1 family), where a thought is in an output, and whether a prompt
leaves the model inside one (DeepSeek-R1's template ends the prompt with `<think>`; Qwen3's
with enable_thinking=false closes an empty one in the prompt).

As with tool calls (parser.py), the split of any prefix of an output is a prefix of the split
of the whole, so a stream's reasoning and content deltas add up to the whole response.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tokenmill.tools.output import partial_suffix

# vLLM's --reasoning-parser names; the ones here all think between <think> and </think>
REASONING_PARSERS = {"qwen3": ("<think>", "</think>"), "deepseek_r1": ("<think>", "</think>")}


@dataclass(frozen=True, slots=True)
class ReasoningMarkers:
    start: str
    end: str
    start_ids: tuple[int, ...]
    end_ids: tuple[int, ...]

    @classmethod
    def of(cls, parser: str, encode: Callable[[str], list[int]]) -> ReasoningMarkers:
        """A parser's markers and their token ids (ValueError for an unknown parser)."""
        if parser not in REASONING_PARSERS:
            raise ValueError(
                f"unknown reasoning parser {parser!r}; tokenmill knows "
                f"{', '.join(sorted(REASONING_PARSERS))}"
            )
        start, end = REASONING_PARSERS[parser]
        return cls(start, end, tuple(encode(start)), tuple(encode(end)))

    def prompt_in_thought(self, prompt_token_ids: Sequence[int]) -> bool:
        """The prompt opens a thought it does not close: the output starts inside it."""
        start = _last_index(prompt_token_ids, self.start_ids)
        return start >= 0 and _last_index(prompt_token_ids, self.end_ids) < start


def detect_reasoning(template: str | None, vocab: dict[str, int] | None) -> str | None:
    """The reasoning parser a chat template implies: it writes `</think>` and the vocabulary
    has the markers as tokens of their own; None otherwise."""
    if not template or "</think>" not in template or vocab is None:
        return None
    return "qwen3" if "<think>" in vocab and "</think>" in vocab else None


@dataclass(slots=True)
class ReasoningSplit:
    reasoning: str | None  # None: no thought in the output
    content: str


def split_reasoning(
    text: str, markers: ReasoningMarkers, in_thought: bool, final: bool
) -> ReasoningSplit:
    """An output (so far; `final`: all of it) split into its thought and its answer.

    A thought is the output's start when the prompt left the model in one (`in_thought`), or
    when the output opens with the start marker; it ends at the end marker (the answer's
    leading whitespace dropped), or with the output. A marker still arriving is held back.
    """
    if not in_thought:
        if text.startswith(markers.start):
            text = text[len(markers.start) :]
        elif markers.start.startswith(text) and text and not final:
            return ReasoningSplit(None, "")  # the start marker may be arriving
        else:
            return ReasoningSplit(None, text)
    end = text.find(markers.end)
    if end < 0:
        held = 0 if final else partial_suffix(text, markers.end)
        return ReasoningSplit(text[: len(text) - held], "")
    return ReasoningSplit(text[:end], text[end + len(markers.end) :].lstrip())


def _last_index(items: Sequence[int], part: Sequence[int]) -> int:
    """Where `part` last starts in `items` (-1: nowhere); list.index finds the candidates in C."""
    if not part:
        return -1
    backwards, size, found = list(items)[::-1], len(part), 0
    while True:
        try:
            found = backwards.index(part[-1], found)
        except ValueError:
            return -1
        start = len(items) - found - size
        if start >= 0 and tuple(items[start : start + size]) == tuple(part):
            return start
        found += 1
