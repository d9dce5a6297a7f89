"""DraftRunner: a smaller model of the target's vocabulary guesses the target's next
tokens (speculative decoding's "draft_model" method).

It runs in the target's worker, after each step, on KV caches of its own laid out like the
target's: the same blocks and slots, so every block table the scheduler hands out serves
both. First it mirrors what the step computed, with the step's outcome in place of its
guesses: for a sequence that sampled, its positions from the step's first to its newest
token (the guesses the target kept and the token it sampled after them); for a prompt
chunk, the chunk. Its cache then holds every position the target's does, and the newest
token's, so a prefix-cache hit or a preemption's recompute serves it as it serves the
target. The mirror's row of a sequence's newest token gives its first guess; k - 1 more
one-row steps give the rest, their K/V written into the slots the scheduler set aside
ahead (`ScheduledSequence.num_lookahead`) and written over by the next step.

A guess is the draft's argmax: a one-hot draft distribution, for which the verification
(sample/speculative.py) is exact rejection sampling, whatever the request's sampling.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from tokenmill.backends.base import Backend
from tokenmill.layers.attention import ScheduledChunk, StepLayout
from tokenmill.layers.ops import ForwardContext, KVCache
from tokenmill.model.interface import CausalLM
from tokenmill.worker.inputs import ScheduledSequence
from tokenmill.worker.model_runner import long_tensor


@dataclass(slots=True)
class _Guessing:
    """A sequence the draft guesses for: its newest token's row and position, and how
    many guesses it wants."""

    request_id: str
    block_table: array[int]
    row: int  # in the mirror batch
    position: int  # of its newest token
    num_guesses: int


class DraftRunner:
    def __init__(
        self,
        model: CausalLM,
        backend: Backend,
        kv_caches: list[KVCache],
        block_size: int,
        device: torch.device,
        vocab_size: int,  # the target's: a guess past it is no token the target knows
    ):
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        self.block_size, self.device, self.vocab_size = block_size, device, vocab_size
        self.max_positions = model.config.max_context  # its rotary tables' reach

    @torch.inference_mode()
    def propose(
        self, scheduled: list[ScheduledSequence], sampled: dict[str, list[int]]
    ) -> dict[str, tuple[int, list[int]]]:
        """Mirror the step just run and guess the next tokens of the sequences that sampled
        and asked for guesses: request id -> (its token count the guesses follow, guesses)."""
        # a decoding sequence's rows are one-row decode chunks, as the target's guess rows
        # are (a step of decodes only runs fused); prompt chunks go after them
        decodes, prompts = _Rows(self.block_size), _Rows(self.block_size)
        guessing: list[tuple[_Guessing, bool]] = []  # and whether its row is a prompt's
        for item in scheduled:
            request = item.request
            if request.pooling_type is not None:
                continue  # embeddings never decode
            start, table = item.start, item.block_table
            capacity = min(len(table) * self.block_size, self.max_positions)
            if not item.samples:  # a prompt chunk
                end = min(start + item.num_new_tokens, capacity)
                prompts.add(request.token_ids[start:end], start, table)
                continue
            new = sampled.get(request.request_id)
            if not new:
                continue  # its step failed
            # the step's real tokens (its guesses are in `new` where kept), then what it sampled
            tokens = request.token_ids[start:] + new
            num_tokens = start + len(tokens)  # the sequence's, once the step is applied
            rows = decodes if item.is_decode else prompts
            row = rows.add(tokens[: max(0, capacity - start)], start, table, item.is_decode)
            num_guesses = min(item.num_lookahead, capacity - num_tokens + 1)
            if num_guesses > 0:
                last = row + len(tokens) - 1
                guessing.append(
                    (
                        _Guessing(request.request_id, table, last, num_tokens - 1, num_guesses),
                        rows is prompts,
                    )
                )
        num_decodes = len(decodes.ids)
        decodes.extend(prompts)
        if not decodes.chunks:
            return {}
        hidden = self._forward(decodes, num_decodes)
        if not guessing:
            return {}
        for g, in_prompts in guessing:
            g.row += num_decodes if in_prompts else 0
        return self._guess(hidden, [g for g, _ in guessing])

    def _guess(
        self, hidden: torch.Tensor, guessing: list[_Guessing]
    ) -> dict[str, tuple[int, list[int]]]:
        """The first guesses from the mirror's `hidden` rows, then one-row steps for the rest."""
        last_rows = torch.tensor([g.row for g in guessing], device=self.device)
        guesses = [[token] for token in self._argmax(hidden, last_rows)]
        for i in range(1, max(g.num_guesses for g in guessing)):
            step = _Rows(self.block_size)
            going = [j for j, g in enumerate(guessing) if g.num_guesses > i]
            for j in going:
                g = guessing[j]
                step.add([guesses[j][-1]], g.position + i, g.block_table)
            hidden = self._forward(step, num_decodes=len(going))
            every_row = torch.arange(len(going), device=self.device)
            for j, token in zip(going, self._argmax(hidden, every_row), strict=True):
                guesses[j].append(token)
        return {
            g.request_id: (g.position + 1, self._known(tokens))
            for g, tokens in zip(guessing, guesses, strict=True)
        }

    def _forward(self, rows: _Rows, num_decodes: int) -> torch.Tensor:
        device = self.device
        positions = long_tensor(rows.positions, device)
        layout = StepLayout(
            rows.chunks, num_decodes, positions, long_tensor(rows.slots, device), self.block_size
        )
        attention = self.backend.attention
        ctx = ForwardContext(
            self.backend.ops, attention, attention.build_metadata(layout), self.kv_caches
        )
        return self.backend.forward(self.model, long_tensor(rows.ids, device), positions, ctx)

    def _argmax(self, hidden: torch.Tensor, rows: torch.Tensor) -> list[int]:
        logits = self.model.compute_logits(hidden.index_select(0, rows))
        return logits.argmax(dim=-1).tolist()

    def _known(self, tokens: list[int]) -> list[int]:
        """The guesses up to the first the target's vocabulary lacks (a larger draft's)."""
        for i, token in enumerate(tokens):
            if token >= self.vocab_size:
                return tokens[:i]
        return tokens


class _Rows:
    """A batch being built: each added run of tokens is one chunk of its sequence."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.ids, self.positions, self.slots = array("q"), array("q"), array("q")
        self.chunks: list[ScheduledChunk] = []

    def add(self, tokens: list[int], start: int, table: array[int], one_row: bool = False) -> int:
        """Add tokens at positions [start, start + len(tokens)), as one chunk or with
        `one_row` a chunk per row (decode rows); returns the first's row."""
        row = len(self.ids)
        if tokens:
            bs = self.block_size
            end = start + len(tokens)
            self.ids.extend(tokens)
            self.positions.extend(range(start, end))
            self.slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            if one_row:
                self.chunks.extend(
                    ScheduledChunk(row + i, start + i, 1, table) for i in range(len(tokens))
                )
            else:
                self.chunks.append(ScheduledChunk(row, start, len(tokens), table))
        return row

    def extend(self, other: _Rows) -> None:
        """Append another batch's rows after these."""
        offset = len(self.ids)
        self.ids.extend(other.ids)
        self.positions.extend(other.positions)
        self.slots.extend(other.slots)
        self.chunks.extend(
            ScheduledChunk(c.row + offset, c.start, c.num_tokens, c.block_table)
            for c in other.chunks
        )
