"""Embedding requests: prefill-only engine requests whose last hidden states are pooled
into one vector, served by the same engine and batched with generation.

The runner pools each chunk as it is computed (worker/model_runner.py: MEAN sums rows,
LAST and CLS keep one); EngineCore adds the parts up and ends the request when its last
prompt token is computed; a `PoolingGroup` turns the sum into the embedding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tokenmill.engine.outputs import PoolingOutput, PoolingRequestOutput
from tokenmill.engine.request import Request
from tokenmill.errors import InvalidRequestError
from tokenmill.pooling_params import PoolerConfig, PoolingParams


class PoolingGroup:
    """One embedding request: its engine request and, once done, its output."""

    def __init__(
        self, request_id: str, request: Request, params: PoolingParams, pooler: PoolerConfig
    ):
        self.request_id = request_id
        self.request = request
        self.prompt_token_ids = request.prompt_token_ids
        self.params = params
        self.pooler = pooler
        self.output: PoolingRequestOutput | None = None

    @property
    def finished(self) -> bool:
        return self.output is not None

    def engine_request_ids(self) -> list[str]:
        return [self.request.request_id]

    def abort(self) -> None:
        if self.output is None:
            self.output = PoolingRequestOutput(self.request_id, self.prompt_token_ids, None)

    def finish(self) -> PoolingRequestOutput:
        """The embedding of a request whose prompt has been computed."""
        request = self.request
        data = request.pooled
        assert isinstance(data, torch.Tensor), "the runner pooled the request's last chunk"
        if self.pooler.pooling_type == "MEAN":
            data = data / request.num_prompt_tokens
        if self.params.dimensions is not None:
            data = data[: self.params.dimensions]  # Matryoshka: the leading dimensions
        normalize = self.params.normalize
        if normalize if normalize is not None else self.pooler.normalize:
            data = F.normalize(data, p=2.0, dim=-1)
        self.output = PoolingRequestOutput(
            self.request_id,
            self.prompt_token_ids,
            PoolingOutput(data),
            num_cached_tokens=request.num_cached_tokens,
            first_scheduled_time=request.first_scheduled_time,
        )
        return self.output


def check_dimensions(params: PoolingParams, hf_config: dict[str, Any], hidden_size: int) -> None:
    """`dimensions` only for a Matryoshka model (config.json's is_matryoshka or
    matryoshka_dimensions, as vLLM reads them), and one it was trained for."""
    dimensions = params.dimensions
    if dimensions is None:
        return
    trained = hf_config.get("matryoshka_dimensions")
    if not (hf_config.get("is_matryoshka") or trained):
        raise InvalidRequestError(
            "this model does not support Matryoshka representations (its config.json has no "
            "is_matryoshka or matryoshka_dimensions): dimensions cannot be set",
            param="dimensions",
        )
    if trained and dimensions not in trained:
        raise InvalidRequestError(
            f"dimensions {dimensions} is not one the model supports: {sorted(trained)}",
            param="dimensions",
        )
    if dimensions > hidden_size:
        raise InvalidRequestError(
            f"dimensions {dimensions} exceeds the model's embedding size {hidden_size}",
            param="dimensions",
        )
