"""POST /infill: llama.cpp's fill-in-the-middle endpoint for editor plugins, on the same FIM
path as `suffix` on /v1/completions, answered in llama.cpp's shapes."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from tokenmill.engine.input_processor import EngineInput
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.server.auth import check_api_key
from tokenmill.server.errors import error_body
from tokenmill.server.protocol import INFILL_NEUTRAL_FIELDS, CompletionRequest, InfillRequest
from tokenmill.server.routers.completions import completion_server
from tokenmill.server.serving_completion import CompletionServer, FimExtras
from tokenmill.server.streams import aclose, until_disconnect

logger = logging.getLogger(__name__)

router = APIRouter()

# Completions field -> the /infill field it came from (for the `param` of a 400)
_PARAM_NAMES = {
    "prompt": "input_prefix",
    "suffix": "input_suffix",
    "max_tokens": "n_predict",
    "repetition_penalty": "repeat_penalty",
}


@router.post("/infill", dependencies=[Depends(check_api_key)])
async def infill(
    body: InfillRequest,
    request: Request,
    server: Annotated[CompletionServer, Depends(completion_server)],
) -> Response:
    return await until_disconnect(request, create_infill(server, body))


async def create_infill(server: CompletionServer, body: InfillRequest) -> Response:
    check_infill_fields(body)
    model = server.check_model(body.model)
    server.check_alive()
    extras = FimExtras(
        files=[(chunk.filename, chunk.text) for chunk in body.input_extra],
        middle=body.prompt,
        order="spm" if body.spm_infill else "psm",
        suffix_param="input_suffix",
    )
    try:
        inputs, _ = await server.to_engine_inputs(to_completion_request(body), extras)
    except InvalidRequestError as exc:
        param = _PARAM_NAMES.get(exc.param or "", exc.param)
        raise InvalidRequestError(exc.message, param=param) from exc
    server.check_admission()
    request_id = f"infill-{uuid.uuid4().hex}"
    server.log_request(request_id, inputs)
    if body.stream:
        return InfillEventStream(_stream(server, body, model, request_id, inputs))
    final: RequestOutput | None = None
    async with aclosing(server.generate(inputs, request_id)) as outputs:
        async for _, output in outputs:
            final = output
    assert final is not None and final.outputs
    prompt = await _prompt_text(server, body, final)
    result = _final_result(server, body, model, final, final.outputs[0], prompt)
    return JSONResponse(_select_fields(result, body.response_fields))


def check_infill_fields(body: InfillRequest) -> None:
    """400 naming every field tokenmill does not implement (llama.cpp options with a value
    other than the one that turns them off, and fields llama.cpp does not have either)."""
    bad = [
        name
        for name, value in (body.model_extra or {}).items()
        if name not in INFILL_NEUTRAL_FIELDS or value != INFILL_NEUTRAL_FIELDS[name]
    ]
    if bad:
        neutral = [n for n in bad if n in INFILL_NEUTRAL_FIELDS]
        hint = "; accepted only as " + ", ".join(
            f"{n}={INFILL_NEUTRAL_FIELDS[n]!r}" for n in neutral
        )
        raise InvalidRequestError(
            f"/infill does not support the field(s) {', '.join(sorted(bad))}"
            + (hint if neutral else ""),
            param=sorted(bad)[0],
        )


def to_completion_request(body: InfillRequest) -> CompletionRequest:
    """The /infill body as a Completions request with a suffix (llama.cpp's conventions:
    temperature <= 0 is greedy, top_k <= 0 and n_predict < 0 are off, seed -1 is random)."""
    fields: dict[str, Any] = {
        "model": body.model,
        "prompt": body.input_prefix,
        "suffix": body.input_suffix,
        "max_tokens": None if body.n_predict < 0 else body.n_predict,
        "temperature": max(body.temperature, 0.0),
        "top_k": body.top_k if body.top_k > 0 else -1,
        "top_p": body.top_p,
        "min_p": body.min_p,
        "seed": None if body.seed == -1 else body.seed,
        "stop": body.stop,
        "stream": body.stream,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "repetition_penalty": body.repeat_penalty,
        "ignore_eos": body.ignore_eos,
    }
    if not body.cache_prompt:  # a salt of its own: no cached prefix is shared with it
        fields["cache_salt"] = f"no-cache-{uuid.uuid4().hex}"
    try:
        return CompletionRequest.model_validate(fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = str(error["loc"][0]) if error.get("loc") else None
        param = _PARAM_NAMES.get(name or "", name)
        raise InvalidRequestError(f"{param}: {error['msg']}", param=param) from None


def _stop_type(seq: CompletionOutput) -> str:
    if seq.finish_reason == "length":
        return "limit"
    if seq.finish_reason == "stop":
        return "word" if isinstance(seq.stop_reason, str) else "eos"
    return "none"


async def _prompt_text(server: CompletionServer, body: InfillRequest, output: RequestOutput) -> str:
    """The whole FIM prompt as text, decoded in the tokenizer thread, when the response has it."""
    fields = body.response_fields
    if fields is not None and not any(f.split("/")[0] == "prompt" for f in fields):
        return ""
    return await server.run_blocking(server.engine.tokenizer.decode, list(output.prompt_token_ids))


def _final_result(
    server: CompletionServer,
    body: InfillRequest,
    model: str,
    output: RequestOutput,
    seq: CompletionOutput,
    prompt: str,
    content: str | None = None,
) -> dict[str, Any]:
    """llama.cpp's response object (and its stream's last event)."""
    prompt_ids = list(output.prompt_token_ids)
    text = seq.text if content is None else content
    return {
        "index": 0,
        "content": text,
        "tokens": list(seq.token_ids) if body.return_tokens else [],
        "id_slot": -1,
        "stop": True,
        "model": model,
        "tokens_predicted": len(seq.token_ids),
        "tokens_evaluated": len(prompt_ids),
        "generation_settings": {
            "n_predict": body.n_predict,
            "temperature": body.temperature,
            "top_k": body.top_k,
            "top_p": body.top_p,
            "min_p": body.min_p,
            "seed": body.seed,
            "stop": body.stop,
            "stream": body.stream,
            "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty,
            "repeat_penalty": body.repeat_penalty,
            "ignore_eos": body.ignore_eos,
            "n_ctx": server.engine.max_model_len,
            "model": model,
        },
        "prompt": prompt,
        "has_new_line": "\n" in seq.text,
        "truncated": False,
        "stop_type": _stop_type(seq),
        "stopping_word": seq.stop_reason if isinstance(seq.stop_reason, str) else "",
        "tokens_cached": output.num_cached_tokens,
    }


def _select_fields(result: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    """llama.cpp's response_fields: only these; `a/b` is result[a][b] named b; missing ones
    are left out."""
    if fields is None:
        return result
    selected: dict[str, Any] = {}
    for path in fields:
        value: Any = result
        for part in path.split("/"):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            selected[path.split("/")[-1]] = value
    return selected


async def _stream(
    server: CompletionServer,
    body: InfillRequest,
    model: str,
    request_id: str,
    inputs: list[EngineInput],
) -> AsyncIterator[str]:
    """One event per engine step with new text ({content, tokens, stop: false}), then the
    whole result with stop: true and empty content, as llama.cpp streams (no [DONE])."""
    tracker = server.tracker(inputs)
    prompt_len = len(inputs[0].prompt_token_ids)
    final: RequestOutput | None = None
    async with aclosing(server.generate(inputs, request_id)) as outputs:
        async for i, output in outputs:
            final = output
            for delta in tracker.update(i, output):
                if delta.text:
                    yield _event(
                        {
                            "index": 0,
                            "content": delta.text,
                            "tokens": delta.new_token_ids,
                            "stop": False,
                            "id_slot": -1,
                            "tokens_predicted": len(delta.output.token_ids),
                            "tokens_evaluated": prompt_len,
                        }
                    )
    assert final is not None and final.outputs
    prompt = await _prompt_text(server, body, final)
    result = _final_result(server, body, model, final, final.outputs[0], prompt, content="")
    yield _event(_select_fields(result, body.response_fields))


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _with_errors(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Relay the events; an error after the stream has started becomes an error event."""
    try:
        async for event in events:
            yield event
    except TokenmillError as exc:
        yield f"data: {error_body(exc).model_dump_json()}\n\n"
    except Exception as exc:
        logger.exception("error while streaming an infill response")
        yield f"data: {error_body(exc).model_dump_json()}\n\n"
    finally:
        await aclose(events)


class InfillEventStream(StreamingResponse):
    """text/event-stream without OpenAI's [DONE]; the body is closed however it ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(
            _with_errors(events), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await aclose(self.body_iterator)
