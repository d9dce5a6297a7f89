"""LLMEngine: EngineCore plus the request side: validation, n/best_of, beam search, detokenizing."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.beam_search import BeamSearch
from tokenmill.engine.core import EngineCore
from tokenmill.engine.generation_config import sampling_defaults
from tokenmill.engine.groups import BeamGroup, RequestGroup, SequenceState
from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.outputs import (
    AnyOutput,
    CompletionOutput,
    PoolingRequestOutput,
    PositionLogprobs,
    PromptLogprobs,
    RequestOutput,
)
from tokenmill.engine.pooling import PoolingGroup, check_dimensions
from tokenmill.engine.request import Request
from tokenmill.engine.thought import Thought
from tokenmill.errors import InvalidRequestError, ModelLoadError
from tokenmill.model.registry import model_class
from tokenmill.model.source import ModelSource
from tokenmill.model.vision import VisionLanguageModel
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.multimodal.processor import ImageProcessor
from tokenmill.pooling_params import PoolerConfig, PoolingParams
from tokenmill.sampling_params import SamplingParams
from tokenmill.structured.interface import CompiledGrammar
from tokenmill.structured.manager import StructuredOutputManager
from tokenmill.tokenizer.chat_template import resolve_chat_template
from tokenmill.tokenizer.detokenizer import IncrementalDetokenizer, NoText, TokenTexts
from tokenmill.tokenizer.tokenizer import Tokenizer
from tokenmill.tools.reasoning import ReasoningMarkers, detect_reasoning

logger = logging.getLogger(__name__)

Group = RequestGroup | BeamGroup | PoolingGroup


@dataclasses.dataclass(slots=True)
class Frontend:
    """The request side of a model, built without its weights: what validates, renders and
    defaults a request before any engine runs it (an LLMEngine's, or the data-parallel
    server's in front of several engine processes)."""

    tokenizer: Tokenizer
    input_processor: InputProcessor
    # SamplingParams field -> the model's default, for requests that leave it unset
    sampling_defaults: dict[str, Any]
    pooler: PoolerConfig
    reasoning: ReasoningMarkers | None
    image_processor: ImageProcessor | None  # a vision model's: expands image placeholders

    @classmethod
    def of(
        cls,
        config: EngineConfig,
        source: ModelSource,
        vocab_size: int,
        max_model_len: int,
        template: str | None = None,
    ) -> Frontend:
        if template is None and config.model.chat_template:
            template = _chat_template_text(config.model.chat_template)
        tokenizer = source.tokenizer
        if template:
            tokenizer.chat_template = template
        return cls(
            tokenizer=tokenizer,
            input_processor=InputProcessor(
                vocab_size,
                max_model_len,
                config.model.max_logprobs,
                scheduling_policy=config.scheduler.scheduling_policy,
            ),  # fmt: skip
            sampling_defaults=sampling_defaults(config.model.generation_config, source.path),
            pooler=_pooler_config(config.model.pooler_config, source.path),
            reasoning=_reasoning_markers(config.structured_outputs.reasoning_parser, tokenizer),
            image_processor=_image_processor(source, config.model.mm_processor_kwargs),
        )


class LLMEngine:
    """What both the offline API and the async server drive: requests in, RequestOutputs out."""

    def __init__(self, config: EngineConfig):
        self.config = config
        template = config.model.chat_template and _chat_template_text(config.model.chat_template)
        self.core = EngineCore(config)
        try:
            front = Frontend.of(config, self.core.source, self.core.vocab_size,
                                self.core.max_model_len, template)  # fmt: skip
        except BaseException:
            self.core.shutdown()  # its worker processes, if any
            raise
        self.tokenizer: Tokenizer = front.tokenizer
        self.token_texts = TokenTexts(self.tokenizer)
        self.input_processor = front.input_processor
        self.sampling_defaults = front.sampling_defaults
        self.pooler = front.pooler
        self.reasoning = front.reasoning
        self.image_processor = front.image_processor
        self._groups: dict[str, Group] = {}
        self._group_of: dict[str, Group] = {}  # engine request id -> its group

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's defaults (vLLM's get_default_sampling_params)."""
        return SamplingParams(**self.sampling_defaults)

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def structured_outputs(self) -> StructuredOutputManager:
        return self.core.structured_outputs

    @property
    def has_unfinished(self) -> bool:
        return bool(self._groups)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        cache_salt: str | None = None,
        grammar: CompiledGrammar | None = None,
        priority: int = 0,
        images: tuple[ImageInput, ...] = (),
    ) -> RequestOutput | None:
        """Validate and queue a request; returns a finished output at once when there is
        nothing to run.

        `grammar` is params.structured_outputs compiled (AsyncEngine compiles it off the
        engine thread); without it, a constrained request is compiled here, blocking.
        `priority`: lower runs first under the priority scheduling policy. `images`: the
        prompt's images (ImageProcessor.expand), whose tokens are in the prompt.
        """
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already running")
        if params.thinking_token_budget is not None and self.reasoning is None:
            raise InvalidRequestError(
                "thinking_token_budget needs a reasoning model (its chat template has no "
                "<think> markers; or set reasoning_parser)",
                param="thinking_token_budget",
            )
        params = params.resolve_bad_words(self.tokenizer.encode)
        item = self.input_processor.validate(
            prompt_token_ids, params, priority=priority, images=images
        )
        prompt = item.prompt_token_ids
        if params.max_tokens == 0 and params.prompt_logprobs is None:
            return RequestGroup(request_id, prompt, params, []).snapshot()
        if grammar is None and params.structured_outputs is not None:
            grammar = self.structured_outputs.compile(params.structured_outputs)
        group: Group
        if params.use_beam_search and params.max_tokens != 0:
            group = self._make_beam_group(request_id, prompt, params, cache_salt, priority)
        else:
            group = self._make_request_group(
                request_id, prompt, params, cache_salt, grammar, priority, item.images
            )
        self._groups[request_id] = group
        return None

    def add_pooling_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: PoolingParams,
        cache_salt: str | None = None,
    ) -> None:
        """Validate and queue an embedding request: its prompt is computed like a prefill
        (chunked, batched with generation) and pooled; step() returns its one output."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already running")
        self.check_pooling_params(params)
        prompt = self.input_processor.validate_pooling(prompt_token_ids, params)
        pooling_type = self.pooler.pooling_type
        if pooling_type != "LAST":  # every prompt position is read: none may come from the cache
            cache_salt = f"{cache_salt or ''}\0pooling\0{request_id}"
        request = self._new_request(request_id, prompt, _POOLING_SAMPLING, cache_salt)
        request.pooling_type = pooling_type
        group = PoolingGroup(request_id, request, params, self.pooler)
        self._submit(group, [request])
        self._groups[request_id] = group

    def check_pooling_params(self, params: PoolingParams) -> None:
        """What the model can do with them (dimensions: Matryoshka models only)."""
        check_dimensions(params, self.core.source.hf_config, self.core.info.arch.hidden_size)

    def _make_request_group(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        cache_salt: str | None,
        grammar: CompiledGrammar | None,
        priority: int = 0,
        images: tuple[ImageInput, ...] = (),
    ) -> RequestGroup:
        """n sequences (best_of when larger), each with its own matcher of `grammar`; only
        the first scores the prompt."""
        num = 1 if params.max_tokens == 0 else params.num_sequences
        in_thought = self.reasoning is not None and self.reasoning.prompt_in_thought(prompt)
        sequences = []
        for index in range(num):
            child_params = _child_params(params, index)
            child_id = f"{request_id}#{index}" if num > 1 else request_id
            salt = cache_salt
            if child_params.prompt_logprobs is not None:  # every position must be computed
                salt = f"{cache_salt or ''}\0prompt-logprobs\0{child_id}"
            request = self._new_request(child_id, prompt, child_params, salt, priority)
            request.images = images
            if grammar is not None:
                request.matcher = grammar.new_matcher()
            if self.reasoning is not None:
                request.thought = Thought(
                    self.reasoning,
                    in_thought,
                    request.matcher,
                    child_params.thinking_token_budget,
                )
                request.matcher = request.thought.matcher
            detokenizer = (
                IncrementalDetokenizer(self.tokenizer, child_params, prompt)
                if child_params.detokenize
                else NoText()
            )
            sequences.append(SequenceState(request, detokenizer, index))
        group = RequestGroup(request_id, prompt, params, sequences)
        self._submit(group, [s.request for s in sequences])
        return group

    def _make_beam_group(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        cache_salt: str | None,
        priority: int = 0,
    ) -> BeamGroup:
        room = self.core.max_model_len - len(prompt)
        max_tokens = room if params.max_tokens is None else min(room, params.max_tokens)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(self.tokenizer.eos_token_ids)
        search = BeamSearch(
            params.num_sequences,
            max_tokens,
            stop_ids,
            params.length_penalty,
            params.early_stopping,
            params.min_tokens,
        )
        group = BeamGroup(request_id, prompt, params, search, cache_salt, priority)
        self._submit_beam_step(group)
        return group

    def _new_request(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        salt: str | None,
        priority: int = 0,
    ) -> Request:
        return Request(
            request_id=request_id,
            prompt_token_ids=list(prompt),
            params=params,
            eos_token_ids=frozenset(self.tokenizer.eos_token_ids),
            max_model_len=self.core.max_model_len,
            cache_salt=salt,
            priority=priority,
        )

    def _submit(self, group: Group, requests: list[Request]) -> None:
        """Add engine requests of a group; on failure none of them stays behind."""
        added = []
        try:
            for request in requests:
                self.core.add_request(request)
                added.append(request.request_id)
                self._group_of[request.request_id] = group
        except Exception:
            for child_id in added:
                self._group_of.pop(child_id, None)
                self.core.finish(child_id, "abort")
            raise

    def _submit_beam_step(self, group: BeamGroup) -> None:
        """One single-token request per running beam, asking for the candidates' logprobs."""
        search = group.search
        num_top = max(search.num_candidates, group.params.logprobs or 0)
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=num_top)
        group.step += 1
        requests = []
        for i, beam in enumerate(search.running):
            child_id = f"{group.request_id}#beam{group.step}.{i}"
            prompt = group.prompt_token_ids + beam.token_ids
            requests.append(
                self._new_request(child_id, prompt, params, group.cache_salt, group.priority)
            )
            group.pending[child_id] = i
        self._submit(group, requests)

    def shutdown(self) -> None:
        """Release the engine's workers; the engine runs no more steps."""
        self.core.shutdown()

    def abort(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        if group is None:
            return
        for child_id in group.engine_request_ids():
            self._group_of.pop(child_id, None)
            self.core.finish(child_id, "abort")
        group.abort()

    def step(self) -> list[AnyOutput]:
        """Run one engine step; one output per request that changed."""
        changed: dict[str, Group] = {}  # groups of several requests: one snapshot each
        outputs: list[AnyOutput] = []
        for request in self.core.step():
            group = self._group_of.get(request.request_id)
            if group is None:
                continue
            if type(group) is RequestGroup and group.is_plain and group.take_plain_token(outputs):
                continue  # (most requests, most steps: a token that does not end it)
            if request.finish_reason == "error":
                outputs.append(self._fail(group, request.error or "the engine failed"))
                changed.pop(group.request_id, None)
                continue
            if type(group) is RequestGroup and group.is_single:  # (no second pass)
                self._on_token(group, group.sequences[0])
                output = group.snapshot()
                assert output is not None  # (a single sequence streams)
                outputs.append(output)
                if output.finished:
                    self._release(group)
                continue
            if type(group) is RequestGroup:
                self._on_token(group, group.sequence_of(request))
            elif isinstance(group, PoolingGroup):
                group.finish()
            elif isinstance(group, BeamGroup):
                self._on_beam_token(group, request)
            changed[group.request_id] = group
        for group in changed.values():
            if isinstance(group, PoolingGroup):
                snapshot: AnyOutput | None = group.output
            else:
                if isinstance(group, BeamGroup) and not group.pending:
                    self._advance_beams(group)
                snapshot = group.snapshot()
            if snapshot is not None:
                outputs.append(snapshot)
                if snapshot.finished:
                    self._release(group)
            elif group.finished:
                self._release(group)
        return outputs

    def _fail(self, group: Group, error: str) -> AnyOutput:
        """End a whole group because one of its engine requests failed."""
        self.abort(group.request_id)
        if isinstance(group, PoolingGroup):
            return PoolingRequestOutput(group.request_id, group.prompt_token_ids, None, error=error)
        return RequestOutput(group.request_id, group.prompt_token_ids, [], True, error=error)

    def _on_token(self, group: RequestGroup, seq: SequenceState) -> None:
        """Take a sequence's new tokens (several in a step with speculative decoding) into
        its text and output, up to a stop string; and the prompt's logprobs, once."""
        request, detok, output = seq.request, seq.detokenizer, seq.output
        if group.prompt_logprobs is None and request.params.prompt_logprobs is not None:
            group.prompt_logprobs = request.prompt_logprobs
            if request.params.detokenize:
                self._named(request.prompt_logprobs)
        first = len(output.token_ids)
        new = request.token_ids[len(request.prompt_token_ids) + first :]
        ends_on_stop_token = request.finish_reason == "stop" and not isinstance(
            request.stop_reason, str
        )  # EOS or a stop id, the last new token
        for i, token_id in enumerate(new):
            is_stop_token = ends_on_stop_token and i == len(new) - 1
            if not (is_stop_token and not request.params.include_stop_str_in_output):
                detok.add_token(token_id)
            output.token_ids.append(token_id)
            if detok.stop_string is None:
                continue
            if not request.is_finished:
                request.stop_reason = detok.stop_string
                self.core.finish(request.request_id, "stop")
            elif i < len(new) - 1:  # it ended on a later token of this step: the string first
                request.stop_reason, request.finish_reason = detok.stop_string, "stop"
            break
        if request.logprobs:
            self._logprobs_of(request, output, first)
        output.finish_reason = request.finish_reason if request.is_finished else None
        output.stop_reason = request.stop_reason
        output.text = detok.visible_text(request.is_finished)

    def _logprobs_of(self, request: Request, output: CompletionOutput, first: int) -> None:
        """The output's logprobs: the request's, but none past a stop string's token; the
        new ones (from output token `first` on) get their tokens' text."""
        entries = request.logprobs
        if request.params.detokenize:  # (detokenize=False: no token texts)
            for entry in entries[first : len(output.token_ids)]:
                self._name_tokens(entry)
        if len(entries) > len(output.token_ids):
            entries = entries[: len(output.token_ids)]
            output.logprobs = entries
            output.cumulative_logprob = sum(next(iter(e.values())).logprob for e in entries)
            return
        output.logprobs = entries
        output.cumulative_logprob = request.cumulative_logprob

    def _on_beam_token(self, group: BeamGroup, request: Request) -> None:
        beam = group.pending.pop(request.request_id)
        self._group_of.pop(request.request_id, None)
        group.results[beam] = request.logprobs[0]

    def _advance_beams(self, group: BeamGroup) -> None:
        """All beams of this step are scored: move the search on, then finish or go on."""
        num_top = group.params.logprobs
        candidates = []
        for i in range(len(group.search.running)):
            entry = group.results.pop(i)
            if num_top is not None:
                self._name_tokens(entry)
            candidates.append(_beam_candidates(entry, num_top))
        group.search.step(candidates)
        if group.search.is_done:
            group.finish(self.tokenizer)
        else:
            self._submit_beam_step(group)

    def _name_tokens(self, entry: PositionLogprobs) -> None:
        for token_id, logprob in entry.items():
            if logprob.decoded_token is None:
                logprob.decoded_token = self.token_texts.text(token_id)

    def _named(self, prompt_logprobs: PromptLogprobs) -> PromptLogprobs:
        for entry in prompt_logprobs:
            if entry is not None:
                self._name_tokens(entry)
        return prompt_logprobs

    def _release(self, group: Group) -> None:
        self._groups.pop(group.request_id, None)
        for child_id in group.engine_request_ids():
            self._group_of.pop(child_id, None)


# what an embedding's engine request carries as SamplingParams: it never samples
_POOLING_SAMPLING = SamplingParams(max_tokens=1, temperature=0.0)


def _pooler_config(value: dict[str, Any] | None, model_path: str) -> PoolerConfig:
    """--pooler-config, else the model directory's sentence-transformers config."""
    try:
        if value is not None:
            return PoolerConfig.from_dict(value)
        path = Path(model_path)
        return PoolerConfig.of_model(path if path.is_dir() else None)
    except (ValueError, OSError) as e:
        raise ModelLoadError(f"pooler config: {e}") from None


def _image_processor(source: ModelSource, kwargs: dict[str, Any] | None) -> ImageProcessor | None:
    """The processor of a model that takes images (its class encodes them), else None."""
    if not issubclass(model_class(source.hf_config), VisionLanguageModel):
        return None
    processor = ImageProcessor(source.path, source.hf_config, source.tokenizer, kwargs)
    logger.info("images: %s, placeholder %s", processor.name, processor.placeholder)
    return processor


def _reasoning_markers(parser: str | None, tokenizer: Tokenizer) -> ReasoningMarkers | None:
    """The reasoning parser's markers: the one named, else the one the chat template implies
    (tools/reasoning.py); None for "none" or a model that does not reason."""
    if parser == "none":
        return None
    if parser is None:
        get_vocab = getattr(tokenizer.hf, "get_vocab", None)
        parser = detect_reasoning(tokenizer.chat_template, get_vocab() if get_vocab else None)
        if parser is None:
            return None
    try:
        return ReasoningMarkers.of(parser, lambda text: tokenizer.encode(text, False))
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """One sequence's params: n=1, its own seed, prompt logprobs only on the first."""
    changes: dict[str, Any] = {"n": 1, "best_of": None}
    if params.seed is not None:
        changes["seed"] = params.seed + index
    if index > 0:
        changes["prompt_logprobs"] = None
    if params.num_sequences > params.n and params.logprobs is None:
        changes["logprobs"] = 0  # best_of ranks by cumulative logprob
    if params.max_tokens == 0:
        changes["max_tokens"] = 1  # prompt logprobs only; the token is dropped
    return dataclasses.replace(params, **changes)


def _beam_candidates(
    entry: PositionLogprobs, num_top: int | None
) -> list[tuple[int, float, PositionLogprobs]]:
    """A beam's next-token candidates from its step's logprobs, each with its own entry."""
    ranked = sorted(entry.items(), key=lambda item: item[1].rank or 0)
    top = dict(ranked[:num_top]) if num_top else {}
    result = []
    for token_id, logprob in ranked:
        own: PositionLogprobs = {}
        if num_top is not None:
            own = {token_id: logprob, **{t: lp for t, lp in top.items() if t != token_id}}
        result.append((token_id, logprob.logprob, own))
    return result


def _chat_template_text(value: str) -> str:
    """The --chat-template / chat_template= value (a file path or the template) as text."""
    try:
        return resolve_chat_template(value)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
