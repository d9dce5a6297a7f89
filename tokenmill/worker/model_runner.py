"""ModelRunner: flattens a step's scheduled sequences into one batch, runs the model
through its backend, and samples.

Under tensor parallelism the leader's runner (rank 0) prepares and samples; before each
forward and each logits computation it broadcasts what the other ranks need to run the
same collectives (the flat step, the rows whose logits it gathers), and their runners
`follow()` it. Under pipeline parallelism it broadcasts the step, runs the first stage's
layers and sends their output down the stages; the last one's comes back to it, and it
computes the logits (every stage holds the final norm and head; the leader uses them)."""

from __future__ import annotations

import contextlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from tokenmill.backends.base import Backend
from tokenmill.distributed.group import SINGLE, ParallelGroup, PeerError
from tokenmill.layers.attention import ScheduledChunk, StepLayout
from tokenmill.layers.ops import ForwardContext, KVCache
from tokenmill.model.interface import CausalLM
from tokenmill.model.vision import VisionLanguageModel
from tokenmill.multimodal.inputs import ImageInput
from tokenmill.multimodal.mrope import mrope_positions
from tokenmill.sample.logprobs import PromptChunk, prompt_logprobs
from tokenmill.sample.sampler import Sampler
from tokenmill.sample.speculative import verify
from tokenmill.worker.encoder_cache import EncoderCache
from tokenmill.worker.inputs import ModelOutput, ScheduledSequence, SequenceState


@dataclass(slots=True)
class ImageRows:
    """The part of an image a prefill chunk holds: which of its encoder rows go to which
    rows of the batch."""

    image: ImageInput
    selected: torch.Tensor  # [num_embeds] bool: its rows whose positions are in the chunk
    batch_rows: torch.Tensor  # [selected.sum()] long: where they go in the batch


@dataclass(slots=True)
class Batch:
    """The flattened step: [decode rows | prefill chunks]."""

    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T], or [3, T] for a model with multimodal rotary positions
    ctx: ForwardContext
    layout: StepLayout
    sample_rows: torch.Tensor  # [N] rows whose hidden state is turned into logits
    sampling: list[SequenceState]  # the sequences that sample, in sample_rows order
    # their guessed tokens (speculative decoding): a sequence with k has 1 + k sample rows
    drafts: list[list[int]]
    prompt_chunks: list[PromptChunk]  # chunks of sequences that want prompt logprobs
    pool_chunks: list[ScheduledChunk]  # chunks of embedding requests (parallel to pooling)
    pooling: list[SequenceState]
    images: list[ImageRows]  # image tokens of the prefill chunks, from the vision encoder


