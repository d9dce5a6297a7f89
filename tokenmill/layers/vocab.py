"""The embedding and output projection split by vocabulary across tensor-parallel ranks
(Megatron's vocab-parallel layers): rank r holds rows [r * n, (r + 1) * n) of the [V, C]
table, V padded up to a multiple of the ranks with zero rows. With one rank these are
plain nn.Embedding / nn.Linear, so nothing changes for a model run whole."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed import group as parallel
from tokenmill.distributed.group import ParallelGroup
from tokenmill.kernels import gguf_rows
from tokenmill.layers.linear import _copy


def vocab_embedding(vocab_size: int, hidden_size: int) -> nn.Embedding:
    """The token embedding for the group the model is built for."""
    tp = parallel.current()
    if tp.size == 1:
        return nn.Embedding(vocab_size, hidden_size)
    return VocabParallelEmbedding(vocab_size, hidden_size, tp)


def output_head(hidden_size: int, vocab_size: int) -> nn.Linear:
    """The untied output projection (lm_head) for the group the model is built for."""
    tp = parallel.current()
    if tp.size == 1:
        return nn.Linear(hidden_size, vocab_size, bias=False)
    return VocabParallelHead(hidden_size, vocab_size, tp)


def vocab_shard(vocab_size: int, tp: ParallelGroup) -> tuple[int, int]:
    """(first row, rows) of the padded vocabulary a rank holds."""
    rows = -(-vocab_size // tp.size)
    return tp.rank * rows, rows


def _load_rows(param: torch.Tensor, loaded: torch.Tensor, start: int) -> None:
    """Rows [start, start + len(param)) of `loaded`, zero past its end."""
    rows = max(0, min(param.shape[0], loaded.shape[0] - start))
    with torch.no_grad():
        param.zero_()
    if rows:
        _copy(param.narrow(0, 0, rows), loaded.narrow(0, start, rows), "")


class VocabParallelEmbedding(nn.Embedding):
    """This rank's rows of the embedding; a token another rank holds looks up zeros here,
    and the all-reduce of the ranks' lookups is the embedding."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: ParallelGroup):
        self.start, rows = vocab_shard(vocab_size, tp)
        super().__init__(rows, hidden_size)
        self.full_vocab_size, self.tp = vocab_size, tp

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard: int | None) -> None:
        _load_rows(param, loaded, self.start)

    def checkpoint_slices(self) -> list[tuple[int, int, int]]:
        return [(0, self.start, self.num_embeddings)]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, C]
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(rows.masked_fill(outside[:, None], 0.0))


class VocabParallelHead(nn.Linear):
    """This rank's rows of the output projection: its slice of the logits, which the model
    gathers on the leader (tokenmill.model: `gather_logits`)."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: ParallelGroup):
        self.start, rows = vocab_shard(vocab_size, tp)
        super().__init__(hidden_size, rows, bias=False)
        self.full_vocab_size = vocab_size

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard: int | None) -> None:
        _load_rows(param, loaded, self.start)

    def checkpoint_slices(self) -> list[tuple[int, int, int]]:
        return [(0, self.start, self.out_features)]


def gather_logits(logits: torch.Tensor, tp: ParallelGroup, vocab_size: int) -> torch.Tensor:
    """The full logits [N, V] on the leader from every rank's slice [N, V / ranks]; on the
    other ranks their own slice back (the leader alone samples)."""
    if tp.size == 1:
        return logits
    whole = tp.gather_last_dim(logits)
    return logits if whole is None else whole[:, :vocab_size]


class GGUFEmbedding(nn.Module):
    """The token embedding kept as a GGUF file's blocks ([V, row_bytes] uint8, any type
    gguf_rows.ROW_LAYOUT lists, or float16 / bfloat16 rows): the rows looked up are decoded
    to float32, equal to the dequantized table's; the float32 table is never made (a half
    to an eighth of its memory; ~2 GB less for an 8B model's 128K-token vocabulary)."""

    def __init__(self, ggml_type: int, blocks: torch.Tensor, embedding_dim: int):
        super().__init__()
        self.ggml_type, self.blocks = ggml_type, blocks.contiguous()
        self.num_embeddings, self.embedding_dim = blocks.shape[0], embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, C] float32
        return gguf_rows.gguf_rows(self.blocks, self.ggml_type, self.embedding_dim, input_ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, type {self.ggml_type}"
