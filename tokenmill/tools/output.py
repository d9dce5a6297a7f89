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
