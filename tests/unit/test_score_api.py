"""vLLM's score and rerank APIs on the fake engine: pairing (1:1, 1:N, N:N), the cosine of
the fake's embeddings, ranking and top_n, usage, the routes' aliases, /invocations, the key,
and 400s naming what is wrong."""

from __future__ import annotations

import pytest
import torch

from tests.unit.fake_engine import KEY, MODEL, FakeAsyncEngine, assert_error, client_for, make_app

pytestmark = pytest.mark.anyio


def fake_vector(text: str) -> torch.Tensor:
    """The fake engine's embedding of `text` (BOS, then a token per byte)."""
    ids = [0, *(b + 2 for b in text.encode())]
    return torch.tensor([i / 256 for i in ids[:8]] + [0.0] * (8 - len(ids)))


def cosine(a: str, b: str) -> float:
    return torch.nn.functional.cosine_similarity(fake_vector(a), fake_vector(b), dim=0).item()


@pytest.mark.parametrize("path", ["/score", "/v1/score"])
async def test_score_pairs_one_to_many_and_pairwise(path: str) -> None:
    engine = FakeAsyncEngine()
    async with client_for(make_app(engine)) as client:
        one_to_many = await client.post(path, json={"text_1": "abc", "text_2": ["abd", "zzzz"]})
        pairwise = await client.post(
            path, json={"model": "alias", "text_1": ["abc", "q"], "text_2": ["abd", "q"]}
        )
        one_to_one = await client.post(path, json={"text_1": "hi", "text_2": "hi there"})
    body = one_to_many.json()
    assert body["object"] == "list" and body["model"] == MODEL and body["id"].startswith("score-")
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert {d["object"] for d in body["data"]} == {"score"}
    assert [d["score"] for d in body["data"]] == pytest.approx(
        [cosine("abc", "abd"), cosine("abc", "zzzz")], abs=1e-6
    )
    # the first text embedded once: its tokens count once
    assert body["usage"] == {"prompt_tokens": 4 + 4 + 5, "completion_tokens": 0,
                             "total_tokens": 13}  # fmt: skip
    assert len(engine.requests) == 3 + 4 + 2
    pairs = pairwise.json()
    assert pairs["model"] == "alias"
    assert [d["score"] for d in pairs["data"]] == pytest.approx([cosine("abc", "abd"), 1.0])
    assert one_to_one.json()["data"][0]["score"] == pytest.approx(cosine("hi", "hi there"))


@pytest.mark.parametrize(
    ("first", "second"),
    [("data_1", "data_2"), ("queries", "documents"), ("queries", "items")],
)
async def test_score_takes_each_of_vllms_spellings(first: str, second: str) -> None:
    body = {first: "abc", second: ["abd", "zzzz"]}
    async with client_for(make_app()) as client:
        response = await client.post("/v1/score", json=body)
        assert response.status_code == 200, response.text
        scores = [d["score"] for d in response.json()["data"]]
        assert scores == pytest.approx([cosine("abc", "abd"), cosine("abc", "zzzz")], abs=1e-6)
        via = await client.post("/invocations", json=body)
        assert [d["score"] for d in via.json()["data"]] == scores
        mismatched = await client.post("/score", json={first: ["a", "b"], second: ["a"] * 3})
        assert_error(mismatched, 400, first)  # named as the client named it
        half = await client.post("/score", json={first: "a", "text_2": "b"})
        assert "text_1 and text_2" in assert_error(half, 400)


