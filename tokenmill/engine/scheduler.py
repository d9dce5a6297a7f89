"""Scheduler: continuous batching under one token budget per step, with preemption (no torch).

Each step, running requests get their next tokens first (a decode is one token,
an unfinished prompt a chunk), then waiting requests are admitted in the order
of the scheduling policy (request_queue.py: arrival, or priority then arrival)
with what is left of the budget (chunked prefill). When the KV cache runs out of
blocks, the policy's victim (the newest running request, or the least urgent) is
preempted: its blocks are freed and it goes back to the waiting queue to be
recomputed.

With speculative decoding (a `Speculator`), a decoding request may also get its guessed
next tokens as extra rows: 1 + k tokens in the step, k of them guesses the sampler
checks. Guesses never preempt anyone: without blocks for them, the request decodes as
usual. The KV of rejected guesses is left in the request's slots past its computed
tokens, where later steps write over it. A draft model guesses after the step for the
next one, writing its guesses' K/V past the step's tokens: a request that samples also
gets slots for those (its lookahead), where blocks allow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tokenmill.config import SchedulerConfig
from tokenmill.engine.kv_cache import KVCacheManager
from tokenmill.engine.outputs import FinishReason
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.request_queue import RequestQueue, make_queue
from tokenmill.engine.step_stats import StepTokenCounter
from tokenmill.spec_decode.speculator import Speculator
from tokenmill.worker.inputs import ScheduledSequence

_NO_DRAFTS: list[int] = []  # the guesses of a step without any (shared: never changed)


@dataclass(slots=True)
class SchedulerOutput:
    # a request's new tokens: from num_computed_tokens on, guesses (draft_token_ids) last;
    # made here as the executor takes them, block tables as they stand after scheduling
    scheduled: list[ScheduledSequence[Request]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def is_decode_only(self) -> bool:
        """Every request computes its last token (and its guesses), none a prompt chunk."""
        return all(
            s.samples and s.num_new_tokens == 1 + len(s.draft_token_ids) for s in self.scheduled
        )


class Scheduler:
    """Decides which requests run each step and how many of their tokens."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        speculator: Speculator | None = None,
    ):
        self.config = config
        self.kv_cache = kv_cache
        self.speculator = speculator
        self.waiting: RequestQueue = make_queue(config.scheduling_policy)
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.step_tokens = StepTokenCounter()  # tokens of each step that computed any

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.add(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        assert budget is not None, "the engine resolves the default budget"
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        if out.scheduled:
            self.step_tokens.observe(out.num_batched_tokens)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        speculator = self.speculator
        if speculator is not None and not speculator.begin_step(len(self.running)):
            speculator = None
        index = 0
        running, allocate, scheduled = self.running, self.kv_cache.allocate, out.scheduled
        table_after = self.kv_cache.table_after
        while index < len(running) and budget > 0:
            request = running[index]
            start, num_tokens = request.num_computed_tokens, len(request.token_ids)
            num_new = num_tokens - start
            if num_new > budget:
                num_new = budget
            drafts = _NO_DRAFTS
            lookahead = 0
            if speculator is not None:
                if num_new == 1 and request.num_output_tokens:
                    drafts = speculator.propose(request, budget - 1)
                if start + num_new == num_tokens:
                    lookahead = speculator.lookahead(request)
                if lookahead and not allocate(request, num_new + len(drafts) + lookahead):
                    lookahead = 0  # no room to guess ahead: the next step decodes as usual
                if drafts and not lookahead and not allocate(request, 1 + len(drafts)):
                    drafts = _NO_DRAFTS  # no room for guesses: decode as usual
            # (with guesses, their allocation above made room for the step's own tokens)
            while (table := table_after(request, 0 if drafts else num_new)) is None:
                victim = self.waiting.victim(self.running)
                if self.running.index(victim) < index:  # scheduled earlier in this step
                    index -= 1
                    budget += self._unschedule(victim, out)
                self.running.remove(victim)
                self._preempt(victim, out)
                if victim is request:
                    return budget
            samples = start + num_new == num_tokens
            num_new += len(drafts)
            scheduled.append(
                ScheduledSequence(request, start, num_new, samples, table, drafts, lookahead)
            )
            budget -= num_new
            index += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            cached = self.kv_cache.find_cached_prefix(request)
            num_cached_tokens = len(cached) * self.kv_cache.block_size
            num_new = min(request.num_tokens - num_cached_tokens, budget)
            lookahead = 0
            if self.speculator is not None and num_cached_tokens + num_new == request.num_tokens:
                lookahead = self.speculator.lookahead(request)
            if not (lookahead and self.kv_cache.allocate(request, num_new + lookahead, cached)):
                lookahead = 0
                if not self.kv_cache.allocate(request, num_new, cached):
                    break
            self.waiting.pop()
            request.num_computed_tokens = num_cached_tokens
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = num_cached_tokens
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            samples = num_cached_tokens + num_new == request.num_tokens
            table = self.kv_cache.block_ids(request)
            out.scheduled.append(
                ScheduledSequence(
                    request, num_cached_tokens, num_new, samples, table, [], lookahead
                )
            )
            budget -= num_new

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.add_preempted(request)
        self.num_preemptions += 1
        out.preempted.append(request)

    @staticmethod
    def _unschedule(request: Request, out: SchedulerOutput) -> int:
        """Take a request out of this step's schedule; returns the tokens it had."""
        item = next(s for s in out.scheduled if s.request is request)
        out.scheduled.remove(item)
        return item.num_new_tokens

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[Request]:
        """Append each request's new tokens (its accepted guesses, then the token sampled
        after them) up to the first that stops it; advance computed counts over the tokens
        kept; finish requests; return the changed ones."""
        changed = []
        cache_full_blocks = self.kv_cache.cache_full_blocks
        bs = self.kv_cache.block_size
        for item in out.scheduled:
            request = item.request
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            tokens = sampled.get(request.request_id)
            if not tokens:
                request.num_computed_tokens = end
                cache_full_blocks(request)
                continue
            drafts = item.draft_token_ids
            if len(tokens) == 1 and not drafts:  # (most: a decode's one token)
                request.append_token(tokens[0])
                # the K/V of every token but the newest is computed
                request.num_computed_tokens = end
                if end // bs != start // bs:  # a block filled up (else none did)
                    cache_full_blocks(request)
                if request.check_stop():
                    self.finish(request)
                changed.append(request)
                continue
            if drafts and self.speculator is not None:
                # the guesses kept: all new tokens but the sampler's own after them, or all
                # where a kept guess ended the request (a stop token)
                kept = len(tokens) - (tokens[: len(drafts)] != drafts[: len(tokens)])
                self.speculator.observe(request.request_id, len(drafts), min(kept, len(drafts)))
            stopped = False
            for token_id in tokens:
                request.append_token(token_id)
                if stopped := request.check_stop():
                    break
            # the K/V of every token but the newest is computed (rejected guesses' is not)
            request.num_computed_tokens = min(end, len(request.token_ids) - 1)
            cache_full_blocks(request)
            if stopped:
                self.finish(request)
            changed.append(request)
        return changed

    def finish(self, request: Request, reason: FinishReason | None = None) -> None:
        """End a request however it ends (stop, length, abort) and free its blocks at once."""
        if request.is_finished:
            return
        if reason is not None:
            request.finish_reason = reason
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.waiting.forget(request)
        request.status = RequestStatus.FINISHED
        self.kv_cache.free(request)
        if self.speculator is not None:
            self.speculator.forget(request.request_id)
