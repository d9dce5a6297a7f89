"""What a split of a model's output gives: the message content and the tool calls so far."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class ParsedCall:
    name: str | None  # None until the whole name has arrived
    arguments: str = ""  # the arguments object's text so far (exactly as the model wrote it)


@dataclass(slots=True)
class ParsedOutput:
    content: str  # text outside calls (a partial trigger at the end held back)
    calls: list[ParsedCall] = field(default_factory=list)

    def message_content(self, final: bool) -> str:
        """The content to show: trailing whitespace waits for what follows it, and is dropped
        before (and between) calls; a final answer without calls keeps it."""
        if final and not self.calls:
            return self.content
        return self.content.rstrip()


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that `marker` starts with (a marker arriving)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def closing_bracket(text: str, start: int, depth: int = 0) -> int | None:
    """The index in `text` (from `start`, `depth` brackets already open) where the brackets
    ((), [], {}) close back to depth 0, skipping double-quoted strings; None if the text ends
    first."""
    in_string = escaped = False
    for i in range(start, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return i
    return None
