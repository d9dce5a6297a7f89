"""GET /v1/models and /v1/models/{id}: the served names of the one loaded model."""

from __future__ import annotations

from fastapi import Request

from tokenmill.engine.client import EngineClient
from tokenmill.errors import NotFoundError
from tokenmill.server.auth import v1_router
from tokenmill.server.protocol import ModelCard, ModelList

router = v1_router()


def _card(request: Request, name: str) -> ModelCard:
    engine: EngineClient = request.app.state.engine
    return ModelCard(id=name, root=engine.model_name, max_model_len=engine.max_model_len)


@router.get("/models")
async def list_models(request: Request) -> ModelList:
    names = request.app.state.settings.served_model_names
    return ModelList(data=[_card(request, name) for name in names])


# `:path`: a served name may hold slashes (an HF repo id, a .gguf file's path), sent raw or
# percent-encoded (the openai client encodes them; the ASGI path arrives decoded)
@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    """OpenAI's Model object for one served name or alias; a 404 for any other id."""
    if model_id not in request.app.state.settings.served_model_names:
        raise NotFoundError(f"The model `{model_id}` does not exist.", param="model")
    return _card(request, model_id)
