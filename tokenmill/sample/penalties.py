"""Repetition, frequency and presence penalties over the tokens each request has seen.

Only tokens that occur in a request's prompt or output are penalised, so the
state is sparse: each request owns one row of persistent [R, L] tensors holding
its distinct tokens (slots), their output counts and whether the prompt has
them. A step adds only the tokens generated since the last one, then gathers
the seen tokens' logits [N, L], penalises them and scatters them back: the cost
is O(N * L) with L the number of distinct tokens, not O(N * vocab).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tokenmill.sample.interface import SamplingRequest as Request

_INITIAL_ROWS = 8
_INITIAL_SLOTS = 64


@dataclass(slots=True)
class _Row:
    index: int  # row in the slot tensors
    slot_of: dict[int, int] = field(default_factory=dict)  # token id -> its slot
    num_counted: int = 0  # output tokens already counted


class PenaltyState:
    """Seen tokens of the requests that use penalties; rows are reused once freed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.token_ids = torch.zeros(0, 0, dtype=torch.long, device=device)  # [R, L]
        self.output_counts = torch.zeros(0, 0, device=device)  # [R, L]
        self.in_prompt = torch.zeros(0, 0, dtype=torch.bool, device=device)  # [R, L]
        self._rows: dict[str, _Row] = {}
        self._free: list[int] = []

    def forget(self, request_id: str) -> None:
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free.append(row.index)

    def apply(self, logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
        """Penalise logits [N, V] of these requests in place, as vLLM does; returns them.

        Repetition divides positive logits (multiplies negative ones) of every token in
        the prompt or the output; frequency subtracts per occurrence in the output;
        presence subtracts once per token present in the output.
        """
        rows = self._sync(requests)
        token_ids, counts, in_prompt = self._gather(rows)  # [N, L] each
        values = logits.gather(1, token_ids)
        params = [r.params for r in requests]
        if any(p.repetition_penalty != 1.0 for p in params):
            repetition = self._column([p.repetition_penalty for p in params])
            penalized = torch.where(values > 0, values / repetition, values * repetition)
            values = torch.where(in_prompt | (counts > 0), penalized, values)
        if any(p.frequency_penalty != 0.0 for p in params):
            values = values - counts * self._column([p.frequency_penalty for p in params])
        if any(p.presence_penalty != 0.0 for p in params):
            present = (counts > 0).to(values.dtype)
            values = values - present * self._column([p.presence_penalty for p in params])
        return logits.scatter_(1, token_ids, values)

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=self.device)[:, None]

    def _gather(self, rows: list[_Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows' slots [N, L]; unused slots repeat slot 0, so scattering them is harmless."""
        width = max(len(row.slot_of) for row in rows)
        index = torch.tensor([row.index for row in rows], device=self.device)
        used = torch.tensor([len(row.slot_of) for row in rows], device=self.device)
        valid = torch.arange(width, device=self.device)[None, :] < used[:, None]
        picked = []
        for table in (self.token_ids, self.output_counts, self.in_prompt):
            values = table.index_select(0, index)[:, :width]
            picked.append(torch.where(valid, values, values[:, :1]))
        return picked[0], picked[1], picked[2]

    def _sync(self, requests: Sequence[Request]) -> list[_Row]:
        """The requests' rows, with every output token so far counted (one write per table)."""
        rows = []
        counted: list[tuple[int, int]] = []  # (row, slot) per new output token
        created: list[tuple[int, int, int]] = []  # (row, slot, token) per new distinct token
        for request in requests:
            row = self._rows.get(request.request_id)
            if row is None:
                row = self._rows[request.request_id] = self._new_row(request.prompt_token_ids)
            for token in request.token_ids[request.num_prompt_tokens + row.num_counted :]:
                slot = row.slot_of.get(token)
                if slot is None:
                    slot = row.slot_of[token] = len(row.slot_of)
                    created.append((row.index, slot, token))
                counted.append((row.index, slot))
                row.num_counted += 1
            rows.append(row)
        if created:
            self._reserve(max(slot for _, slot, _ in created) + 1)
            r, s, t = (
                torch.tensor(column, device=self.device) for column in zip(*created, strict=True)
            )
            self.token_ids.index_put_((r, s), t)
        if counted:
            r, s = (
                torch.tensor(column, device=self.device) for column in zip(*counted, strict=True)
            )
            self.output_counts.index_put_((r, s), torch.ones_like(r, dtype=torch.float), True)
        return rows

    def _new_row(self, prompt_token_ids: list[int]) -> _Row:
        if not self._free:
            self._grow_rows()
        row = _Row(self._free.pop())
        distinct = list(dict.fromkeys(prompt_token_ids))
        row.slot_of = {t: i for i, t in enumerate(distinct)}
        self._reserve(len(distinct))
        self.token_ids[row.index].zero_()
        self.output_counts[row.index].zero_()
        self.in_prompt[row.index].zero_()
        self.token_ids[row.index, : len(distinct)] = torch.tensor(distinct, device=self.device)
        self.in_prompt[row.index, : len(distinct)] = True
        return row

    def _grow_rows(self) -> None:
        old, new = self.token_ids.shape[0], max(_INITIAL_ROWS, 2 * self.token_ids.shape[0])
        self._resize(new, max(_INITIAL_SLOTS, self.token_ids.shape[1]))
        self._free.extend(range(new - 1, old - 1, -1))

    def _reserve(self, num_slots: int) -> None:
        width = self.token_ids.shape[1]
        if num_slots > width:
            self._resize(self.token_ids.shape[0], max(num_slots, 2 * width))

    def _resize(self, num_rows: int, num_slots: int) -> None:
        old_rows, old_slots = self.token_ids.shape
        tables = []
        for table in (self.token_ids, self.output_counts, self.in_prompt):
            grown = torch.zeros(num_rows, num_slots, dtype=table.dtype, device=self.device)
            grown[:old_rows, :old_slots] = table
            tables.append(grown)
        self.token_ids, self.output_counts, self.in_prompt = tables
