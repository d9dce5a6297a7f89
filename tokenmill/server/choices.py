"""ChoiceTracker: cumulative engine snapshots as per-choice deltas, with the token counts."""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.input_processor import EngineInput
from tokenmill.engine.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tokenmill.server.protocol import PromptTokensDetails, UsageInfo


@dataclass(slots=True)
class ChoiceDelta:
    """What is new in one choice since the last snapshot."""

    index: int  # prompt index * n + sequence index
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    is_first: bool  # nothing was sent for this choice before
    output: CompletionOutput  # the sequence as of this snapshot
    token_start: int  # output.token_ids[token_start:] are new since the last delta

    @property
    def new_token_ids(self) -> list[int]:
        return self.output.token_ids[self.token_start :]

    @property
    def new_logprobs(self) -> list[PositionLogprobs]:
        return (self.output.logprobs or [])[self.token_start :]


class ChoiceTracker:
    """Turns cumulative engine snapshots into per-choice deltas and token counts."""

    def __init__(self, inputs: list[EngineInput], prompt_tokens_details: bool = False):
        self.n = inputs[0].params.n
        self.num_prompt_tokens = sum(len(item.prompt_token_ids) for item in inputs)
        self.prompt_tokens_details = prompt_tokens_details
        self._num_cached: dict[int, int] = {}  # per prompt: its tokens from the prefix cache
        self._num_chars: dict[int, int] = {}
        self._num_tokens: dict[int, int] = {}
        self._num_tokens_sent: dict[int, int] = {}
        self._finished: set[int] = set()

    @property
    def num_completion_tokens(self) -> int:
        return sum(self._num_tokens.values())

    def usage(self) -> UsageInfo:
        prompt, completion = self.num_prompt_tokens, self.num_completion_tokens
        details = None
        if self.prompt_tokens_details:
            details = PromptTokensDetails(cached_tokens=sum(self._num_cached.values()))
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=details,
        )

    def update(self, prompt_index: int, output: RequestOutput) -> list[ChoiceDelta]:
        deltas = []
        self._num_cached[prompt_index] = output.num_cached_tokens
        for seq in output.outputs:
            index = prompt_index * self.n + seq.index
            self._num_tokens[index] = len(seq.token_ids)
            sent = self._num_chars.get(index)
            text = seq.text[sent or 0 :]
            is_finishing = seq.finish_reason is not None and index not in self._finished
            if not text and not is_finishing and sent is not None:
                continue
            self._num_chars[index] = len(seq.text)
            token_start = self._num_tokens_sent.get(index, 0)
            self._num_tokens_sent[index] = len(seq.token_ids)
            if is_finishing:
                self._finished.add(index)
            reason, stop = (seq.finish_reason, seq.stop_reason) if is_finishing else (None, None)
            deltas.append(ChoiceDelta(index, text, reason, stop, sent is None, seq, token_start))
        return deltas
