"""The playground's routes against a fake engine: the page, its files, its config, the flag
that turns it off, and the key it does not need (the browser test: tests/e2e/test_playground.py)."""

from __future__ import annotations

import re

import pytest

from tests.unit.fake_engine import KEY, MODEL, client_for, make_app
from tokenmill.server.routers.playground import ASSETS

pytestmark = pytest.mark.anyio


async def test_the_page_and_its_files_are_served_without_a_key() -> None:
    async with client_for(make_app(api_key=KEY)) as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        # every file the page names is served, relative to the page (a --root-path proxy),
        # and nothing it names comes from elsewhere
        named = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert {"playground/playground.js", "playground/playground.css"} <= set(named)
        assert all(n.startswith("playground/") or n.startswith("data:") for n in named), named
        for name, media_type in ASSETS.items():
            response = await client.get(f"/playground/{name}")
            assert response.status_code == 200
            assert response.headers["content-type"] == media_type
        assert (await client.head("/")).status_code == 200
        assert (await client.get("/v1/models")).status_code == 401  # the API still needs it


async def test_the_config_names_the_model_and_whether_a_key_is_needed() -> None:
    async with client_for(make_app(api_key=KEY)) as client:
        config = (await client.get("/playground/config")).json()
    assert config["model"] == MODEL and config["api_key_required"] is True
    assert isinstance(config["max_model_len"], int)
    async with client_for(make_app()) as client:
        assert (await client.get("/playground/config")).json()["api_key_required"] is False


async def test_no_other_file_is_served() -> None:
    async with client_for(make_app()) as client:
        for path in ("/playground/", "/playground/../app.py", "/playground/__init__.py",
                     "/playground/%2e%2e%2fapp.py", "/index.html"):  # fmt: skip
            response = await client.get(path)
            assert response.status_code == 404, path
            assert response.json()["error"]["code"] == 404


async def test_disable_playground_removes_every_route() -> None:
    async with client_for(make_app(playground=False)) as client:
        for path in ("/", "/playground/playground.js", "/playground/config"):
            assert (await client.get(path)).status_code == 404, path
        assert (await client.get("/health")).status_code == 200


def test_the_flag_reaches_the_settings() -> None:
    from tokenmill.server.cli import _server_settings, build_parser

    for argv, enabled in ((["serve"], True), (["serve", "--disable-playground"], False)):
        args = build_parser().parse_args(argv)
        assert _server_settings(args).playground is enabled
