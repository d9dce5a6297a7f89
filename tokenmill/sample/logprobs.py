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

_PROMPT_ROWS_PER_CHUNK = 512  # prompt positions turned into logits at once (bounds [rows, V])


@dataclass(slots=True)
class Logprob:
    """One token's log-probability at one position (vLLM's `Logprob`)."""

    logprob: float  # natural log, of the raw model distribution (see docs/sampling.md)
    rank: int | None = None  # 1 = the most likely token at this position
    decoded_token: str | None = None  # the token's own text


# token id -> Logprob at one position: the chosen token first, then the top-k in rank order.
PositionLogprobs = dict[int, Logprob]


@dataclass(slots=True)
class LogprobsTensors:
    """Per row: the chosen token, its logprob and rank, and the top `num_top[i]`."""

    token_ids: torch.Tensor  # [N]
    chosen: torch.Tensor  # [N] logprob of the chosen token
    ranks: torch.Tensor  # [N] int32, 1 = most likely (ties count, as in vLLM)
    top_values: torch.Tensor  # [N, K], K = max(num_top)
    top_ids: torch.Tensor  # [N, K]
    num_top: list[int]

    @classmethod
    def of(
        cls, logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]
    ) -> LogprobsTensors:
        """From logprobs [N, V] and the chosen token_ids [N]."""
        chosen = logprobs.gather(1, token_ids[:, None])  # [N, 1]
        ranks = (logprobs >= chosen).sum(dim=-1, dtype=torch.int32)
        max_top = max(num_top, default=0)
        top_values, top_ids = logprobs.topk(max_top, dim=-1) if max_top else (chosen[:, :0],) * 2
        return cls(token_ids, chosen.squeeze(1), ranks, top_values, top_ids, list(num_top))

    def entries(self) -> list[PositionLogprobs]:
        """One entry per row (read back to the host at once)."""
        rows = zip(
            self.token_ids.tolist(),
            self.chosen.tolist(),
            self.ranks.tolist(),
            self.top_values.tolist(),
            self.top_ids.tolist(),
            self.num_top,
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


def gather_logprobs(
    logprobs: torch.Tensor, token_ids: torch.Tensor, num_top: Sequence[int]
) -> list[PositionLogprobs]:
    """Per row of logprobs [N, V]: the chosen token's logprob and rank, then its top num_top[i]."""
    return LogprobsTensors.of(logprobs, token_ids, num_top).entries()


@dataclass(slots=True)
class PromptChunk:
    """The prompt positions a prefill chunk scores for one request: the logits at position
    p (row first_row + p - start of the flat batch) score prompt token p + 1."""

    request_id: str
    first_row: int  # row of position `start` in the flattened batch
    start: int
    positions: range  # positions to score (already-scored ones excluded)
    targets: list[int]  # prompt token p + 1 for each position p
    num_top: int


def prompt_logprobs(
    logits_of_rows: Callable[[torch.Tensor], torch.Tensor],
    chunks: Sequence[PromptChunk],
    vocab_size: int,
    device: torch.device,
) -> dict[str, list[PositionLogprobs]]:
    """Each request's entries for the prompt tokens its chunks predict, in order;
    `logits_of_rows(index)`: the float32 logits of those rows of the batch."""
    rows: list[int] = []
    targets: list[int] = []
    owners: list[PromptChunk] = []
    for chunk in chunks:
        rows.extend(chunk.first_row + p - chunk.start for p in chunk.positions)
        targets.extend(chunk.targets)
        owners.extend([chunk] * len(chunk.positions))
    result: dict[str, list[PositionLogprobs]] = {c.request_id: [] for c in chunks}
    for begin in range(0, len(rows), _PROMPT_ROWS_PER_CHUNK):
        end = begin + _PROMPT_ROWS_PER_CHUNK
        index = torch.tensor(rows[begin:end], device=device)
        logits = logits_of_rows(index)[:, :vocab_size].float()
        entries = gather_logprobs(
            torch.log_softmax(logits, dim=-1),
            torch.tensor(targets[begin:end], device=device),
            [c.num_top for c in owners[begin:end]],
        )
        for chunk, entry in zip(owners[begin:end], entries, strict=True):
            result[chunk.request_id].append(entry)
    return result
