"""Sampler: turns a step's logits [N, V] into one token per row with batched tensor ops."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.engine.request import Request

_NEG_INF = float("-inf")


class Sampler:
    """Applies every request's sampling parameters to its row, then draws.

    Seeded requests draw from their own torch.Generator, so their output does not
    depend on what else is in the batch; the others share one generator.
    """

    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0):
        self.vocab_size = vocab_size
        self.device = device
        self.shared_generator = torch.Generator(device).manual_seed(seed)
        self.generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:
        """logits [N, V] float32 for the N requests that sample this step -> N token ids."""
        logits = logits[:, : self.vocab_size]
        logits = self._apply_logit_bias(logits, requests)
        logits = self._apply_min_tokens(logits, requests)
        logits = self._apply_penalties(logits, requests)
        greedy = [r.params.is_greedy for r in requests]
        if all(greedy):
            return logits.argmax(dim=-1).tolist()
        sampled = self._sample_random(logits, requests)
        if any(greedy):
            is_greedy = torch.tensor(greedy, device=logits.device)
            sampled = torch.where(is_greedy, logits.argmax(dim=-1), sampled)
        return sampled.tolist()

    def _apply_logit_bias(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        rows, cols, values = [], [], []
        for i, request in enumerate(requests):
            for token_id, bias in request.params.logit_bias.items():
                rows.append(i)
                cols.append(token_id)
                values.append(bias)
        if not rows:
            return logits
        logits = logits.clone()
        index = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        logits.index_put_(index, torch.tensor(values, device=logits.device), accumulate=True)
        return logits

    def _apply_min_tokens(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Until min_tokens are out, EOS and stop ids cannot be drawn."""
        rows: list[int] = []
        cols: list[int] = []
        for i, request in enumerate(requests):
            params = request.params
            if request.num_output_tokens < params.min_tokens:
                banned = set(params.stop_token_ids)
                if not params.ignore_eos:
                    banned |= request.eos_token_ids
                rows.extend([i] * len(banned))
                cols.extend(banned)
        if not rows:
            return logits
        logits = logits.clone()
        logits[torch.tensor(rows), torch.tensor(cols)] = _NEG_INF
        return logits

    def _apply_penalties(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """vLLM's semantics: repetition over prompt+output; presence/frequency over output only."""
        if not any(r.params.has_penalties for r in requests):
            return logits
        device = logits.device
        output_counts = _token_counts(
            [r.output_token_ids for r in requests], self.vocab_size, device
        )
        prompt_seen = (
            _token_counts([r.prompt_token_ids for r in requests], self.vocab_size, device) > 0
        )
        repetition = torch.tensor([r.params.repetition_penalty for r in requests], device=device)[
            :, None
        ]
        frequency = torch.tensor([r.params.frequency_penalty for r in requests], device=device)[
            :, None
        ]
        presence = torch.tensor([r.params.presence_penalty for r in requests], device=device)[
            :, None
        ]
        seen = prompt_seen | (output_counts > 0)
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
        return logits - frequency * output_counts - presence * (output_counts > 0)

    def _sample_random(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        device = logits.device
        temperature = torch.tensor(
            [r.params.temperature if not r.params.is_greedy else 1.0 for r in requests],
            device=device,
        )[:, None]
        probs = torch.softmax(logits / temperature, dim=-1)
        probs = _apply_min_p(probs, requests)
        if any(r.params.top_k > 0 or r.params.top_p < 1.0 for r in requests):
            return _sample_top_k_top_p(probs, requests, self._exponentials(probs, requests))
        return (probs / self._exponentials(probs, requests)).argmax(dim=-1)

    def _exponentials(self, probs: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Exp(1) noise [N, V]: argmax(p / noise) draws from p (the exponential race)."""
        noise = torch.empty_like(probs).exponential_(generator=self.shared_generator)
        for i, request in enumerate(requests):
            seed = request.params.seed
            if seed is None or request.params.is_greedy:
                continue
            generator = self.generators.get(request.request_id)
            if generator is None:
                generator = self.generators[request.request_id] = torch.Generator(
                    probs.device
                ).manual_seed(seed)
            noise[i].exponential_(generator=generator)
        return noise


def _token_counts(
    token_lists: list[list[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Occurrences of each token per row [N, V] (float32)."""
    width = max((len(t) for t in token_lists), default=0)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    if width:
        ids = torch.full((len(token_lists), width), vocab_size, dtype=torch.long)
        for i, tokens in enumerate(token_lists):
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        ids = ids.to(device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab_size]


def _apply_min_p(probs: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    min_p = [r.params.min_p for r in requests]
    if not any(min_p):
        return probs
    threshold = torch.tensor(min_p, device=probs.device)[:, None] * probs.amax(dim=-1, keepdim=True)
    return probs.masked_fill(probs < threshold, 0.0)


def _sample_top_k_top_p(
    probs: torch.Tensor, requests: Sequence[Request], noise: torch.Tensor
) -> torch.Tensor:
    """Sort once; mask ranks beyond top_k, then the tail beyond top_p mass; draw in sorted order."""
    device = probs.device
    vocab = probs.shape[-1]
    sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
    top_k = torch.tensor(
        [r.params.top_k if r.params.top_k > 0 else vocab for r in requests], device=device
    )
    ranks = torch.arange(vocab, device=device)[None, :]
    sorted_probs = sorted_probs.masked_fill(ranks >= top_k[:, None], 0.0)
    sorted_probs = sorted_probs / sorted_probs.sum(dim=-1, keepdim=True)
    top_p = torch.tensor([r.params.top_p for r in requests], device=device)[:, None]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the top token always stays
    noise = noise.gather(1, sorted_ids)
    choice = (sorted_probs / noise).argmax(dim=-1, keepdim=True)
    return sorted_ids.gather(1, choice).squeeze(1)
