"""GET /v1/models: the served names of the one loaded model."""

from __future__ import annotations

from fastapi import Request

from tokenmill.engine.client import EngineClient
from tokenmill.server.auth import v1_router
from tokenmill.server.protocol import ModelCard, ModelList

router = v1_router()


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    engine: EngineClient = request.app.state.engine
    names = request.app.state.settings.served_model_names
    cards = [
        ModelCard(id=name, root=engine.model_name, max_model_len=engine.max_model_len)
        for name in names
    ]
    return ModelList(data=cards)
