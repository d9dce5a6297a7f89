"""A fake engine (an EngineClient: byte tokenizer, alphabet output) behind the real HTTP app,
for the server tests that need no weights; the shared fixtures are in conftest.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import torch

from tokenmill.engine.client import CacheInfo, EngineClient, EngineStats
from tokenmill.engine.outputs import (
    CompletionOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
)
from tokenmill.engine.step_stats import StepTokenCounter
from tokenmill.errors import InvalidRequestError, OverloadedError, ServiceUnavailableError
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import RequestOutputKind, SamplingParams
from tokenmill.server.app import build_app
from tokenmill.server.settings import ServerSettings
from tokenmill.structured import StructuredOutputManager, StructuredSpec
from tokenmill.tokenizer.tokenizer import Tokenizer

CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if documents %}{% for d in documents %}[doc:{{ d['title'] }}:{{ d['text'] }}]{% endfor %}"
    "{% endif %}{% if greeting is defined %}[{{ greeting }}]{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
MODEL = "fake-model"
KEY = "sk-test-123"


class ByteTokenizer:
    """A byte-level stand-in for a HF tokenizer: id = byte + 2; 0 is BOS, 1 is EOS."""

    all_special_ids = [0, 1]

    def __len__(self) -> int:
        return 258

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([0] if add_special_tokens else []) + [b + 2 for b in text.encode()]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return bytes(i - 2 for i in ids if i >= 2).decode(errors="replace")

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.decode([i]) or f"<{i}>" for i in ids]


class FakeStructuredOutputs(StructuredOutputManager):
    """The real boundary checks; "compiling" returns the spec (a byte tokenizer has no
    grammar vocabulary: real compilation is tested against the real server)."""

    async def compile_async(self, spec: StructuredSpec) -> Any:
        self.validate(spec)
        return spec


class FakeAsyncEngine:
    """An EngineClient, like AsyncEngine; sequence k writes the alphabet from letter k, one per
    step."""

    model_name = "fake/model-dir"
    max_model_len = 64
    vocab_size = 258
    scheduling_policy = "fcfs"
    reasoning_markers = None
    image_processor = None

    def __init__(self, chat_template: str | None = CHATML, delay: float = 0.0):
        self.tokenizer = Tokenizer(ByteTokenizer(), [1], chat_template, "<s>", "</s>")
        self.structured_outputs = FakeStructuredOutputs(self.tokenizer, self.vocab_size)
        self.grammars: list[Any] = []  # the compiled grammar each request was given
        self.delay = delay
        self.alive = True
        self.overloaded = False
        self.cache_salts: list[str | None] = []
        self.priorities: list[int] = []  # each request's priority, in arrival order
        self.requests: list[tuple[list[int], SamplingParams, str]] = []
        self.aborted: set[str] = set()
        self.running: set[str] = set()
        self.on_death: Callable[[], None] | None = None
        self.sampling_defaults: dict[str, Any] = {}  # the model's generation config
        self.step_tokens = StepTokenCounter()  # a "step" per output: the prompt, then n

    async def start(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    @property
    def is_alive(self) -> bool:
        return self.alive

    @property
    def died(self) -> bool:
        return not self.alive

    def cut_off(self, error: ServiceUnavailableError) -> int:
        return 0

    async def compile_grammar(self, spec: StructuredSpec) -> Any:
        return await self.structured_outputs.compile_async(spec)

    def check_capacity(self) -> None:
        if self.overloaded:
            raise OverloadedError("the server is overloaded (fake)")

    def stats_per_engine(self) -> list[EngineStats]:
        return [self.stats()]

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), 0, 0.25, 0, len(self.aborted),
                           step_tokens=self.step_tokens.snapshot())  # fmt: skip

    def cache_info(self) -> list[CacheInfo]:
        return [CacheInfo(16, 1024, "float16", True, 0.9, 1024 * 16 * 1024)]

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams,
        request_id: str,
        cache_salt: str | None = None,
        grammar: Any = None,
        priority: int = 0,
        images: tuple = (),
    ) -> AsyncIterator[RequestOutput]:
        self.requests.append((prompt_token_ids, params, request_id))
        self.cache_salts.append(cache_salt)
        self.priorities.append(priority)
        self.grammars.append(grammar)
        self.running.add(request_id)
        seqs = [CompletionOutput(index=k) for k in range(params.n)]
        sent = [CompletionOutput(index=k) for k in range(params.n)]  # (DELTA: as sent)
        try:
            assert params.max_tokens is not None
            for step in range(params.max_tokens):
                await asyncio.sleep(self.delay)
                self.step_tokens.observe(params.n if step else len(prompt_token_ids))
                if b"FAIL" in bytes(i - 2 for i in prompt_token_ids if i >= 2) and step == 2:
                    raise InvalidRequestError("the fake engine failed", param="prompt")
                for k, seq in enumerate(seqs):
                    self._append(seq, ALPHABET[(step + k) % 26], params, step + 1)
                finished = all(s.finish_reason for s in seqs)
                kind = params.output_kind
                if kind is RequestOutputKind.FINAL_ONLY and not finished:
                    continue
                shown = _copy(seqs)
                if kind is RequestOutputKind.DELTA:
                    shown = _news(seqs, sent)
                yield RequestOutput(request_id, prompt_token_ids, shown, finished=finished)
                if finished:
                    return
        finally:
            self.running.discard(request_id)
            if not all(s.finish_reason for s in seqs):
                self.aborted.add(request_id)

    async def encode(
        self,
        prompt_token_ids: list[int],
        params: PoolingParams,
        request_id: str,
        cache_salt: str | None = None,
    ) -> PoolingRequestOutput:
        """A fake embedding: the prompt's first 8 ids scaled, padded with zeros."""
        self.requests.append((prompt_token_ids, SamplingParams(max_tokens=1), request_id))
        values = [i / 256 for i in prompt_token_ids[:8]] + [0.0] * (8 - len(prompt_token_ids))
        data = torch.tensor(values[: params.dimensions or 8])
        return PoolingRequestOutput(request_id, prompt_token_ids, PoolingOutput(data))

    @staticmethod
    def _append(seq: CompletionOutput, letter: str, params: SamplingParams, num: int) -> None:
        if seq.finish_reason:
            return
        seq.token_ids.append(ord(letter) + 2)
        seq.text += letter
        for stop in params.stop:
            if stop in seq.text:
                seq.text = seq.text[: seq.text.index(stop)]
                seq.finish_reason, seq.stop_reason = "stop", stop
                return
        if num == params.max_tokens:
            seq.finish_reason = "length"

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)


