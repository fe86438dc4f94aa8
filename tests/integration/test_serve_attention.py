"""Attention of long texts over real HTTP (Ray Serve on 127.0.0.1): rows, pool and top_keys, the
replica's q/k cache named in Server-Timing, answers over `max_attention_bytes` as a 400 in
OpenAI's shape, old requests answered as before, concurrent requests each given its own
selection. One deployment with a small answer limit (user_config), its own Ray start (~20 s).
"""

from __future__ import annotations

import asyncio
import base64
import os

import httpx
import numpy as np
import pytest

from tests.integration.helpers import build_tiny_artifact, local_serve, wait_healthy
from tests.integration.test_serve import assert_error

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

TEXT = "The cat that was sitting on the mat jumps. " * 2
MAX_BYTES = 40_000  # the whole map of TEXT as JSON is over it; one head's rows are not


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_tiny_artifact(tmp_path_factory.mktemp("serve-attention") / "tiny")


@pytest.fixture(scope="module")
def server(artifact):
    from serving.app import AttnLMServer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with local_serve() as base:
        config = {"attention_cache_bytes": 1 << 20, "max_attention_bytes": MAX_BYTES}
        app = AttnLMServer.options(user_config=config, ray_actor_options={"num_cpus": 1})
        serve.run(app.bind(str(artifact)), name="attnlm", route_prefix="/", blocking=False)
        with httpx.Client(base_url=base, timeout=60) as client:
            wait_healthy(client, "/health")
            yield client


@pytest.fixture(scope="module")
def engine(artifact):
    from serving.engine import Engine

    return Engine(artifact, device="cpu", attention_cache_bytes=0)


def values(attention: dict) -> np.ndarray:
    if attention["encoding"] == "json":
        return np.asarray(attention["data"], dtype=np.float64)
    raw = base64.b64decode(attention["data"])
    return np.frombuffer(raw, dtype="<f2").reshape(attention["shape"]).astype(np.float64)


def cache_of(response: httpx.Response) -> str | None:
    for part in response.headers["server-timing"].split(","):
        if part.strip().startswith("attention_cache"):
            return part.split('desc="')[1].rstrip('"')
    return None


def test_old_request_answers_as_before(server):
    body = server.post("/v1/attention", json={"text": "The cat sits.", "heads": [0]}).json()
    assert set(body) == {
        "model", "tokens", "token_ids", "n_layers", "n_heads", "layers", "heads", "aggregation",
        "attention",
    }  # fmt: skip
    T = len(body["tokens"])
    assert body["attention"]["shape"] == [body["n_layers"], 1, T, T]


def test_another_selection_of_a_text_is_a_cache_hit(server, engine):
    from serving.engine import AttentionOptions

    text = "The dogs near the cat sleep on the mat."
    first = server.post("/v1/attention", json={"text": text, "layers": [0], "heads": [1]})
    second = server.post("/v1/attention", json={"text": text, "layers": [1], "rows": [-1, 0]})
    assert first.status_code == second.status_code == 200, second.text
    assert (cache_of(first), cache_of(second)) == ("miss", "hit")
    (want,) = engine.attention([text], AttentionOptions(layers=[1], rows=[-1, 0]))
    got = second.json()
    assert got["rows"] == want.rows and got["attention"]["shape"] == want.attention["shape"]
    np.testing.assert_allclose(values(got["attention"]), values(want.attention), atol=2e-3)


def test_pool_and_top_keys_over_http(server):
    pooled = server.post("/v1/attention", json={"text": TEXT, "pool": 8, "encoding": "base64"})
    assert pooled.status_code == 200, pooled.text
    body = pooled.json()
    assert body["attention"]["shape"][-2:] == [8, 8] and body["pool_block"] >= 1
    top = server.post("/v1/attention", json={"text": TEXT, "rows": "last", "top_keys": 4})
    keys = top.json()["keys"]
    assert keys["dtype"] == "int32" and keys["shape"] == top.json()["attention"]["shape"]
    assert_error(
        server.post("/v1/attention", json={"text": TEXT, "pool": 8, "rows": "last"}), 400, "pool"
    )
    assert_error(server.post("/v1/attention", json={"text": "A cat", "rows": [9]}), 400, "rows")


def test_an_answer_over_max_attention_bytes_is_a_400_naming_what_fits(server):
    error = assert_error(
        server.post("/v1/attention", json={"text": TEXT}), 400, "text", "max_attention_bytes"
    )
    assert error["code"] == "answer_too_large" and '"rows": "last"' in error["message"]
    completion = {"model": "tiny", "prompt": TEXT, "max_tokens": 2, "return_attention": True}
    error = assert_error(server.post("/v1/completions", json=completion), 400, "return_attention")
    assert error["code"] == "answer_too_large"
    completion["return_attention"] = {"rows": "last", "heads": [0]}
    choice = server.post("/v1/completions", json=completion).json()["choices"][0]
    assert choice["attention"]["rows"] == [len(choice["tokens"]) - 1]


def test_concurrent_requests_each_get_their_selection(server, engine):
    from serving.engine import AttentionOptions

    texts = ["The cats near the dog sleep.", "A dog that the cats see runs.", TEXT]
    asks = [
        {"text": t, "layers": [h % 2], "heads": [h], "rows": [-1 - h], "decimals": 6}
        for t in texts
        for h in range(2)
    ] * 3

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/attention", json=a) for a in asks))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * len(asks)
    for ask, response in zip(asks, responses, strict=True):
        options = AttentionOptions(**{k: v for k, v in ask.items() if k != "text"})
        (want,) = engine.attention([ask["text"]], options)
        got = response.json()
        assert got["rows"] == want.rows
        np.testing.assert_allclose(values(got["attention"]), values(want.attention), atol=2e-3)
    assert {cache_of(r) for r in responses} <= {"hit", "miss"}
