"""GrammarMasks: the step's token bitmask for the structured-output rows, applied in one op."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from tokenmill.sample.interface import SamplingRequest as Request
from tokenmill.structured.bitmask import allocate_bitmask, apply_bitmask

if TYPE_CHECKING:
    from tokenmill.structured.interface import GrammarMatcher
    from tokenmill.structured.manager import StructuredOutputManager


class GrammarMasks:
    """Fills one CPU bitmask row per constrained request, then masks their logits at once.

    Rows without a constraint are neither filled nor masked. With the engine's manager,
    xgrammar's rows are filled together on its C++ threads; without one, row by row.
    """

    def __init__(
        self, vocab_size: int, device: torch.device, manager: StructuredOutputManager | None
    ) -> None:
        self.vocab_size = vocab_size
        self.manager = manager
        # pinned for CUDA: the copy to the GPU does not wait; the buffer is reused only after
        # the step has read its sampled ids back, so the last copy is done by then
        self._pin = device.type == "cuda"
        self._bitmask = self._allocate(0)  # int32 [rows, ceil(V/32)], grown on demand

    def apply(self, logits: torch.Tensor, requests: Sequence[Request], rows: list[int]) -> None:
        """In place: -inf in logits[r] ([N, V]) for every token the grammar of requests[r]
        does not allow next, for each r in `rows` (the constrained rows)."""
        bitmask = self._rows(len(requests))  # [N, W]; rows outside `rows` are stale, unused
        matchers: list[GrammarMatcher] = [
            matcher for i in rows if (matcher := requests[i].matcher) is not None
        ]
        if self.manager is not None:
            self.manager.fill_bitmasks(matchers, bitmask, rows)
        else:
            for matcher, row in zip(matchers, rows, strict=True):
                matcher.fill_bitmask(bitmask, row)
        apply_bitmask(logits, bitmask, torch.tensor(rows))

    def _rows(self, num_rows: int) -> torch.Tensor:
        if self._bitmask.shape[0] < num_rows:
            self._bitmask = self._allocate(max(num_rows, 2 * self._bitmask.shape[0]))
        return self._bitmask[:num_rows]

    def _allocate(self, num_rows: int) -> torch.Tensor:
        bitmask = allocate_bitmask(num_rows, self.vocab_size)
        return bitmask.pin_memory() if self._pin else bitmask
