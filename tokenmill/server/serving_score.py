"""vLLM's score and rerank APIs over the served model's embeddings: each text embedded once
(as /v1/embeddings would embed it, on the same engine), a pair's score the cosine similarity
of its two embeddings, as vLLM scores with an embedding model. Cross-encoder models (a
classifier head over the pair) are not served."""

from __future__ import annotations

import logging
from typing import Any

from starlette.responses import JSONResponse, Response

from tokenmill.engine.scoring import check_pairing, pair_scores
from tokenmill.errors import InvalidRequestError
from tokenmill.pooling_params import PoolingParams
from tokenmill.server.limits import check_text_limits
from tokenmill.server.protocol import UsageInfo
from tokenmill.server.protocol_score import (
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    RerankUsage,
    ScoreData,
    ScoreExtras,
    ScoreRequest,
    ScoreResponse,
    text_list,
)
from tokenmill.server.serving_base import ServingBase, request_ids
from tokenmill.server.serving_embedding import EmbeddingServer

logger = logging.getLogger(__name__)

_CROSS_ENCODER_ONLY = ("use_activation", "activation", "softmax")


class ScoreServer(ServingBase):
    """Serves /score (/v1/score) and /rerank (/v1/rerank, /v2/rerank)."""

    def __init__(self, *args: Any, embedding: EmbeddingServer, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.embedding = embedding  # embeds the texts (and counts them in /metrics)

    async def score(self, request: ScoreRequest, header_id: str | None = None) -> Response:
        """The first side against the second: 1:1, 1:N or N:N, a score per pair in the
        second side's order."""
        (first_name, firsts), (second_name, seconds) = request.sides()
        check_pairing(len(firsts), len(seconds), first_name)
        model = self.check_model(request.model)
        request_id, engine_id = request_ids("score", header_id or request.request_id)
        scores, num_tokens = await self._cosines(
            request, (first_name, firsts), (second_name, seconds), engine_id
        )
        data = [ScoreData(index=i, score=s) for i, s in enumerate(scores)]
        usage = UsageInfo(prompt_tokens=num_tokens, total_tokens=num_tokens)
        body = ScoreResponse(id=request_id, model=model, data=data, usage=usage)
        return JSONResponse(body.model_dump(mode="json"))

    async def rerank(self, request: RerankRequest, header_id: str | None = None) -> Response:
        """The documents by relevance to the query, most relevant first; top_n of them."""
        model = self.check_model(request.model)
        request_id, engine_id = request_ids("rerank", header_id or request.request_id)
        documents = text_list(request.documents)
        scores, num_tokens = await self._cosines(
            request, ("query", [request.query]), ("documents", documents), engine_id
        )
        ranked = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
        if request.top_n:
            ranked = ranked[: request.top_n]
        results = [
            RerankResult(
                index=i,
                document=RerankDocument(text=documents[i]),
                relevance_score=scores[i],
            )  # fmt: skip
            for i in ranked
        ]
        body = RerankResponse(
            id=request_id, model=model, results=results,
            usage=RerankUsage(prompt_tokens=num_tokens, total_tokens=num_tokens),
        )  # fmt: skip
        return JSONResponse(body.model_dump(mode="json"))

    async def _cosines(
        self,
        request: ScoreExtras,
        first: tuple[str, list[str]],
        second: tuple[str, list[str]],
        engine_id: str,
    ) -> tuple[list[float], int]:
        """Each text embedded once; the cosine of each pair (a single first against every
        second); and the tokens embedded. The sides are (field name, texts)."""
        (first_param, firsts), (second_param, seconds) = first, second
        _check_extras(request)
        check_text_limits(firsts + seconds, second_param, self.settings.limits)
        self.check_alive()
        params = PoolingParams(truncate_prompt_tokens=request.truncate_prompt_tokens)
        tokenizer = self.engine.tokenizer
        texts = firsts + seconds
        ids = await self.run_blocking(lambda: [tokenizer.encode(t) for t in texts])
        params_of = [first_param] * len(firsts) + [second_param] * len(seconds)
        prompts = [
            self.input_processor.validate_pooling(p, params, param)
            for p, param in zip(ids, params_of, strict=True)
        ]
        self.check_admission()
        if not self.settings.disable_log_requests:
            logger.info(
                "request %s: %d text(s) to embed and score, prompt tokens %s",
                engine_id, len(prompts), [len(p) for p in prompts],
            )  # fmt: skip
        outputs = await self.embedding.encode_all(prompts, params, engine_id, None)
        scored = pair_scores(outputs[: len(firsts)], outputs[len(firsts) :], [])
        return [s.outputs.score for s in scored], sum(len(o.prompt_token_ids) for o in outputs)


def _check_extras(request: ScoreExtras) -> None:
    """vLLM's fields that mean nothing for cosine scores: 400s naming them, unless unset."""
    for name in _CROSS_ENCODER_ONLY:
        if getattr(request, name) is not None:
            raise InvalidRequestError(
                f"{name} applies to cross-encoder models; tokenmill scores with the cosine "
                "similarity of embeddings, which has no activation", param=name,
            )  # fmt: skip
    if request.mm_processor_kwargs is not None:
        raise InvalidRequestError(
            "mm_processor_kwargs: scores are of texts only", param="mm_processor_kwargs"
        )
    if request.priority != 0:
        raise InvalidRequestError(
            "priority is not supported on score and rerank requests (embeddings run in "
            "arrival order)", param="priority",
        )  # fmt: skip
