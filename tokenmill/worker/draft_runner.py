"""DraftRunner: a smaller model of the target's vocabulary guesses the target's next
tokens (speculative decoding's "draft_model" method).

It runs in the target's worker, after each step, on KV caches of its own laid out like the
target's: the same blocks and slots, so the block table the scheduler gives a request
serves both. What it keeps per request is how many leading positions of its cache hold
the request's tokens (`_Draft.valid`); a preemption frees the blocks, and it starts over.

After a step, for each sequence that sampled and is to guess (the scheduler set KV slots
aside for its guesses: `ScheduledSequence.num_lookahead`), it runs the positions it lacks,
from its first invalid one to the sequence's newest token, and takes the newest token's
row's argmax as the first guess; k - 1 one-row steps give the rest, their K/V written
into the slots set aside. Guesses the target keeps leave their K/V valid, so a step where
every guess held runs two rows (the last guess's and the new token's); one where none did,
one row. A sequence that is not to guess (it paused: its guesses kept failing) costs
nothing and catches up, in one run of rows, when it guesses again. A prompt chunk is
mirrored as the target computes it, so the draft's prefill comes chunk by chunk too. It
never reads the prefix cache: a request's blocks found there are computed again, into
the same slots, as the same values.

A guess is the draft's argmax: a one-hot draft distribution, for which the verification
(sample/speculative.py) is exact rejection sampling, whatever the request's sampling.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

import torch

from tokenmill.backends.base import Backend
from tokenmill.layers.attention import ScheduledChunk, StepLayout
from tokenmill.layers.ops import ForwardContext, KVCache
from tokenmill.model.interface import CausalLM
from tokenmill.worker.inputs import ScheduledSequence
from tokenmill.worker.model_runner import long_tensor


@dataclass(slots=True)
class _Draft:
    """What the draft's cache holds of one request."""

    num_preemptions: int  # the request's, when this was recorded
    valid: int = 0  # positions [0, valid) hold its tokens' K/V
    # the K/V of guesses written at positions [guessed_at, guessed_at + len(written)) by
    # the one-row steps: valid as far as the request's tokens turn out to be these
    guessed_at: int = 0
    written: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Guessing:
    """A sequence the draft guesses for: its newest token's row and position, and how
    many guesses it wants."""

    request_id: str
    block_table: array[int]
    row: int
    position: int
    num_guesses: int
    state: _Draft


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
        self._drafts: dict[str, _Draft] = {}

    def forget(self, request_id: str) -> None:
        self._drafts.pop(request_id, None)

    @torch.inference_mode()
    def propose(
        self, scheduled: list[ScheduledSequence], sampled: dict[str, list[int]]
    ) -> dict[str, tuple[int, list[int]]]:
        """Bring the draft's cache up to the step just run and guess the next tokens of
        the sequences that asked: request id -> (its token count the guesses follow, guesses)."""
        # a step's own rows are one-row decode chunks, as the target's guess rows are (a
        # batch of decodes runs fused); prompt chunks and catching up go after them
        decodes, chunks = _Rows(self.block_size), _Rows(self.block_size)
        guessing: list[tuple[_Guessing, bool]] = []  # and whether its row is in `chunks`
        updates: list[tuple[_Draft, int]] = []  # valid once the forward has run
        for item in scheduled:
            request = item.request
            if request.pooling_type is not None:
                continue  # embeddings never decode
            state = self._state(request.request_id, request.num_preemptions)
            start, table = item.start, item.block_table
            capacity = min(len(table) * self.block_size, self.max_positions)
            if not item.samples:  # a prompt chunk: the draft's prefill follows the target's
                end = min(start + item.num_new_tokens, capacity)
                if state.valid < end:
                    chunks.add(request.token_ids[state.valid : end], state.valid, table)
                    updates.append((state, end))
                continue
            new = sampled.get(request.request_id)
            if not new or not item.num_lookahead:
                continue  # its step failed, or it is not to guess: it may catch up later
            num_tokens = len(request.token_ids) + len(new)  # once the step is applied
            num_guesses = min(item.num_lookahead, capacity - num_tokens + 1)
            if num_guesses < 1:
                continue
            first = self._keep_guesses(state, request.token_ids, new)
            tokens = _tail(request.token_ids, new, first)
            in_step = item.is_decode and first >= start
            rows = decodes if in_step else chunks
            row = rows.add(tokens, first, table, one_row=in_step) + len(tokens) - 1
            guessing.append(
                (
                    _Guessing(request.request_id, table, row, num_tokens - 1, num_guesses, state),
                    not in_step,
                )
            )
            updates.append((state, num_tokens))
        num_decodes = len(decodes.ids)
        decodes.extend(chunks)
        if not decodes.chunks:
            return {}
        hidden = self._forward(decodes, num_decodes)
        for state, valid in updates:
            state.valid = valid
        if not guessing:
            return {}
        for g, in_chunks in guessing:
            g.row += num_decodes if in_chunks else 0
        return self._guess(hidden, [g for g, _ in guessing])

    def _state(self, request_id: str, num_preemptions: int) -> _Draft:
        state = self._drafts.get(request_id)
        if state is None or state.num_preemptions != num_preemptions:
            state = self._drafts[request_id] = _Draft(num_preemptions)
        return state

    @staticmethod
    def _keep_guesses(state: _Draft, token_ids: list[int], new: list[int]) -> int:
        """The first position whose K/V the draft runs: past its guesses' K/V where those
        turned out to be the sequence's tokens, but never past the newest token, whose row
        gives the next guess (the speculator may have offered fewer guesses than were
        written, so the token after them can be the next one written)."""
        if state.written and state.valid == state.guessed_at:
            kept = 0
            tokens = _tail(token_ids, new, state.valid)[:-1]  # (may be fewer than the guesses)
            for guess, token in zip(state.written, tokens, strict=False):
                if guess != token:
                    break
                kept += 1
            state.valid += kept
        state.written = []
        return state.valid

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
        for g, tokens in zip(guessing, guesses, strict=True):  # the one-row steps' K/V
            g.state.guessed_at, g.state.written = g.position + 1, tokens[:-1]
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


def _tail(token_ids: list[int], new: list[int], first: int) -> list[int]:
    """The sequence's tokens from position `first` on, once `new` follow `token_ids`."""
    if first >= len(token_ids):
        return new[first - len(token_ids) :]
    return token_ids[first:] + new


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
