"""Request groups: the engine requests behind one client request, and what it gets back.

A `RequestGroup` runs n sequences (best_of when larger, keeping the n with the
highest cumulative logprob); a `BeamGroup` runs a beam search, one single-token
engine request per beam and step. Both turn their state into RequestOutputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.beam_search import Beam, BeamSearch
from tokenmill.engine.outputs import (
    AnyOutput,
    CompletionOutput,
    PositionLogprobs,
    RequestOutput,
)
from tokenmill.engine.request import Request
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer, NoText, detokenize
from tokenmill.tokenizer.tokenizer import Tokenizer


@dataclass(slots=True, eq=False)
class SequenceState:
    """One sampled sequence: its engine request, its text so far and its output."""

    request: Request
    detokenizer: IncrementalDetokenizer | NoText  # NoText: detokenize=False
    index: int
    output: CompletionOutput = field(init=False)
    # output_kind DELTA: how much of the output the client has had (tokens, characters)
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    sent_finish: bool = False

    def __post_init__(self) -> None:
        self.output = CompletionOutput(index=self.index)


class RequestGroup:
    """The n (or best_of) sequences of one prompt."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        sequences: list[SequenceState],
    ):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.sequences = sequences
        self.prompt_logprobs: list[PositionLogprobs | None] | None = None
        self._by_id = {s.request.request_id: s for s in sequences}
        self._kind = kind = params.output_kind
        # best_of ranks finished sequences; prompt-only requests drop their one token
        self._is_final_only = (
            kind is RequestOutputKind.FINAL_ONLY
            or params.num_sequences > params.n
            or params.max_tokens == 0
        )
        self._is_delta = kind is RequestOutputKind.DELTA and not self._is_final_only
        self._sent_prompt_logprobs = False  # (DELTA: they go once)
        # one sequence, streamed as it grows: the engine's fast path
        self.is_single = len(sequences) == 1 and not self._is_final_only
        self._wants_logprobs = params.logprobs is not None
        # one sequence whose tokens' text is their own, with no logprobs to show, streamed
        # or not: take_plain_token
        self.is_plain = (
            len(sequences) == 1
            and params.num_sequences == 1
            and params.max_tokens != 0
            and sequences[0].detokenizer.is_plain
            and params.logprobs is None
            and params.prompt_logprobs is None
        )
        self._num_prompt_tokens = len(prompt_token_ids)

    @property
    def finished(self) -> bool:
        if len(self.sequences) == 1:  # (most requests; read every step)
            return self.sequences[0].output.finish_reason is not None
        return all(s.output.is_finished for s in self.sequences)

    def sequence_of(self, request: Request) -> SequenceState:
        return self._by_id[request.request_id]

    def engine_request_ids(self) -> list[str]:
        return list(self._by_id)

    def abort(self) -> None:
        for seq in self.sequences:
            if not seq.output.is_finished:
                seq.output.finish_reason = "abort"

    def take_plain_token(self, outputs: list[AnyOutput]) -> bool:
        """An `is_plain` sequence's step in the common case, taken whole (one call per
        request per step): one new token, the request not ended. Adds its output (unless
        the request asked for the final one only) and returns True; False when the engine
        must take the token (LLMEngine._on_token)."""
        seq = self.sequences[0]
        request, output = seq.request, seq.output
        token_ids, output_ids = request.token_ids, output.token_ids
        if (
            request.finish_reason is not None
            or len(token_ids) != self._num_prompt_tokens + len(output_ids) + 1
        ):
            return False
        token_id = token_ids[-1]
        detok = seq.detokenizer
        detok.add_token(token_id)
        output_ids.append(token_id)
        output.text = text = detok.text
        kind = self._kind
        if kind is RequestOutputKind.CUMULATIVE:  # (the ids so far: a copy, as they grow)
            completion = CompletionOutput(0, text, output_ids[:], None, None)
        elif kind is RequestOutputKind.DELTA:
            completion = CompletionOutput(
                0, text[seq.num_sent_chars :], output_ids[seq.num_sent_tokens :], None, None
            )
            seq.num_sent_chars, seq.num_sent_tokens = len(text), len(output_ids)
        else:
            return True  # (FINAL_ONLY)
        outputs.append(
            RequestOutput(
                self.request_id,
                self.prompt_token_ids,
                [completion],
                False,
                request.num_cached_tokens,
                None,
                None,
                None,
                request.first_scheduled_time,
            )
        )
        return True

    def snapshot(self) -> RequestOutput | None:
        """The sequences as the request's output_kind shows them: all of each so far
        (CUMULATIVE), what changed since the last snapshot (DELTA), or, once the group
        finishes, all of each (FINAL_ONLY, best_of, prompt-only). None while there is
        nothing to show."""
        if self.is_single:
            seq = self.sequences[0]
            request, output = seq.request, seq.output
            return RequestOutput(
                self.request_id,
                self.prompt_token_ids,
                [self._public(seq, 0)],
                output.finish_reason is not None,
                request.num_cached_tokens,
                None,
                self._prompt_logprobs(),
                None,
                request.first_scheduled_time,
            )
        finished = self.finished
        if self._is_final_only and not finished:
            return None
        cached = min(s.request.num_cached_tokens for s in self.sequences)
        scheduled = [t for s in self.sequences if (t := s.request.first_scheduled_time)]
        return RequestOutput(
            self.request_id,
            self.prompt_token_ids,
            self._outputs(),
            finished,
            cached,
            prompt_logprobs=self._prompt_logprobs(),
            first_scheduled_time=min(scheduled, default=None),
        )

    def _prompt_logprobs(self) -> list[PositionLogprobs | None] | None:
        if not self.prompt_logprobs or (self._is_delta and self._sent_prompt_logprobs):
            return None
        self._sent_prompt_logprobs = True
        return list(self.prompt_logprobs)

    def _outputs(self) -> list[CompletionOutput]:
        n = self.params.n
        if self.params.max_tokens == 0:
            return [CompletionOutput(index=j, finish_reason="length") for j in range(n)]
        sequences = self.sequences
        if len(sequences) > n:
            sequences = sorted(
                sequences, key=lambda s: s.output.cumulative_logprob or 0.0, reverse=True
            )[:n]
        if self._is_delta:  # the sequences with news: tokens, or their end
            return [
                self._public(s, j)
                for j, s in enumerate(sequences)
                if len(s.output.token_ids) > s.num_sent_tokens
                or (s.output.finish_reason is not None and not s.sent_finish)
            ]
        return [self._public(s, j) for j, s in enumerate(sequences)]

    def _public(self, seq: SequenceState, index: int) -> CompletionOutput:
        """A copy for the client (DELTA: of what is new): logprobs only when it asked for
        them. (Built field by field: replace() costs a few times more, once per request
        per step.)"""
        output, asked = seq.output, self._wants_logprobs
        first, chars = 0, 0
        if self._is_delta:
            first, chars = seq.num_sent_tokens, seq.num_sent_chars
            seq.num_sent_tokens, seq.num_sent_chars = len(output.token_ids), len(output.text)
            seq.sent_finish = output.finish_reason is not None
        return CompletionOutput(
            index,
            output.text[chars:],
            output.token_ids[first:],
            output.finish_reason,
            output.stop_reason,
            output.cumulative_logprob if asked else None,
            output.logprobs[first:] if asked and output.logprobs is not None else None,
        )


