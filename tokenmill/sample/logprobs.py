"""Logprobs of chosen tokens and their top-k alternatives, for output and prompt positions.

Logprobs are those of the raw model distribution, log_softmax of the logits
before logit bias, penalties, temperature or truncation (vLLM v1's default,
`raw_logprobs`): they say what the model thinks of a token, whatever the
sampling settings. Everything is computed for the whole batch with tensor ops
and read back to the host once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tokenmill.engine.outputs import Logprob, PositionLogprobs
from tokenmill.engine.request import Request

_PROMPT_ROWS_PER_CHUNK = (
    512  # prompt positions turned into logits at once (bounds [rows, V] memory)
)


@dataclass(slots=True)
class PromptChunk:
    """A prefill chunk of a request that wants prompt logprobs: its rows in the flat batch."""

    request: Request
    first_row: int  # row of position `start` in the flattened batch
    start: int  # first position of the chunk
    num_tokens: int


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]
) -> list[PositionLogprobs]:
    """Per row of logprobs [N, V]: the chosen token's logprob and rank, then its top num_top[i]."""
    chosen = logprobs.gather(1, token_ids[:, None])  # [N, 1]
    ranks = (logprobs >= chosen).sum(dim=-1, dtype=torch.int32)  # ties count, as in vLLM
    max_top = max(num_top, default=0)
    top_values, top_ids = logprobs.topk(max_top, dim=-1) if max_top else (chosen[:, :0],) * 2
    rows = zip(
        token_ids.tolist(),
        chosen.squeeze(1).tolist(),
        ranks.tolist(),
        top_values.tolist(),
        top_ids.tolist(),
        num_top,
        strict=True,
    )
    result = []
    for token_id, value, rank, values, ids, k in rows:
        entry = {token_id: Logprob(value, rank)}
        for j in range(k):
            if ids[j] not in entry:
                entry[ids[j]] = Logprob(values[j], j + 1)
        result.append(entry)
    return result


def record_sample_logprobs(
    requests: Sequence[Request], logprobs: torch.Tensor, token_ids: torch.Tensor
) -> None:
    """Append each request's entry for its new token (logprobs [N, V] of these requests)."""
    entries = gather_logprobs(logprobs, token_ids, [r.params.logprobs or 0 for r in requests])
    for request, entry in zip(requests, entries, strict=True):
        request.logprobs.append(entry)
        request.cumulative_logprob += next(iter(entry.values())).logprob


def record_prompt_logprobs(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    chunks: Sequence[PromptChunk],
    vocab_size: int,
) -> None:
    """Score the prompt tokens these chunks predict and append them to their requests."""
    rows: list[int] = []
    targets: list[int] = []
    owners: list[Request] = []
    for chunk in chunks:
        request = chunk.request
        for position in request.prompt_logprob_positions(chunk.start, chunk.num_tokens):
            rows.append(chunk.first_row + position - chunk.start)
            targets.append(request.prompt_token_ids[position + 1])
            owners.append(request)
    device = hidden.device
    for begin in range(0, len(rows), _PROMPT_ROWS_PER_CHUNK):
        end = begin + _PROMPT_ROWS_PER_CHUNK
        index = torch.tensor(rows[begin:end], device=device)
        logits = compute_logits(hidden.index_select(0, index))[:, :vocab_size].float()
        entries = gather_logprobs(
            torch.log_softmax(logits, dim=-1),
            torch.tensor(targets[begin:end], device=device),
            [r.params.prompt_logprobs or 0 for r in owners[begin:end]],
        )
        for request, entry in zip(owners[begin:end], entries, strict=True):
            request.prompt_logprobs.append(entry)
