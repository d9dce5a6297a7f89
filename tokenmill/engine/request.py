"""Request: one sequence the engine generates for, with its tokens and progress."""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tokenmill.engine.outputs import FinishReason, PositionLogprobs
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.thought import Thought
    from tokenmill.multimodal.inputs import ImageInput
    from tokenmill.structured.interface import GrammarMatcher

logger = logging.getLogger(__name__)


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, eq=False)
class Request:
    """One sequence: prompt plus generated tokens, and how many of them the KV cache holds.

    There is no prefill or decode phase: `num_computed_tokens` catches up with
    `num_tokens` under the scheduler's token budget; when it does, a token is sampled.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]
    max_model_len: int
    cache_salt: str | None = None  # isolates this tenant's prefix-cache entries
    priority: int = 0  # under the priority scheduling policy, lower runs first
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    num_preemptions: int = 0  # times its blocks were freed to be recomputed later
    first_scheduled_time: float | None = None  # time.monotonic() when first scheduled
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    error: str | None = None  # why the engine failed it (finish_reason "error")
    logprobs: list[PositionLogprobs] = field(default_factory=list)  # per output token, if asked
    cumulative_logprob: float = 0.0  # of the output tokens, when logprobs are computed
    # Entry i is prompt token i's; filled as prefill chunks run (entry 0 is always None).
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    # Structured outputs: this sequence's place in its grammar; it follows the sampled output
    # tokens (append_token), so recomputing a preempted request does not move it.
    matcher: GrammarMatcher | None = None
    # Embeddings: a prefill-only request, whose last hidden states are pooled this way
    # ("LAST", "MEAN", "CLS") instead of sampling; `pooled` holds what the chunks computed
    # so far (a float32 tensor: the sum of rows for MEAN), restarted by a chunk at position 0
    pooling_type: str | None = None
    # Reasoning models: where the output is in its thought; it decides `matcher` (none while
    # thinking, the end marker once the budget is spent, the constraint after)
    thought: Thought | None = None
    pooled: Any = None
    # the prompt's images, in prompt order: their encoder rows replace the embeddings of
    # their image tokens, and their hashes key the prefix-cache blocks they touch
    images: tuple[ImageInput, ...] = ()
    # check_stop's quick test: the token count that ends it (max_tokens or the context),
    # and every id that may end it (EOS and stop ids, whatever min_tokens and ignore_eos say)
    _length_limit: int = field(init=False, repr=False)
    _ending_ids: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        self._ending_ids = self.eos_token_ids | frozenset(self.params.stop_token_ids or ())
        self.set_max_model_len(self.max_model_len)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    def set_max_model_len(self, max_model_len: int) -> None:
        """The context it runs in (the engine's, when admitted), and so where it ends."""
        self.max_model_len = max_model_len
        self._length_limit = len(self.prompt_token_ids) + self.max_output_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def max_output_tokens(self) -> int:
        """Tokens this request may still generate in total (max_tokens and the context)."""
        room = self.max_model_len - self.num_prompt_tokens
        max_tokens = self.params.max_tokens
        return room if max_tokens is None else min(room, max_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def prompt_logprob_positions(self, start: int, num_tokens: int) -> range:
        """Positions of a chunk [start, start + num_tokens) whose logits give prompt logprobs.

        The logits at position p score prompt token p + 1; positions already scored
        (before a preemption) are not scored again.
        """
        if self.params.prompt_logprobs is None:
            return range(0)
        first = max(start, len(self.prompt_logprobs) - 1)
        return range(first, min(start + num_tokens, self.num_prompt_tokens - 1))

    def add_logprobs(self, entry: PositionLogprobs) -> None:
        """The logprobs of the token about to be appended (the chosen one is first)."""
        self.logprobs.append(entry)
        self.cumulative_logprob += next(iter(entry.values())).logprob

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.matcher is None and self.thought is None:
            return
        try:
            if self.thought is not None:
                accepted = self.thought.accept(token_id)
                self.matcher = self.thought.matcher
            else:
                assert self.matcher is not None
                accepted = self.matcher.accept_token(token_id)
        except Exception as exc:  # a grammar backend bug fails this request, not the engine
            logger.exception("request %s: the grammar backend failed", self.request_id)
            self.finish_reason, self.error = "error", f"{type(exc).__name__}: {exc}"
            return
        if not accepted:
            # the masks only let allowed tokens through, unless the request's own masks
            # (allowed_token_ids, min_tokens) left none of the grammar's: end it, do not go on
            logger.warning("request %s: token %d breaks its grammar", self.request_id, token_id)
            self.finish_reason = "abort"

    def check_stop(self) -> bool:
        """Set finish_reason from the last token (EOS, stop ids, length); True when done.

        With a grammar, EOS is allowed only once the output is complete, so it always ends
        the request (ignore_eos and min_tokens notwithstanding).
        """
        if self.finish_reason is None:  # (else the grammar rejected the token, or failed)
            token_ids = self.token_ids  # (runs for every request every step)
            if len(token_ids) < self._length_limit and token_ids[-1] not in self._ending_ids:
                return False  # (most steps: below its length, no token that may end it)
            self._find_finish_reason()
        return self.finish_reason is not None

    def _find_finish_reason(self) -> None:
        params, token_ids = self.params, self.token_ids
        token_id = token_ids[-1]
        enough = len(token_ids) - len(self.prompt_token_ids) >= params.min_tokens
        ends_on_eos = self.matcher is not None or (enough and not params.ignore_eos)
        if ends_on_eos and token_id in self.eos_token_ids:
            self.finish_reason = "stop"
        elif enough and params.stop_token_ids and token_id in params.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token_id
        elif len(token_ids) >= self._length_limit:
            self.finish_reason = "length"
