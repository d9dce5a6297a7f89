"""Random draws from processed logits: min-p, top-k, top-p, then inverse-CDF sampling.

Each row draws with one uniform number u: the token whose cumulative probability
interval holds u. A seeded request therefore consumes exactly one number of its
generator per step, whatever else is in the batch.

Top-k and top-p look only at a candidate set from `topk`, never sorting the whole
vocabulary (a sort costs far more than a `topk` of a few hundred; docs/benchmarks.md,
"Sampler"). Rows with top-p but no top-k take the top `_TOP_P_CANDIDATES`
tokens; a row whose candidates hold less than top_p of the mass is redone with
16 times as many, up to the whole vocabulary, so the result is always exact. On a GPU
top-p-only rows take the whole vocabulary at once: knowing which rows to redo would make
the host wait for the device.
"""

from __future__ import annotations

import torch

from tokenmill.kernels import layer_ops, sampling_ops

_TOP_P_CANDIDATES = 256  # first candidate pool of a top-p-only row
_GROWTH = 16  # how much larger the pool gets for rows it did not cover
_NEG_INF = float("-inf")


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens with p < min_p * p(max) (logits [N, V], min_p [N]); 0 keeps everything."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p)[:, None]
    return logits.masked_fill(logits < threshold, _NEG_INF)


def _native(logits: torch.Tensor) -> bool:
    """Whether the native row kernels (layer_ops.c) take these logits: CPU float32."""
    return logits.device.type == "cpu" and logits.dtype == torch.float32 and layer_ops.available()


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row of logits [N, V] (the first on a tie), as argmax.

    On CPU float32 the native kernel scans each row once in vector lanes, several times
    faster than torch's argmax (docs/benchmarks.md, "Sampler").
    """
    if _native(logits):
        return sampling_ops.argmax_rows(logits)
    return logits.argmax(dim=-1)


def draw_full(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: torch.Tensor
) -> torch.Tensor:
    """One token per row from softmax(logits [N, V] / temperature [N]), uniforms [N] in [0, 1).

    On CPU the native kernel does it in one pass per row without [N, V] temporaries
    (layer_ops.c `tm_sample_rows`); the same inverse-CDF rule either way.
    """
    if _native(logits):
        drawn = sampling_ops.sample_rows(logits, temperature, uniforms)
        if drawn is not None:
            return drawn
    return _inverse_cdf(torch.softmax(logits / temperature[:, None], dim=-1), uniforms)


def draw_truncated(
    logits: torch.Tensor,
    top_k: list[int],
    top_p: list[float],
    uniforms: torch.Tensor,
    num_candidates: int | None = None,
) -> torch.Tensor:
    """One token per row after top-k (k <= 0: off) then top-p (1.0: off), as vLLM applies them.

    Top-p keeps the smallest set of most likely tokens whose mass reaches top_p,
    measured after top-k has renormalised the distribution. `num_candidates`: the first
    pool of a top-p-only row (None: _TOP_P_CANDIDATES on a CPU; on a GPU the whole
    vocabulary, sorted at once, so no row is redone and the host never waits to know)."""
    if num_candidates is None:
        num_candidates = logits.shape[1] if logits.is_cuda else _TOP_P_CANDIDATES
    probs = torch.softmax(logits, dim=-1)
    return _draw_from_candidates(probs, top_k, top_p, uniforms, num_candidates)


def _draw_from_candidates(
    probs: torch.Tensor,
    top_k: list[int],
    top_p: list[float],
    uniforms: torch.Tensor,
    num_candidates: int = _TOP_P_CANDIDATES,
) -> torch.Tensor:
    """draw_truncated over probs [N, V], looking at the top num_candidates of top-p-only rows."""
    vocab, device = probs.shape[1], probs.device
    has_k = [k > 0 for k in top_k]
    size = min(max(k if k > 0 else num_candidates for k in top_k), vocab)
    kth = torch.tensor([min(k, vocab) if k > 0 else vocab for k in top_k], device=device)
    p = torch.tensor(top_p, device=device)[:, None]
    values, ids = probs.topk(size, dim=-1)  # [N, K], descending
    values = values.masked_fill(torch.arange(size, device=device)[None, :] >= kth[:, None], 0.0)
    if any(has_k):  # top-k renormalises; without it, mass is over the whole vocabulary
        with_k = torch.tensor(has_k, device=device)[:, None]
        values = torch.where(with_k, values / values.sum(dim=-1, keepdim=True), values)
    mass_before = values.cumsum(dim=-1) - values
    values = values.masked_fill((mass_before >= p) & (p < 1.0), 0.0)
    tokens = ids.gather(1, _inverse_cdf(values, uniforms)[:, None]).squeeze(1)
    if size == vocab or all(has_k):
        return tokens
    # A row is exact once its candidates (all but the last, to be safe) hold top_p.
    short = ((mass_before[:, -1:] < p) & (p < 1.0)).squeeze(1).tolist()
    rows = [i for i, is_short in enumerate(short) if is_short and not has_k[i]]
    if not rows:
        return tokens
    index = torch.tensor(rows, device=device)
    redone = _draw_from_candidates(
        probs.index_select(0, index),
        [top_k[i] for i in rows],
        [top_p[i] for i in rows],
        uniforms.index_select(0, index),
        num_candidates=size * _GROWTH,
    )
    return tokens.index_copy(0, index, redone)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index per row drawn in proportion to weights [N, K] (need not sum to 1)."""
    cdf = weights.cumsum(dim=-1)
    target = uniforms[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, target, right=True)
    return index.clamp_(max=weights.shape[1] - 1).squeeze(1)