def _copy(seqs: list[CompletionOutput]) -> list[CompletionOutput]:
    return [
        CompletionOutput(s.index, s.text, list(s.token_ids), s.finish_reason, s.stop_reason)
        for s in seqs
    ]


def _news(seqs: list[CompletionOutput], sent: list[CompletionOutput]) -> list[CompletionOutput]:
    """What each sequence has that `sent` (what went before) lacks; then `sent` has it."""
    news = []
    for seq, old in zip(seqs, sent, strict=True):
        tokens, text = seq.token_ids[len(old.token_ids) :], seq.text[len(old.text) :]
        if tokens or text or seq.finish_reason != old.finish_reason:
            news.append(
                CompletionOutput(seq.index, text, tokens, seq.finish_reason, seq.stop_reason)
            )
        old.token_ids, old.text, old.finish_reason = (
            list(seq.token_ids),
            seq.text,
            seq.finish_reason,
        )
    return news


def make_app(engine: EngineClient | None = None, **settings: Any) -> Any:
    engine = engine or FakeAsyncEngine()
    return build_app(engine, ServerSettings(served_model_names=[MODEL, "alias"], **settings))


def client_for(app: Any, **kwargs: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, **kwargs)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def sse_events(body: str) -> list[str]:
    """The data payloads of an SSE body, checking the framing on the way."""
    assert body.endswith("data: [DONE]\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events
    return [e.removeprefix("data: ") for e in events]


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    return str(error["message"])
