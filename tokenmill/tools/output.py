"""What a split of a model's output gives: the message content and the tool calls so far."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tokenmill.tokenizer.detokenizer import partial_suffix as partial_suffix  # re-exported


@dataclass(slots=True)
class ParsedCall:
    name: str | None  # None until the whole name has arrived
    arguments: str = ""  # the arguments object's text so far (exactly as the model wrote it)


@dataclass(slots=True)
class ParsedOutput:
    content: str  # text outside calls (a partial trigger at the end held back)
    calls: list[ParsedCall] = field(default_factory=list)
    # the end of the last complete call (or call list): the text up to there, the content and
    # the calls before it never change as more text arrives, so a stream parses on from there
    resume: int = 0
    resume_content: int = 0  # len(content) there
    resume_calls: int = 0  # len(calls) there

    def settle(self, position: int) -> None:
        """Everything up to `position` (the end of a complete call) is final."""
        self.resume, self.resume_content, self.resume_calls = (
            position,
            len(self.content),
            len(self.calls),
        )

    def message_content(self, final: bool) -> str:
        """The content to show: trailing whitespace waits for what follows it, and is dropped
        before (and between) calls; a final answer without calls keeps it."""
        if final and not self.calls:
            return self.content
        return self.content.rstrip()


_SIGNIFICANT = re.compile(r'["\\()\[\]{}]')  # what a bracket scan must look at


@dataclass(slots=True)
class BracketScan:
    """A scan for the bracket ((), [], {}) that closes back to depth 0, skipping double-quoted
    strings; it resumes where it stopped when the text has grown (a stream's snapshots)."""

    position: int  # the next index to look at
    depth: int = 0  # brackets open
    in_string: bool = False
    escaped_at: int = -1  # the index a backslash in a string escapes

    def advance(self, text: str) -> int | None:
        """The closing bracket's index, or None (state kept) if the text ends first. The
        regex skips the other characters in C."""
        for match in _SIGNIFICANT.finditer(text, self.position):
            i, char = match.start(), match.group()
            if self.in_string:
                if i == self.escaped_at:
                    continue
                if char == "\\":
                    self.escaped_at = i + 1
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "([{":
                self.depth += 1
            elif char in ")]}":
                self.depth -= 1
                if self.depth == 0:
                    return i
        self.position = len(text)
        return None


def closing_bracket(
    text: str, start: int, depth: int = 0, scans: dict[int, BracketScan] | None = None
) -> int | None:
    """The index where the brackets open at `start` (`depth` already open) close; None if
    the text ends first. `scans` (a stream's, by start): resume an unfinished scan there."""
    scan = scans.pop(start, None) if scans is not None else None
    if scan is None:
        scan = BracketScan(start, depth)
    close = scan.advance(text)
    if close is None and scans is not None:
        scans[start] = scan
    return close