@pytest.mark.parametrize("path", ["/rerank", "/v1/rerank", "/v2/rerank"])
async def test_rerank_orders_documents_by_relevance(path: str) -> None:
    documents = ["zzzz", "abd", "abc", "a"]
    async with client_for(make_app()) as client:
        ranked = await client.post(path, json={"query": "abc", "documents": documents})
        top = await client.post(path, json={"query": "abc", "documents": documents, "top_n": 2})
    body = ranked.json()
    assert body["id"].startswith("rerank-") and body["model"] == MODEL
    scores = {i: cosine("abc", d) for i, d in enumerate(documents)}
    order = sorted(scores, key=lambda i: scores[i], reverse=True)
    assert [r["index"] for r in body["results"]] == order
    assert order[0] == 2  # the query itself is the most relevant
    for result in body["results"]:
        assert result["document"] == {"text": documents[result["index"]]}
        assert result["relevance_score"] == pytest.approx(scores[result["index"]], abs=1e-6)
    assert body["usage"] == {"prompt_tokens": 4 + 5 + 4 + 4 + 2, "total_tokens": 19}
    assert [r["index"] for r in top.json()["results"]] == order[:2]
    async with client_for(make_app()) as client:  # one document as a string
        one = (await client.post(path, json={"query": "abc", "documents": "abd"})).json()
    assert [r["document"]["text"] for r in one["results"]] == ["abd"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/score", {"text_1": ["a", "b"], "text_2": ["a", "b", "c"]}, "text_1"),
        ("/score", {"text_1": [], "text_2": "a"}, "text_1"),
        ("/score", {"text_1": "a"}, None),  # (no second side: a body-level 400)
        ("/score", {"text_1": "a", "text_2": "b", "use_activation": True}, "use_activation"),
        ("/score", {"text_1": "a", "text_2": "b", "softmax": False}, "softmax"),
        ("/score", {"text_1": "a", "text_2": "b", "priority": 1}, "priority"),
        ("/score", {"text_1": "a", "text_2": "b", "truncate_prompt_tokens": 0},
         "truncate_prompt_tokens"),
        ("/score", {"text_1": "a", "text_2": "x" * 100}, "text_2"),  # past max_model_len 64
        ("/score", {"model": "nope", "text_1": "a", "text_2": "b"}, "model"),
        ("/rerank", {"query": "a", "documents": []}, "documents"),
        ("/rerank", {"query": "a", "documents": ["b"], "top_n": -1}, "top_n"),
        ("/rerank", {"query": "a", "documents": ["b"], "mm_processor_kwargs": {}},
         "mm_processor_kwargs"),
        ("/rerank", {"query": "x" * 100, "documents": ["b"]}, "query"),
    ],
)  # fmt: skip
async def test_bad_score_and_rerank_requests_are_400s_naming_the_field(
    path: str, body: dict, param: str | None
) -> None:
    engine = FakeAsyncEngine()
    async with client_for(make_app(engine)) as client:
        response = await client.post(path, json=body)
        status = 404 if param == "model" else 400
        assert_error(response, status, param if status == 400 else None)
        assert (await client.post(path, json={"text_1": "a", "text_2": "b"} if "score" in path
                else {"query": "a", "documents": ["b"]})).status_code == 200  # fmt: skip
    assert not engine.running


async def test_a_long_text_is_cut_to_the_context_with_truncate_minus_one() -> None:
    body = {"text_1": "x" * 100, "text_2": "x" * 90, "truncate_prompt_tokens": -1}
    async with client_for(make_app()) as client:
        response = await client.post("/score", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == 2 * 64
    assert response.json()["data"][0]["score"] == pytest.approx(1.0)


async def test_invocations_route_rerank_and_score_bodies_and_the_key_guards_all() -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    async with client_for(make_app(api_key=KEY)) as client:
        for path in ("/score", "/v1/score", "/rerank", "/v1/rerank", "/v2/rerank"):
            assert_error(await client.post(path, json={"query": "a", "documents": ["b"]}), 401)
        rerank = {"query": "abc", "documents": ["zzzz", "abd"]}
        via = await client.post("/invocations", json=rerank, headers=headers)
        direct = await client.post("/v1/rerank", json=rerank, headers=headers)
        assert via.json()["results"] == direct.json()["results"]
        score = {"text_1": "abc", "text_2": ["abd"]}
        via = await client.post("/invocations", json=score, headers=headers)
        direct = await client.post("/score", json=score, headers=headers)
        assert via.json()["data"] == direct.json()["data"]
