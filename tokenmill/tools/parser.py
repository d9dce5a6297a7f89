"""A model's output split into message content and tool calls, the same way for a stream and
for the whole response.

`parse(text)` of any prefix of an output is a prefix of `parse` of the whole: its content is a
prefix of the final content, its calls a prefix of the final calls with the last one's
arguments a prefix of its final arguments. A stream sends the difference between the parses
of successive snapshots (`ToolCallStream`), so whatever way the tokens fall into chunks, the
concatenated stream equals the non-streamed response.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from tokenmill.tools import pythonic
from tokenmill.tools.formats import ToolCallFormat
from tokenmill.tools.output import (
    BracketScan,
    ParsedCall,
    ParsedOutput,
    closing_bracket,
    partial_suffix,
)


def parse(
    text: str, fmt: ToolCallFormat, final: bool, scans: dict[int, BracketScan] | None = None
) -> ParsedOutput:
    """Content and calls of `text` (an output so far; `final`: all of it). `scans`: a
    stream's unfinished argument scans, resumed on its next (longer) snapshot."""
    if fmt.pythonic:
        return pythonic.parse(text, final, scans)
    out = ParsedOutput("")
    pos = 0
    while True:
        start = text.find(fmt.trigger, pos)
        if start < 0:
            tail = text[pos:]
            out.content += tail if final else tail[: len(tail) - partial_suffix(tail, fmt.trigger)]
            return out
        out.content += text[pos:start]
        end = _parse_call(text, start, fmt, out.calls, scans)
        if end is None:  # the call runs to the end of the text (still arriving, or cut off)
            return out
        if end < 0:  # not a call after all (only without a constraint): the trigger is text
            out.content += fmt.trigger
            pos = start + len(fmt.trigger)
            continue
        pos = end
        out.settle(pos)


def _parse_call(
    text: str,
    start: int,
    fmt: ToolCallFormat,
    calls: list[ParsedCall],
    scans: dict[int, BracketScan] | None,
) -> int | None:
    """Parse the call at `start`; appends it (complete or not) to `calls`. Returns the end of
    the call, None when the text ends inside it, -1 when the text there is not a call."""
    rest = text[start:]
    if not rest.startswith(fmt.begin):
        return None if fmt.begin.startswith(rest) else -1
    name_start = start + len(fmt.begin)
    name_end = text.find('"', name_start)
    if name_end < 0:
        calls.append(ParsedCall(None))
        return None
    call = ParsedCall(text[name_start:name_end])
    calls.append(call)
    args_start = name_end + len(fmt.middle)  # the middle starts with the name's closing quote
    between = text[name_end:args_start]
    if between != fmt.middle:
        return None if fmt.middle.startswith(between) else _not_a_call(calls)
    args_end = _object_end(text, args_start, scans)
    call.arguments = text[args_start : len(text) if args_end is None else args_end]
    if args_end is None:
        return None
    after = text[args_end : args_end + len(fmt.end)]
    if after != fmt.end:
        return None if fmt.end.startswith(after) else _not_a_call(calls)
    return args_end + len(fmt.end)


def _not_a_call(calls: list[ParsedCall]) -> int:
    calls.pop()
    return -1


def _object_end(text: str, start: int, scans: dict[int, BracketScan] | None) -> int | None:
    """The end (exclusive) of the JSON object at text[start], None if the text ends first."""
    close = closing_bracket(text, start, scans=scans)
    return None if close is None else close + 1


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class CallDelta:
    """A streamed piece of one call: its first piece has the id and name."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


class ToolCallStream:
    """One choice's stream: each snapshot of its text in, the new content and call pieces out."""

    def __init__(self, fmt: ToolCallFormat):
        self.fmt = fmt
        self._content = 0  # characters of content sent
        self._sent: list[int] = []  # per call begun: characters of its arguments sent
        self.ids: list[str] = []
        # what is settled (parse's resume point): each snapshot is parsed from there on only
        self._settled = ParsedOutput("")
        self._scans: dict[int, BracketScan] = {}  # the unfinished call's, by its start in the tail

    @property
    def num_calls(self) -> int:
        return len(self._sent)

    def update(self, text: str, final: bool) -> tuple[str, list[CallDelta]]:
        settled = self._settled
        tail = parse(text[settled.resume :], self.fmt, final, self._scans)
        parsed = ParsedOutput(settled.content + tail.content, settled.calls + tail.calls)
        if tail.resume:
            self._settled = ParsedOutput(
                settled.content + tail.content[: tail.resume_content],
                settled.calls + tail.calls[: tail.resume_calls],
                resume=settled.resume + tail.resume,
            )
            self._scans.clear()  # positions in the next tail start from the new resume point
        content = parsed.message_content(final)
        new_content = content[self._content :]
        self._content = len(content)
        deltas = []
        for index, call in enumerate(parsed.calls):
            if call.name is None:
                break
            if index == len(self._sent):
                self.ids.append(new_call_id())
                self._sent.append(len(call.arguments))
                deltas.append(CallDelta(index, call.arguments, self.ids[index], call.name))
            elif len(call.arguments) > self._sent[index]:
                deltas.append(CallDelta(index, call.arguments[self._sent[index] :]))
                self._sent[index] = len(call.arguments)
        return new_content, deltas
