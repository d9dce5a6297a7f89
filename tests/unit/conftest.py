"""Fixtures of the HTTP-app tests: the fake engine and an httpx client over the app."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tests.unit.fake_engine import FakeAsyncEngine, client_for, make_app


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def engine() -> FakeAsyncEngine:
    return FakeAsyncEngine()


@pytest.fixture
async def client(engine: FakeAsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_app(engine)) as c:
        yield c
