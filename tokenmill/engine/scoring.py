"""Scores of text pairs from an embedding model, as vLLM scores with one (its score and
rerank APIs, LLM.score): a pair's score is the cosine similarity of its two embeddings. One
first text is scored against every second text, or the two lists pairwise."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import PoolingRequestOutput
from tokenmill.errors import InvalidRequestError


@dataclass(slots=True)
class ScoringOutput:
    score: float


@dataclass(slots=True)
class ScoringRequestOutput:
    """One pair's score (vLLM's ScoringRequestOutput): its id the two embeddings' joined by
    "_", its prompts' token ids one after the other (the tokenizer's pad id between, where
    it has one), as vLLM gives them."""

    request_id: str
    outputs: ScoringOutput
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    finished: bool = True


def check_pairing(num_firsts: int, num_seconds: int, param: str) -> None:
    """1:1, 1:N or N:N; else a 400 naming `param` (the first list)."""
    if num_firsts not in (1, num_seconds) or num_seconds == 0:
        raise InvalidRequestError(
            f"the texts to score must pair 1:1, 1:N or N:N; got {num_firsts} and "
            f"{num_seconds}", param=param,
        )  # fmt: skip


def pair_scores(
    firsts: Sequence[PoolingRequestOutput],
    seconds: Sequence[PoolingRequestOutput],
    separator: list[int],
) -> list[ScoringRequestOutput]:
    """Each pair's cosine similarity (a single first against every second: the caller
    checked the pairing); `separator`: the token ids between a pair's prompts."""
    assert len(firsts) in (1, len(seconds))
    lefts = list(firsts) * len(seconds) if len(firsts) == 1 else list(firsts)
    scored = []
    for left, right in zip(lefts, seconds, strict=True):
        assert left.outputs is not None and right.outputs is not None  # failures raise first
        a = left.outputs.data.to(torch.float32)
        b = right.outputs.data.to(torch.float32)
        score = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        scored.append(ScoringRequestOutput(
            f"{left.request_id}_{right.request_id}", ScoringOutput(score),
            left.prompt_token_ids + separator + right.prompt_token_ids,
            left.num_cached_tokens + right.num_cached_tokens,
        ))  # fmt: skip
    return scored
