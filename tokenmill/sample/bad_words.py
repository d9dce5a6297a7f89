"""bad_words: the tokens that would complete a banned word get -inf (vLLM v1's rule)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.sample.interface import SamplingRequest as Request

_NEG_INF = float("-inf")


def banned_token_ids(request: Request) -> list[int]:
    """The tokens this request may not sample next: the last token of every bad-word sequence
    whose other tokens are the last tokens of the output (the prompt never counts; a
    one-token word is always banned)."""
    sequences = request.params.bad_words_token_ids or []
    num_output, token_ids = request.num_output_tokens, request.token_ids
    banned = []
    for ids in sequences:
        num_prefix = len(ids) - 1
        if num_prefix > num_output:
            continue
        if num_prefix == 0 or token_ids[-num_prefix:] == ids[:-1]:
            banned.append(ids[-1])
    return banned


def apply_bad_words(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """logits [N, V] with -inf at each row's banned tokens (one write for the batch)."""
    rows: list[int] = []
    cols: list[int] = []
    for i, request in enumerate(requests):
        banned = banned_token_ids(request)
        rows.extend([i] * len(banned))
        cols.extend(banned)
    if not rows:
        return logits
    device = logits.device
    index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
    return logits.index_put(index, torch.tensor(_NEG_INF, device=device))
