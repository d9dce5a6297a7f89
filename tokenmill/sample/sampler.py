"""Sampler: turns a step's logits [N, V] into one token per row with batched tensor ops."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tokenmill.sample.bad_words import apply_bad_words
from tokenmill.sample.draw import apply_min_p, draw_full, draw_truncated, greedy_tokens
from tokenmill.sample.grammar import GrammarMasks
from tokenmill.sample.interface import SamplerOutput
from tokenmill.sample.interface import SamplingRequest as Request
from tokenmill.sample.logprobs import LogprobsTensors
from tokenmill.sample.penalties import PenaltyState

if TYPE_CHECKING:
    from tokenmill.structured.manager import StructuredOutputManager

_NEG_INF = float("-inf")


@dataclass(slots=True)
class _BatchFlags:
    """Which processing steps this batch needs at all (each is skipped when no row uses it)."""

    greedy: list[bool]
    logprob_rows: list[int]
    penalty_rows: list[int]
    grammar_rows: list[int]  # rows with a structured-output constraint
    has_logit_bias: bool
    has_allowed: bool
    has_bad_words: bool
    has_min_tokens: bool

    @classmethod
    def of(cls, requests: Sequence[Request]) -> _BatchFlags:
        params = [r.params for r in requests]
        return cls(
            greedy=[p.is_greedy for p in params],
            logprob_rows=[i for i, p in enumerate(params) if p.logprobs is not None],
            penalty_rows=[i for i, p in enumerate(params) if p.has_penalties],
            grammar_rows=[i for i, r in enumerate(requests) if r.matcher is not None],
            has_logit_bias=any(p.logit_bias for p in params),
            has_allowed=any(p.allowed_token_ids is not None for p in params),
            has_bad_words=any(p.bad_words_token_ids for p in params),
            has_min_tokens=any(r.num_output_tokens < r.params.min_tokens for r in requests),
        )

    @property
    def argmax_only(self) -> bool:
        """Every row greedy, with no logprobs, masks, bias or penalties to apply."""
        return all(self.greedy) and not (
            self.logprob_rows or self.penalty_rows or self.grammar_rows or self.has_logit_bias
            or self.has_allowed or self.has_bad_words or self.has_min_tokens
        )  # fmt: skip


def argmax_only(requests: Sequence[Request]) -> bool:
    """Whether the sampler would take these rows' argmax and nothing else."""
    return _BatchFlags.of(requests).argmax_only