class ModelRunner:
    """Runs a step's ScheduledSequences through the model; returns what it sampled."""

    def __init__(
        self,
        model: CausalLM,
        backend: Backend,
        kv_caches: list[KVCache],
        sampler: Sampler,
        block_size: int,
        device: torch.device,
        group: ParallelGroup = SINGLE,
        pipeline: bool = False,
    ):
        self.model, self.backend, self.kv_caches = model, backend, kv_caches
        # the ranks that hold the model (this runner leads or follows): shards of every
        # layer (tensor parallel), or with `pipeline` runs of layers, the leader's first
        self.group, self.pipeline = group, pipeline
        self.sampler, self.block_size, self.device = sampler, block_size, device
        # multimodal rotary positions ([3, T]; Qwen2.5-VL): each request's prompt positions and
        # delta, made once (multimodal/mrope.py) and dropped when the request ends
        self.uses_mrope = bool(getattr(model, "uses_mrope", False))
        self._mrope: dict[str, tuple[torch.Tensor, int]] = {}
        self.encoder_cache = (
            EncoderCache(model) if isinstance(model, VisionLanguageModel) else None
        )  # the vision encoder's rows by image hash

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> ModelOutput:
        """Forward every scheduled token; sample for the sequences that reached their end."""
        batch = self.prepare(scheduled)
        hidden = self.forward(batch)
        output = ModelOutput()
        if batch.prompt_chunks:
            output.prompt_logprobs = prompt_logprobs(
                lambda rows: self._logits(hidden, rows),
                batch.prompt_chunks,
                self.sampler.vocab_size,
                self.device,
            )
        if batch.pool_chunks:
            output.pooled = self.pool(hidden, batch)
        if not batch.sampling:
            return output
        logits = self._logits(hidden, batch.sample_rows)
        ids = batch.sampling
        if any(batch.drafts):
            verified = verify(self.sampler, logits, ids, batch.drafts)
            for request, tokens, entries in zip(
                ids, verified.token_ids, verified.logprobs, strict=True
            ):
                output.sampled_token_ids[request.request_id] = tokens
                if entries:
                    output.logprobs[request.request_id] = entries
            return output
        sampled = self.sampler(logits, ids)
        output.sampled_token_ids = {
            r.request_id: [t] for r, t in zip(ids, sampled.token_ids.tolist(), strict=True)
        }
        if sampled.logprobs is not None:
            entries = sampled.logprobs.entries()
            for row, entry in zip(sampled.logprob_rows, entries, strict=True):
                output.logprobs[ids[row].request_id] = [entry]
        return output

    @torch.inference_mode()
    def logits_for(self, scheduled: list[ScheduledSequence]) -> torch.Tensor:
        """The float32 logits [N, V] the sampler would see (for parity tests)."""
        batch = self.prepare(scheduled)
        return self._logits(self.forward(batch), batch.sample_rows)

    def _logits(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The float32 logits [N, V] of `rows` of the step's hidden states."""
        if self.group.size == 1 or self.pipeline:  # (the leader holds the norm and head)
            return self.model.compute_logits(hidden.index_select(0, rows))
        self.group.broadcast_object(("logits", rows.cpu()))
        with _in_step(self.group):
            return self.model.compute_logits(hidden.index_select(0, rows))

    def follow(self) -> None:
        """A follower rank: run the leader's steps on this rank's part until it stops. A
        pipeline stage takes the previous stage's hidden states and sends its own to the
        next (the last stage's back to the leader)."""
        hidden: torch.Tensor | None = None
        group = self.group
        with torch.inference_mode():
            while True:
                command, payload = group.broadcast_object(wait_forever=True)
                if command == "step":
                    input_ids, positions, layout = _from_step_message(payload)
                    embeds = None
                    if self.pipeline:
                        embeds = self._hidden_buffer(len(input_ids))
                        group.recv(embeds, group.rank - 1)
                    hidden = self.backend.forward(
                        self.model, input_ids.to(self.device), positions.to(self.device),
                        self._context(layout), embeds,
                    )  # fmt: skip
                    if self.pipeline:
                        group.send(hidden.contiguous(), (group.rank + 1) % group.size)
                elif command == "logits" and hidden is not None:
                    self.model.compute_logits(hidden.index_select(0, payload.to(self.device)))
                elif command == "stop":
                    return

    def pool(self, hidden: torch.Tensor, batch: Batch) -> dict[str, tuple[int, torch.Tensor]]:
        """Each embedding chunk's part of its request's pooled vector (ModelOutput.pooled)."""
        pooled = {}
        for chunk, request in zip(batch.pool_chunks, batch.pooling, strict=True):
            start, n, row = chunk.start, chunk.num_tokens, chunk.row
            kind = request.pooling_type
            if kind == "MEAN":
                rows = slice(row, row + n)
            elif kind == "CLS" and start == 0:
                rows = slice(row, row + 1)
            elif kind == "LAST" and start + n == len(request.token_ids):
                rows = slice(row + n - 1, row + n)
            else:
                continue
            states = self.model.final_hidden(hidden[rows]).float()
            pooled[request.request_id] = (start, states.sum(dim=0))
        return pooled

    def forget(self, request_id: str) -> None:
        """Drop what the runner keeps for a request that ended."""
        self.sampler.forget(request_id)
        self._mrope.pop(request_id, None)

    def _rope_positions(self, request: SequenceState, start: int, n: int) -> torch.Tensor:
        """The multimodal rotary positions [3, n] of a request's tokens [start, start + n)."""
        if not request.images:
            return torch.arange(start, start + n).expand(3, n)
        made = self._mrope.get(request.request_id)
        if made is None:
            made = self._mrope[request.request_id] = mrope_positions(
                len(request.prompt_token_ids), request.images
            )
        prompt, delta = made
        end = min(start + n, prompt.shape[1])
        rows = prompt[:, start:end]
        if end < start + n:  # generated tokens: one step each, past the prompt's largest
            rows = torch.cat(
                [rows, torch.arange(max(start, end), start + n).expand(3, -1) + delta], 1
            )
        return rows

    def forward(self, batch: Batch) -> torch.Tensor:
        """The hidden states [T, C] of every row of the batch, through the backend."""
        embeds = self.input_embeddings(batch) if batch.images else None
        if self.group.size == 1:
            return self.backend.forward(
                self.model, batch.input_ids, batch.positions, batch.ctx, embeds
            )
        group = self.group
        group.broadcast_object(("step", _step_message(batch)))
        with _in_step(group):
            hidden = self.backend.forward(
                self.model, batch.input_ids, batch.positions, batch.ctx, embeds
            )
            if not self.pipeline:
                return hidden
            group.send(hidden.contiguous(), 1)  # the first stage's; the last's comes back
            final = self._hidden_buffer(len(batch.input_ids))
            group.recv(final, group.size - 1)
            return final

    def _hidden_buffer(self, num_tokens: int) -> torch.Tensor:
        """Where a pipeline stage receives [T, C] hidden states."""
        cfg = self.model.config
        dtype = next(self.model.get_submodule("model.norm").parameters()).dtype
        return torch.empty(num_tokens, cfg.hidden_size, dtype=dtype, device=self.device)

    def input_embeddings(self, batch: Batch) -> torch.Tensor:
        """The token embeddings [T, C] with the image tokens' rows from the vision encoder."""
        assert self.encoder_cache is not None, "images reached a model without a vision encoder"
        encoded = self.encoder_cache.rows([part.image for part in batch.images])
        embeds = self.model.embed_input_ids(batch.input_ids)
        for part in batch.images:
            rows = encoded[part.image.hash][part.selected.to(self.device)]
            embeds[part.batch_rows.to(self.device)] = rows.to(embeds.dtype)
        return embeds

    def _context(self, layout: StepLayout) -> ForwardContext:
        """What every layer of the step's forward shares, on this rank's KV caches."""
        if layout.positions.device != self.device:
            layout = replace(layout, positions=layout.positions.to(self.device),
                             slot_mapping=layout.slot_mapping.to(self.device))  # fmt: skip
        attention = self.backend.attention
        return ForwardContext(
            self.backend.ops, attention, attention.build_metadata(layout), self.kv_caches
        )

    def prepare(self, scheduled: list[ScheduledSequence]) -> Batch:
        if scheduled and not self.uses_mrope and all(map(_is_plain_decode, scheduled)):
            return self._prepare_plain_decodes(scheduled)
        decodes = [s for s in scheduled if s.is_decode]
        items = scheduled if len(decodes) == len(scheduled) else decodes + [
            s for s in scheduled if not s.is_decode
        ]  # fmt: skip
        # int64 arrays, copied into tensors as bytes (a tensor from a list of ints costs
        # ~4x more: at batch 256 that is most of preparing a decode step)
        ids, positions, slots = array("q"), array("q"), array("q")  # slots: of the K/V
        chunks: list[ScheduledChunk] = []
        sample_rows = array("q")
        sampling: list[SequenceState] = []
        drafts: list[list[int]] = []
        prompt_chunks: list[PromptChunk] = []
        pool_chunks: list[ScheduledChunk] = []
        pooling: list[SequenceState] = []
        images: list[ImageRows] = []
        rope_rows: list[torch.Tensor] = []  # [3, n] per item, with multimodal rotary
        bs = self.block_size
        for item in items:
            request, start, n, table = (
                item.request,
                item.start,
                item.num_new_tokens,
                item.block_table,
            )
            row = len(ids)
            if n == 1:  # (most rows: a decode)
                ids.append(request.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                if not (
                    request.images
                    or request.pooling_type
                    or item.draft_token_ids
                    or self.uses_mrope
                    or request.params.prompt_logprobs is not None
                ):  # (most rows: a plain decode, the only row of its sequence)
                    chunks.append(ScheduledChunk(row, start, 1, table))
                    if item.samples:
                        sample_rows.append(row)
                        sampling.append(request)
                        drafts.append([])
                    continue
            else:
                ids.extend(request.token_ids[start : start + n])
                ids.extend(item.draft_token_ids)
                positions.extend(range(start, start + n))
                slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            if self.uses_mrope:
                rope_rows.append(self._rope_positions(request, start, n))
            if item.draft_token_ids:  # a decode row per token, each computed as a plain decode
                chunks.extend(ScheduledChunk(row + i, start + i, 1, table) for i in range(n))
                sample_rows.extend(range(row, row + n))
                sampling.append(request)
                drafts.append(item.draft_token_ids)
                continue
            chunks.append(ScheduledChunk(row, start, n, table))
            if request.images:  # (a one-token chunk may be an image's last token too)
                images.extend(_image_rows(request.images, row, start, n))
            if request.pooling_type is not None:  # an embedding: pooled, never sampled
                pool_chunks.append(chunks[-1])
                pooling.append(request)
                continue
            if request.params.prompt_logprobs is not None:
                prompt_chunks.append(_prompt_chunk(request, row, start, n))
            if item.samples:
                sample_rows.append(row + n - 1)
                sampling.append(request)
                drafts.append([])
        device = self.device
        position_ids = long_tensor(positions, device)
        layout = StepLayout(
            chunks=chunks,
            num_decodes=len(decodes) + sum(len(s.draft_token_ids) for s in decodes),
            positions=position_ids,
            slot_mapping=long_tensor(slots, device),
            block_size=bs,
        )
        return Batch(
            input_ids=long_tensor(ids, device),
            positions=torch.cat(rope_rows, dim=1).to(device) if rope_rows else position_ids,
            ctx=self._context(layout),
            layout=layout,
            sample_rows=long_tensor(sample_rows, device),
            sampling=sampling,
            drafts=drafts,
            prompt_chunks=prompt_chunks,
            pool_chunks=pool_chunks,
            pooling=pooling,
            images=images,
        )

    def _prepare_plain_decodes(self, scheduled: list[ScheduledSequence]) -> Batch:
        """`prepare` for a step of plain decodes only (a big batch's usual step): each a
        row of its own that samples, built column by column (a comprehension per column
        costs less than one loop body that appends to each)."""
        bs, device = self.block_size, self.device
        starts = [s.start for s in scheduled]
        tables = [s.block_table for s in scheduled]
        sampling = [s.request for s in scheduled]
        ids = array("q", [r.token_ids[p] for r, p in zip(sampling, starts, strict=True)])
        slots = array("q", [t[p // bs] * bs + p % bs for t, p in zip(tables, starts, strict=True)])
        rows = range(len(scheduled))
        position_ids = long_tensor(array("q", starts), device)
        layout = StepLayout(
            chunks=list(map(ScheduledChunk, rows, starts, [1] * len(rows), tables)),
            num_decodes=len(rows),
            positions=position_ids,
            slot_mapping=long_tensor(slots, device),
            block_size=bs,
        )
        return Batch(
            input_ids=long_tensor(ids, device),
            positions=position_ids,
            ctx=self._context(layout),
            layout=layout,
            sample_rows=long_tensor(array("q", rows), device),
            sampling=sampling,
            drafts=[[]] * len(rows),  # (no guesses: one empty list, read only)
            prompt_chunks=[],
            pool_chunks=[],
            pooling=[],
            images=[],
        )


def _is_plain_decode(item: ScheduledSequence) -> bool:
    """One row that samples, and nothing else to do for it (images, pooling, guesses,
    prompt logprobs)."""
    request = item.request
    return (
        item.num_new_tokens == 1
        and item.samples
        and item.start > 0
        and not item.draft_token_ids
        and not request.images
        and request.pooling_type is None
        and request.params.prompt_logprobs is None
    )


def long_tensor(values: array[int], device: torch.device) -> torch.Tensor:
    """An int64 array as a tensor on `device` (sharing the array's memory on the CPU)."""
    if not values:
        return torch.empty(0, dtype=torch.long, device=device)
    return torch.frombuffer(values, dtype=torch.long).to(device)


@contextlib.contextmanager
def _in_step(group: ParallelGroup) -> Iterator[None]:
    """A failure on the leader between collectives leaves the other ranks waiting in one:
    the group cannot run another step, so it is a PeerError (fatal to the engine), not a
    request's error to retry."""
    try:
        yield
    except PeerError:
        raise
    except Exception as e:
        raise PeerError(f"tensor-parallel rank 0 failed mid-step: {type(e).__name__}: {e}") from e


def _step_message(batch: Batch) -> tuple[Any, ...]:
    """What the other ranks need of a step, as numpy arrays: pickling a torch tensor costs
    ~0.5 ms each way, an array ~20 us (docs/benchmarks.md, "Tensor and data parallel")."""
    layout = batch.layout
    return (
        batch.input_ids.cpu().numpy(), batch.positions.cpu().numpy(), layout.chunks,
        layout.num_decodes, layout.positions.cpu().numpy(), layout.slot_mapping.cpu().numpy(),
        layout.block_size,
    )  # fmt: skip


def _from_step_message(message: tuple[Any, ...]) -> tuple[torch.Tensor, torch.Tensor, StepLayout]:
    ids, positions, chunks, num_decodes, layout_positions, slots, block_size = message
    layout = StepLayout(chunks, num_decodes, torch.from_numpy(layout_positions),
                        torch.from_numpy(slots), block_size)  # fmt: skip
    return torch.from_numpy(ids), torch.from_numpy(positions), layout


def _image_rows(images: tuple[ImageInput, ...], row: int, start: int, n: int) -> list[ImageRows]:
    """The image tokens of a chunk (positions [start, start + n) at batch row `row`)."""
    parts = []
    for image in images:
        if image.overlaps(start, start + n):
            selected = (image.positions >= start) & (image.positions < start + n)
            if bool(selected.any()):
                parts.append(ImageRows(image, selected, image.positions[selected] - start + row))
    return parts


def _prompt_chunk(request: SequenceState, row: int, start: int, n: int) -> PromptChunk:
    positions = request.prompt_logprob_positions(start, n)
    targets = [request.prompt_token_ids[p + 1] for p in positions]
    return PromptChunk(
        request.request_id, row, start, positions, targets, request.params.prompt_logprobs or 0
    )