class BeamGroup:
    """A beam search: the requests of the current step and, at the end, the n best beams."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        search: BeamSearch,
        cache_salt: str | None,
        priority: int = 0,
    ):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.search = search
        self.cache_salt = cache_salt
        self.priority = priority  # every step's requests are scheduled with it
        self.step = 0
        self.pending: dict[str, int] = {}  # engine request id -> beam index, this step
        self.results: dict[int, PositionLogprobs] = {}  # beam index -> its next-token logprobs
        self.outputs: list[CompletionOutput] | None = None  # set when the search ends

    @property
    def finished(self) -> bool:
        return self.outputs is not None

    def engine_request_ids(self) -> list[str]:
        return list(self.pending)

    def abort(self) -> None:
        self.pending.clear()
        self.outputs = [
            CompletionOutput(index=j, finish_reason="abort") for j in range(self.params.n)
        ]

    def finish(self, tokenizer: Tokenizer) -> None:
        best = self.search.best(self.params.n)
        self.outputs = [self._output(j, beam, tokenizer) for j, beam in enumerate(best)]

    def snapshot(self) -> RequestOutput | None:
        if self.outputs is None:
            return None
        return RequestOutput(self.request_id, self.prompt_token_ids, self.outputs, finished=True)

    def _output(self, index: int, beam: Beam, tokenizer: Tokenizer) -> CompletionOutput:
        params, tokens = self.params, beam.token_ids
        hide_last = beam.is_stopped and not params.include_stop_str_in_output
        text = detokenize(
            tokenizer, params, self.prompt_token_ids, tokens[:-1] if hide_last else tokens
        )
        stop_reason: int | str | None = text.stop_string
        if stop_reason is None and beam.is_stopped and tokens[-1] in params.stop_token_ids:
            stop_reason = tokens[-1]
        return CompletionOutput(
            index=index,
            text=text.text,
            token_ids=list(tokens),
            finish_reason="stop" if beam.is_stopped or text.stop_string else "length",
            stop_reason=stop_reason,
            cumulative_logprob=beam.cumulative_logprob,
            logprobs=list(beam.logprobs) if params.logprobs is not None else None,
        )