class Sampler:
    """Applies every request's sampling parameters to its row, then draws.

    Order (vLLM v1's): allowed-token mask, bad words, logit bias, min_tokens, penalties,
    grammar bitmask (structured outputs); then greedy rows take the argmax and the others
    get temperature, min-p, top-k and top-p before the draw. Logprobs, when asked for, come
    from the raw logits.
    Random draws use one uniform per row from a CPU generator: seeded requests
    have their own, so their output does not depend on what else is in the batch.
    """

    def __init__(
        self,
        vocab_size: int,
        device: torch.device,
        seed: int = 0,
        grammars: StructuredOutputManager | None = None,  # fills grammar rows together
    ):
        self.vocab_size = vocab_size
        self.device = device
        self.shared_generator = torch.Generator().manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}
        self.penalties = PenaltyState(device)
        self.grammar = GrammarMasks(vocab_size, device, grammars)
        self._allowed: dict[str, torch.Tensor] = {}  # request id -> [V] bool mask, built once

    def forget(self, request_id: str) -> None:
        """Drop what the sampler keeps for a request that ended."""
        self.generators.pop(request_id, None)
        self._allowed.pop(request_id, None)
        self.penalties.forget(request_id)

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> SamplerOutput:
        """logits [N, V] float32 for the N requests that sample this step -> N token ids,
        and the logprobs of the rows that asked for them."""
        logits = logits[:, : self.vocab_size].float()  # penalties edit it in place
        flags = _BatchFlags.of(requests)
        raw_logprobs = self._raw_logprobs(logits, flags.logprob_rows)
        logits = self._process(logits, requests, flags)
        if all(flags.greedy):
            sampled = greedy_tokens(logits)
        else:
            sampled = self._sample(logits, requests, flags.greedy)
        rows = flags.logprob_rows
        if raw_logprobs is None:
            return SamplerOutput(sampled, None, rows)
        chosen = sampled if len(rows) == len(requests) else sampled[rows]
        num_top = [requests[i].params.logprobs or 0 for i in rows]
        return SamplerOutput(sampled, LogprobsTensors.of(raw_logprobs, chosen, num_top), rows)

    def _raw_logprobs(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor | None:
        if not rows:
            return None
        subset = logits if len(rows) == logits.shape[0] else logits[rows]
        return torch.log_softmax(subset, dim=-1)

    def _process(
        self, logits: torch.Tensor, requests: Sequence[Request], flags: _BatchFlags
    ) -> torch.Tensor:
        """Masks, bias and penalties: what changes even the greedy choice."""
        if flags.has_allowed:
            logits = self._apply_allowed(logits, requests)
        if flags.has_bad_words:
            logits = apply_bad_words(logits, requests)
        if flags.has_logit_bias:
            logits = _apply_logit_bias(logits, requests)
        if flags.has_min_tokens:
            logits = _apply_min_tokens(logits, requests)
        if len(flags.penalty_rows) == len(requests):
            logits = self.penalties.apply(logits, requests)
        elif flags.penalty_rows:
            rows = flags.penalty_rows
            index = torch.tensor(rows, device=logits.device)
            penalized = self.penalties.apply(logits[index], [requests[i] for i in rows])
            logits = logits.index_copy(0, index, penalized)
        if flags.grammar_rows:
            self.grammar.apply(logits, requests, flags.grammar_rows)
        return logits

    def _apply_allowed(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.params.allowed_token_ids is not None]
        masks = torch.stack([self._allowed_mask(requests[i]) for i in rows])  # [M, V]
        index = torch.tensor(rows, device=logits.device)
        masked = logits.index_select(0, index).masked_fill(~masks, _NEG_INF)
        return logits.index_copy(0, index, masked)

    def _allowed_mask(self, request: Request) -> torch.Tensor:
        mask = self._allowed.get(request.request_id)
        if mask is None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
            ids = torch.tensor(request.params.allowed_token_ids or [], dtype=torch.long)
            mask[ids.to(self.device)] = True
            self._allowed[request.request_id] = mask
        return mask

    def _sample(
        self, logits: torch.Tensor, requests: Sequence[Request], greedy: list[bool]
    ) -> torch.Tensor:
        """Greedy rows take the argmax; the others are drawn after temperature and truncation."""
        rows = [i for i, g in enumerate(greedy) if not g]
        params = [requests[i].params for i in rows]
        device = logits.device
        subset = logits if len(rows) == len(requests) else logits[rows]
        temperature = torch.tensor([p.temperature for p in params], device=device)
        uniforms = self._uniforms([requests[i] for i in rows])
        truncated = any(p.top_k > 0 or p.top_p < 1.0 for p in params)
        has_min_p = any(p.min_p > 0 for p in params)
        if truncated or has_min_p:  # they look at scaled logits; draw_full scales by itself
            subset = subset / temperature[:, None]
            temperature = torch.ones_like(temperature)
        if has_min_p:
            subset = apply_min_p(subset, torch.tensor([p.min_p for p in params], device=device))
        if truncated:
            top_k, top_p = [p.top_k for p in params], [p.top_p for p in params]
            drawn = draw_truncated(subset, top_k, top_p, uniforms)
        else:
            drawn = draw_full(subset, uniforms, temperature)
        if len(rows) == len(requests):
            return drawn
        return greedy_tokens(logits).index_copy(0, torch.tensor(rows, device=device), drawn)

    def _uniforms(self, requests: Sequence[Request]) -> torch.Tensor:
        """One number in [0, 1) per row: from the request's own generator when it has a seed."""
        values = torch.rand(len(requests), generator=self.shared_generator)
        for i, request in enumerate(requests):
            seed = request.params.seed
            if seed is not None:
                generator = self.generators.get(request.request_id)
                if generator is None:
                    generator = torch.Generator().manual_seed(seed)
                    self.generators[request.request_id] = generator
                values[i] = torch.rand(1, generator=generator)
        return values.to(self.device)


def _apply_logit_bias(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    rows: list[int] = []
    cols: list[int] = []
    values: list[float] = []
    for i, request in enumerate(requests):
        bias = request.params.logit_bias
        rows.extend([i] * len(bias))
        cols.extend(bias)
        values.extend(bias.values())
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    return logits.index_put(index, torch.tensor(values, device=device), accumulate=True)


def _apply_min_tokens(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Until min_tokens are out, EOS and stop ids cannot be drawn.

    A grammar decides for itself: EOS is banned only while it allows something else (when
    it is complete and allows nothing more, EOS must come).
    """
    rows: list[int] = []
    cols: list[int] = []
    for i, request in enumerate(requests):
        params = request.params
        if request.num_output_tokens < params.min_tokens:
            banned = set(params.stop_token_ids)
            matcher = request.matcher
            hold_eos = not params.ignore_eos if matcher is None else not matcher.is_terminated()
            if hold_eos:
                banned |= request.eos_token_ids
            rows.extend([i] * len(banned))
            cols.extend(banned)
    if not rows:
        return logits
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    return logits.index_put(index, torch.tensor(_NEG_INF, device=device))
