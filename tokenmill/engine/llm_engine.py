"""LLMEngine: EngineCore plus the tokenizer side — n-way fan-out, detokenizing, stop strings."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.engine.core import EngineCore
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.request import Request
from tokenmill.errors import ModelLoadError
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer.chat_template import resolve_chat_template
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer
from tokenmill.tokenizer.tokenizer import Tokenizer


@dataclass(slots=True, eq=False)
class _Sequence:
    """One of a request's n sequences: the engine request and its text."""

    request: Request
    detokenizer: IncrementalDetokenizer
    output: CompletionOutput


@dataclass(slots=True, eq=False)
class _ParentRequest:
    request_id: str
    prompt_token_ids: list[int]
    sequences: list[_Sequence]

    @property
    def finished(self) -> bool:
        return all(s.output.is_finished for s in self.sequences)

    def snapshot(self) -> RequestOutput:
        outputs = [
            dataclasses.replace(s.output, token_ids=list(s.output.token_ids))
            for s in self.sequences
        ]
        cached = min(s.request.num_cached_tokens for s in self.sequences)
        return RequestOutput(self.request_id, self.prompt_token_ids, outputs, self.finished, cached)


class LLMEngine:
    """What both the offline API and the async server drive: requests in, RequestOutputs out."""

    def __init__(self, config: EngineConfig):
        self.config = config
        template = config.model.chat_template and _chat_template_text(config.model.chat_template)
        self.core = EngineCore(config)
        self.tokenizer: Tokenizer = self.core.source.tokenizer
        if template:
            self.tokenizer.chat_template = template
        self._parents: dict[str, _ParentRequest] = {}
        self._parent_of: dict[str, _ParentRequest] = {}  # child request id -> parent

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def has_unfinished(self) -> bool:
        return bool(self._parents)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
    ) -> RequestOutput | None:
        """Queue n sequences for a prompt; returns a finished output at once when max_tokens is 0."""
        if request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already running")
        params.check_vocab(self.core.vocab_size)
        sequences = [
            self._make_sequence(request_id, i, prompt_token_ids, params, cache_salt)
            for i in range(params.n)
        ]
        parent = _ParentRequest(request_id, list(prompt_token_ids), sequences)
        if params.max_tokens == 0:
            for seq in sequences:
                seq.output.finish_reason = "length"
            return parent.snapshot()
        added = []
        try:
            for seq in sequences:
                self.core.add_request(seq.request)
                added.append(seq.request.request_id)
        except Exception:
            for child_id in added:
                self.core.finish(child_id, "abort")
            raise
        self._parents[request_id] = parent
        for seq in sequences:
            self._parent_of[seq.request.request_id] = parent
        return None

    def _make_sequence(
        self,
        request_id: str,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        cache_salt: str | None,
    ) -> _Sequence:
        child_params = params
        if params.n > 1:
            seed = None if params.seed is None else params.seed + index
            child_params = dataclasses.replace(params, n=1, seed=seed)
        request = Request(
            request_id=f"{request_id}#{index}" if params.n > 1 else request_id,
            prompt_token_ids=list(prompt),
            params=child_params,
            eos_token_ids=frozenset(self.tokenizer.eos_token_ids),
            max_model_len=self.core.max_model_len,
            cache_salt=cache_salt,
        )
        detokenizer = IncrementalDetokenizer(self.tokenizer, child_params, prompt)
        return _Sequence(request, detokenizer, CompletionOutput(index=index))

    def abort(self, request_id: str) -> None:
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return
        for seq in parent.sequences:
            self._parent_of.pop(seq.request.request_id, None)
            if not seq.output.is_finished:
                seq.output.finish_reason = "abort"
            self.core.finish(seq.request.request_id, "abort")

    def step(self) -> list[RequestOutput]:
        """Run one engine step; one RequestOutput per request that changed."""
        changed: dict[str, _ParentRequest] = {}
        for request in self.core.step():
            parent = self._parent_of.get(request.request_id)
            if parent is None:
                continue
            seq = parent.sequences[0] if len(parent.sequences) == 1 else self._find(parent, request)
            self._update_sequence(seq)
            changed[parent.request_id] = parent
        outputs = []
        for parent in changed.values():
            outputs.append(parent.snapshot())
            if parent.finished:
                self._release(parent)
        return outputs

    @staticmethod
    def _find(parent: _ParentRequest, request: Request) -> _Sequence:
        return next(s for s in parent.sequences if s.request is request)

    def _update_sequence(self, seq: _Sequence) -> None:
        request, detok, output = seq.request, seq.detokenizer, seq.output
        token_id = request.token_ids[-1]
        ends_on_token = request.finish_reason == "stop" and request.stop_reason is None  # EOS
        hide_token = ends_on_token or (
            request.stop_reason is not None and not request.params.include_stop_str_in_output
        )
        if not hide_token:
            detok.add_token(token_id)
        output.token_ids.append(token_id)
        if detok.stop_string is not None and not request.is_finished:
            request.stop_reason = detok.stop_string
            self.core.finish(request.request_id, "stop")
        output.finish_reason = request.finish_reason if request.is_finished else None
        output.stop_reason = request.stop_reason
        output.text = detok.visible_text(request.is_finished)

    def _release(self, parent: _ParentRequest) -> None:
        self._parents.pop(parent.request_id, None)
        for seq in parent.sequences:
            self._parent_of.pop(seq.request.request_id, None)


def _chat_template_text(value: str) -> str:
    """The --chat-template / chat_template= value (a file path or the template) as text."""
    try:
        return resolve_chat_template(value)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
