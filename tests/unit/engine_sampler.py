"""The sampler as the engine uses it: token ids out, logprob entries written into the
requests (the engine core does that from SamplerOutput)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.engine.request import Request
from tokenmill.sample.sampler import Sampler as _Sampler


class Sampler(_Sampler):
    def __call__(self, logits: torch.Tensor, requests: Sequence[Request]) -> list[int]:  # type: ignore[override]
        out = super().__call__(logits, requests)
        if out.logprobs is not None:
            for row, entry in zip(out.logprob_rows, out.logprobs.entries(), strict=True):
                requests[row].add_logprobs(entry)
        return out.token_ids.tolist()
