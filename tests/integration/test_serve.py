"""Ray Serve on 127.0.0.1, real HTTP: every endpoint, every bad input, overload, the openai client;
bad text in every text field, token-id prompts, API keys, deadlines, a replica killed under load
and one drained while it streams.

One Ray start is shared by the module (Ray takes ~15 s to come up here), with serving/proxy.py's
middleware in its proxy; the main deployment serves most tests, others beside it on their own
route prefix (num_cpus 0: the two CPUs go to the main and the LSTM deployment).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.integration.helpers import build_tiny_artifact, free_port, wait_healthy

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

LONG_TEXT = "The cat that was sitting on the mat jumps. " * 40


PROXY_CALLBACK = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serving.proxy:middlewares"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_tiny_artifact(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def ray_dir() -> str:
    """Ray's temp dir: its session logs are searched for API keys."""
    return tempfile.mkdtemp(prefix="ray", dir="/tmp")


@pytest.fixture(scope="module")
def server(artifact, ray_dir):
    from serving.app import AttnLMServer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    saved = {k: os.environ.get(k) for k in PROXY_CALLBACK}
    os.environ.update(PROXY_CALLBACK)  # Ray's proxy reads it when it starts (serving/proxy.py)
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=ray_dir,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
        )
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    app = AttnLMServer.options(
        user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.005, "max_in_flight": 6},
        ray_actor_options={"num_cpus": 1},
    ).bind(str(artifact))
    serve.run(app, name="attnlm", route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=60) as client:
        wait_healthy(client, "/health")
        yield client
    serve.shutdown()
    ray.shutdown()


def assert_error(
    response: httpx.Response, status: int, param: str | None = None, contains: str = ""
) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    if param is not None:
        assert body["error"]["param"] == param, body
    assert contains in body["error"]["message"], body
    return body["error"]


def test_health_models_metrics(server):
    assert server.get("/health").json()["status"] == "ok"
    models = server.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    server.post("/v1/next-token", json={"text": "The cat"})
    metrics = server.get("/metrics").text
    assert "attnlm_requests_total" in metrics and "attnlm_request_seconds" in metrics
    server.post("/v1/completions", json={"model": "tiny", "prompt": "The", "max_tokens": 3})
    server.post("/v1/next-token", json={"text": ""})  # a 400
    metrics = server.get("/metrics").text
    assert 'attnlm_errors_total{endpoint="next-token",status="400"}' in metrics
    generated = [
        line for line in metrics.splitlines() if line.startswith("attnlm_generated_tokens_total")
    ]
    assert generated and float(generated[0].split()[-1]) >= 1
    page = server.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="heatmap"' in page.text and "http://" not in page.text.replace(
        "http://127.0.0.1", ""
    )


def server_timing(response) -> dict[str, float]:
    """{"engine": ms, "app": ms} from a Server-Timing header (metrics without a duration, as
    attention's `attention_cache;desc="hit"`, left out)."""
    parts = (p.strip().split(";dur=") for p in response.headers["server-timing"].split(","))
    return {part[0]: float(part[1]) for part in parts if len(part) == 2}


def test_next_token(server):
    response = server.post("/v1/next-token", json={"text": "The cats near the dog", "top_k": 5})
    timing = server_timing(response)  # the engine call lies inside the replica's time
    assert set(timing) == {"engine", "app"} and 0 < timing["engine"] <= timing["app"]
    # a lone request does not wait for a batch (the fixture's batch_wait_timeout_s is 5 ms)
    waits = []
    for _ in range(5):
        t = server_timing(server.post("/v1/next-token", json={"text": "The dog"}))
        waits.append(t["app"] - t["engine"])
    assert min(waits) < 4, waits
    body = response.json()
    assert body["model"] == "tiny" and len(body["top"]) == 5
    probs = [t["prob"] for t in body["top"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert "".join(body["tokens"]) == "The cats near the dog"


def test_concurrent_requests_batch_and_equal_lone_ones(server):
    """A lone request runs its forward at once; concurrent ones share batched forwards (the same
    Server-Timing engine time) and get the same answers."""
    texts = ["The cats near the dog", "The dog", "The cat that was sitting on the mat", "A bird"]
    lone = [server.post("/v1/next-token", json={"text": t, "top_k": 3}).json() for t in texts]
    lone_att = [server.post("/v1/attention", json={"text": t}).json() for t in texts]

    async def burst(path: str, body) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=60) as client:
            return await asyncio.gather(*[client.post(path, json=body(t)) for t in texts])

    for _ in range(3):  # batching needs requests to meet in the replica: a few tries
        together = asyncio.run(burst("/v1/next-token", lambda t: {"text": t, "top_k": 3}))
        engine_times = [server_timing(r)["engine"] for r in together]
        if len(set(engine_times)) < len(texts):
            break
    assert len(set(engine_times)) < len(texts), engine_times  # some shared one forward
    for got, want in zip(together, lone, strict=True):
        assert got.status_code == 200
        got = got.json()
        assert got["token_ids"] == want["token_ids"]
        assert [t["token_id"] for t in got["top"]] == [t["token_id"] for t in want["top"]]
        np.testing.assert_allclose(
            [t["prob"] for t in got["top"]], [t["prob"] for t in want["top"]], atol=1e-5
        )
    together = asyncio.run(burst("/v1/attention", lambda t: {"text": t}))
    for got, want in zip(together, lone_att, strict=True):
        np.testing.assert_allclose(
            got.json()["attention"]["data"], want["attention"]["data"], atol=2e-4
        )
    # a text over the context among concurrent ones fails alone, whichever path it takes
    too_long = "The cat " * 100
    for path in ("/v1/next-token", "/v1/attention"):
        texts.append(too_long)
        together = asyncio.run(burst(path, lambda t: {"text": t}))
        texts.pop()
        assert [r.status_code for r in together] == [200] * len(texts) + [400]
        assert together[-1].json()["error"]["code"] == "context_length_exceeded"


def test_bad_parameter_among_concurrent_requests_fails_alone(server):
    """A parameter only the engine can check (top_k past the vocabulary, a layer the model does
    not have) fails its own request, batched or not, and not the others."""

    async def burst(path: str, bodies: list[dict]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=60) as client:
            return await asyncio.gather(*[client.post(path, json=b) for b in bodies])

    cases = [
        ("/v1/next-token", "top_k", {"top_k": 3}, {"top_k": 100000}),
        ("/v1/attention", "layers", {}, {"layers": [5]}),
    ]
    for path, param, good, bad in cases:
        bodies = [{"text": f"The cat {i}", **good} for i in range(4)] + [{"text": "A", **bad}]
        together = asyncio.run(burst(path, bodies))
        assert [r.status_code for r in together] == [200] * 4 + [400], path
        assert together[-1].json()["error"]["param"] == param


def test_attention_json_and_base64(server):
    text = "The cat that was sitting on the mat jumps."
    response = server.post("/v1/attention", json={"text": text, "decimals": 6})
    assert 0 < server_timing(response)["engine"] <= server_timing(response)["app"]
    assert response.text.count("[[[[") == 1  # the map as nested lists (orjson, from numpy)
    js = response.json()
    T = len(js["tokens"])
    att = np.array(js["attention"]["data"])
    assert js["attention"]["shape"] == [2, 2, T, T] == list(att.shape)
    np.testing.assert_allclose(att.sum(-1), 1, atol=1e-4)
    b64 = server.post("/v1/attention", json={"text": text, "encoding": "base64"}).json()[
        "attention"
    ]
    assert b64["dtype"] == "float16"
    decoded = np.frombuffer(base64.b64decode(b64["data"]), dtype="<f2").reshape(b64["shape"])
    np.testing.assert_allclose(decoded, att, atol=1e-3)
    rollout = server.post(
        "/v1/attention", json={"text": text, "aggregation": "rollout", "layers": [1]}
    ).json()
    assert rollout["attention"]["shape"] == [1, T, T]
    np.testing.assert_allclose(np.array(rollout["attention"]["data"]).sum(-1), 1, atol=1e-3)


def test_completion_plain_n_logprobs_echo_and_attention(server):
    body = server.post(
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": "The cat",
            "max_tokens": 6,
            "temperature": 0,
            "n": 2,
            "logprobs": 2,
            "echo": True,
            "return_attention": {"aggregation": "mean"},
        },
    ).json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    first, second = body["choices"]
    assert first["text"] == second["text"] and first["text"].startswith("The cat")  # greedy, echo
    top = first["logprobs"]["top_logprobs"]
    assert top[0] is None and 2 <= len(top[-1]) <= 3  # echo: the first prompt token has none
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    T = len(first["tokens"])
    assert first["attention"]["attention"]["shape"] == [2, T, T]


def test_seeded_sampling_is_reproducible_and_stream_matches(server):
    request = {
        "model": "tiny",
        "prompt": "The dogs",
        "max_tokens": 10,
        "temperature": 1.0,
        "seed": 3,
    }
    a = server.post("/v1/completions", json=request).json()["choices"][0]["text"]
    b = server.post("/v1/completions", json=request).json()["choices"][0]["text"]
    assert a == b
    with server.stream("POST", "/v1/completions", json={**request, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == a
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


BAD_REQUESTS = [
    ("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", ""),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "banana": 1},
        400,
        "banana",
        "unknown field",
    ),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", ""),
    ("/v1/completions", {"model": "tiny", "prompt": LONG_TEXT}, 400, "prompt", "64"),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "max_tokens": 100000},
        400,
        "max_tokens",
        "",
    ),
    (
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "temperature": -0.5},
        400,
        "temperature",
        "",
    ),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", ""),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_p": 1.5}, 400, "top_p", ""),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "top_k": -2}, 400, "top_k", ""),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "n": 17}, 400, "n", "16"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "logprobs": 6}, 400, "logprobs", "5"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": ["."] * 5}, 400, "stop", "4"),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": 42}, 400, "stop", ""),
    ("/v1/completions", {"model": "tiny", "prompt": "x", "stop": [""]}, 400, "stop", ""),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt", "empty list"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model", "gpt-4"),
    ("/v1/completions", {"prompt": "x"}, 400, "model", "missing"),
    ("/v1/attention", {"text": "The cat", "layers": [5]}, 400, "layers", ""),
    ("/v1/attention", {"text": "The cat", "heads": [-1]}, 400, "heads", ""),
    ("/v1/attention", {"text": "The cat", "aggregation": "max"}, 400, "aggregation", ""),
    ("/v1/attention", {"text": ""}, 400, "text", ""),
    ("/v1/next-token", {"text": "The cat", "top_k": 0}, 400, "top_k", ""),
    ("/v1/next-token", {"text": "The cat", "top_k": 100000}, 400, "top_k", "1.."),
    ("/v1/attention", {"text": "The cat", "decimals": 9}, 400, "decimals", "8"),
    ("/v1/attention", {"text": "The cat", "encoding": "xml"}, 400, "encoding", ""),
    ("/v1/next-token", {"text": 42}, 400, "text", ""),
    ("/v1/probe", {"text": "Nothing here runs."}, 400, "subject", "no noun"),
    ("/v1/probe", {"text": "The cat sleeps.", "verb": "flies"}, 400, "verb", "flies"),
    ("/v1/probe", {"text": "The cat on the mat."}, 400, "verb", "no main verb"),
    ("/v1/probe", {"text": ""}, 400, "text", ""),
    ("/v1/probe", {"text": LONG_TEXT}, 400, "text", "64"),
    ("/v1/probe", {"text": "The cat sleeps.", "subject": 3}, 400, "subject", ""),
    ("/v1/probe", {"text": "The cat sleeps.", "why": 1}, 400, "why", "unknown field"),
    ("/v1/probe", {"model": "gpt-4", "text": "The cat sleeps."}, 404, "model", "gpt-4"),
]


@pytest.mark.parametrize(("path", "payload", "status", "param", "contains"), BAD_REQUESTS)
def test_bad_requests_answer_4xx_json(server, path, payload, status, param, contains):
    assert_error(server.post(path, json=payload), status, param, contains)


def test_probe_finds_subject_and_verb_and_reports_heads(server):
    text = "The cat that was sitting on the mat which was next to the dogs jump."
    body = server.post("/v1/probe", json={"text": text}).json()
    assert body["model"] == "tiny"
    assert "".join(body["tokens"]) == text
    assert body["subject"]["text"] == "cat" and body["number"] == "singular"
    positions = body["subject"]["token_positions"]
    assert "".join(body["tokens"][p] for p in positions) == " cat"
    verb = body["verb"]
    assert (verb["as_written"], verb["correct"], verb["wrong"]) == ("jump", "jumps", "jump")
    assert "".join(body["tokens"][verb["token_position"] :]) == " jump."
    assert body["distance"] == verb["token_position"] - body["subject"]["token_positions"][-1]
    agreement = body["agreement"]
    expected = "correct" if agreement["correct_logprob"] > agreement["wrong_logprob"] else "wrong"
    assert agreement["verdict"] == expected
    heads = body["attention_to_subject"]  # [layer][head] for the 2 x 2 test model
    assert len(heads) == 2 and all(len(row) == 2 for row in heads)
    assert all(0 <= w <= 1 for row in heads for w in row)
    best = body["best_head"]
    assert best["weight"] == max(w for row in heads for w in row)
    assert heads[best["layer"]][best["head"]] == best["weight"]
    # the seed sentence's past tense marks no number: subject and heads, but no verdict
    seed = "The cat that was sitting on the mat which was next to the dog jumped."
    body = server.post("/v1/probe", json={"text": seed}).json()
    assert body["verb"]["correct"] == "jumped" and body["agreement"]["verdict"] is None


def test_model_name_is_the_served_model_id(server, tmp_path_factory):
    """`model_name` in the application's args (build_app) names the model everywhere. (Before the
    LSTM app below takes Ray's second CPU: this one is deleted when done.)"""
    from serving.app import build_app

    artifact = build_tiny_artifact(tmp_path_factory.mktemp("serve-named") / "model")
    app = build_app({"artifact": str(artifact), "model_name": "attnlm-tiny"})
    serve.run(app, name="named", route_prefix="/named", blocking=False)
    try:
        wait_healthy(server, "/named/health")
        assert server.get("/named/health").json()["model"] == "attnlm-tiny"
        assert [m["id"] for m in server.get("/named/v1/models").json()["data"]] == ["attnlm-tiny"]
        payload = {"model": "attnlm-tiny", "prompt": "The cat", "max_tokens": 2, "temperature": 0}
        completion = server.post("/named/v1/completions", json=payload)
        assert completion.status_code == 200 and completion.json()["model"] == "attnlm-tiny"
        body = server.post("/named/v1/next-token", json={"text": "The cat", "top_k": 2}).json()
        assert body["model"] == "attnlm-tiny"
        error = assert_error(
            server.post("/named/v1/completions", json={**payload, "model": "model"}),
            404,
            param="model",
            contains="this server serves 'attnlm-tiny'",
        )
        assert error["code"] == "model_not_found"
    finally:
        serve.delete("named")


@pytest.fixture(scope="module")
def lstm_server(server, tmp_path_factory):
    """An LSTM artifact served by the same app, beside the GPT one, under /lstm."""
    from serving.app import AttnLMServer

    artifact = build_tiny_artifact(
        tmp_path_factory.mktemp("serve-lstm") / "tiny-lstm", arch="lstm", n_head=1
    )
    app = AttnLMServer.options(name="LSTMServer", ray_actor_options={"num_cpus": 1}).bind(
        str(artifact)
    )
    serve.run(app, name="lstm", route_prefix="/lstm", blocking=False)
    wait_healthy(server, "/lstm/health")
    yield server
    serve.delete("lstm")


def test_lstm_is_served_without_attention(lstm_server):
    client = lstm_server
    model = client.get("/lstm/v1/models").json()["data"][0]
    assert (model["id"], model["arch"], model["attention"]) == ("tiny-lstm", "lstm", None)
    body = client.post("/lstm/v1/next-token", json={"text": "The cat", "top_k": 3}).json()
    assert len(body["top"]) == 3
    completion = client.post(
        "/lstm/v1/completions",
        json={"model": "tiny-lstm", "prompt": "The cat", "max_tokens": 4, "temperature": 0},
    ).json()
    assert completion["usage"]["completion_tokens"] >= 1
    error = assert_error(
        client.post("/lstm/v1/attention", json={"text": "The cat"}), 400, contains="LSTM"
    )
    assert error["code"] == "attention_unavailable"
    assert_error(
        client.post(
            "/lstm/v1/completions",
            json={"model": "tiny-lstm", "prompt": "The cat", "return_attention": True},
        ),
        400,
        contains="no attention",
    )
    probe = client.post("/lstm/v1/probe", json={"text": "The cats near the dog sleep."}).json()
    assert probe["agreement"]["verdict"] in ("correct", "wrong")
    assert probe["attention_to_subject"] is None and probe["best_head"] is None
    assert client.get("/lstm/health").status_code == 200


def test_malformed_oversized_and_non_utf8_bodies(server):
    headers = {"content-type": "application/json"}
    assert_error(server.post("/v1/next-token", content=b'{"text": "The cat"', headers=headers), 400)
    assert_error(
        server.post("/v1/next-token", content=b'{"text": "\xff\xfe"}', headers=headers), 400
    )
    big = json.dumps({"text": "a" * (2 << 20)})
    assert_error(server.post("/v1/next-token", content=big, headers=headers), 413)
    assert_error(server.get("/v1/nothing"), 404)
    assert server.get("/health").status_code == 200  # the replica survived all of it


def test_overload_answers_503_with_retry_after(server):
    async def burst():
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=60) as client:
            payload = {"model": "tiny", "prompt": "The cat", "max_tokens": 40, "temperature": 0}
            return await asyncio.gather(
                *[client.post("/v1/completions", json=payload) for _ in range(24)]
            )

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    rejected = next(r for r in responses if r.status_code == 503)
    assert rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "overloaded"


def test_official_openai_client(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    completion = client.completions.create(
        model="tiny", prompt="The cat", max_tokens=5, temperature=0
    )
    assert completion.choices[0].finish_reason in ("stop", "length")
    streamed = client.completions.create(
        model="tiny", prompt="The cat", max_tokens=5, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in streamed)
    assert text == completion.choices[0].text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


# -- bad text, token-id prompts ---------------------------------------------------------------------
SURROGATE = "ab\ud800cd"  # json.dumps writes it as the escape "\ud800": valid JSON, no Unicode text
TEXT_FIELDS = [
    ("/v1/next-token", lambda t: {"text": t}, "text"),
    ("/v1/attention", lambda t: {"text": t}, "text"),
    ("/v1/probe", lambda t: {"text": t}, "text"),
    ("/v1/probe", lambda t: {"text": "The cat sleeps.", "subject": t}, "subject"),
    ("/v1/probe", lambda t: {"text": "The cat sleeps.", "verb": t}, "verb"),
    ("/v1/completions", lambda t: {"model": "tiny", "prompt": t, "max_tokens": 2}, "prompt"),
    ("/v1/completions", lambda t: {"model": "tiny", "prompt": ["ok", t]}, "prompt"),
    ("/v1/completions", lambda t: {"model": "tiny", "prompt": "x", "stop": [t]}, "stop"),
    ("/v1/completions", lambda t: {"model": "tiny", "prompt": "x", "stop": t}, "stop"),
]


def post_json(client: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POST `body` written by json.dumps, which escapes a lone surrogate as JSON allows."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    "path, body, param", TEXT_FIELDS, ids=lambda v: v if isinstance(v, str) else ""
)
def test_lone_surrogates_and_empty_text_are_400s_in_every_text_field(server, path, body, param):
    for stream in (False, True) if path == "/v1/completions" else (False,):
        extra = {"stream": True} if stream else {}
        error = assert_error(post_json(server, path, {**body(SURROGATE), **extra}), 400, param)
        assert error["code"] == "invalid_text" and "U+D800" in error["message"]
        assert_error(post_json(server, path, {**body(""), **extra}), 400, param)
    assert server.get("/health").status_code == 200


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/next-token", {"text": "a\x00b\x07\x1b[31m\x7f", "top_k": 2}),
        ("/v1/attention", {"text": "tab\there\r\nNUL\x00"}),
        ("/v1/probe", {"text": "The cats\x00 near the dog\x01 sleep."}),
        ("/v1/completions", {"model": "tiny", "prompt": "a\x00b", "stop": ["\x00", "\x1f"]}),
        ("/v1/completions", {"model": "tiny", "prompt": "\x01", "stream": True}),
    ],
)
def test_control_characters_are_text_like_any_other(server, path, body):
    response = post_json(server, path, body)
    assert response.status_code == 200, response.text
    if "text" in body:
        data = response.json()
        assert (
            server.post("/v1/next-token", json={"text": body["text"]}).json()["token_ids"]
            == (data["token_ids"])
        )


def test_a_very_long_word_is_a_quick_400(server):
    word = "a" * 500_000  # under the 1 MiB body limit; ~0.3 s to tokenize, were it tokenized
    for path, body, param in TEXT_FIELDS[:3] + TEXT_FIELDS[5:6]:
        start = time.perf_counter()
        error = assert_error(post_json(server, path, body(word)), 400, param)
        assert error["code"] == "context_length_exceeded" and "64 tokens" in error["message"]
        assert time.perf_counter() - start < 2.0, path


def test_prompts_of_token_ids(server):
    ids = server.post("/v1/next-token", json={"text": "The cat sat"}).json()["token_ids"]
    greedy = {"model": "tiny", "max_tokens": 4, "temperature": 0}
    by_text = server.post("/v1/completions", json={**greedy, "prompt": "The cat sat"}).json()
    by_ids = server.post("/v1/completions", json={**greedy, "prompt": ids, "echo": True}).json()
    assert by_ids["choices"][0]["text"] == "The cat sat" + by_text["choices"][0]["text"]
    assert by_ids["usage"]["prompt_tokens"] == len(ids)
    two = server.post("/v1/completions", json={**greedy, "prompt": [ids, ids[:1]]}).json()
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["choices"][0]["text"] == by_text["choices"][0]["text"]
    error = assert_error(
        server.post("/v1/completions", json={**greedy, "prompt": [ids[0], 100000]}), 400, "prompt"
    )
    assert "100000" in error["message"] and error["code"] == "invalid_token_id"
    for bad in ([], [[]], [ids, []], [-1], ["a", 1]):
        assert_error(server.post("/v1/completions", json={**greedy, "prompt": bad}), 400, "prompt")
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")
    completion = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert completion.choices[0].text == by_text["choices"][0]["text"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[100000], max_tokens=1)


# -- API keys, deadlines -------------------------------------------------------------------------------
KEYS = ("sk-test-first", "sk-test-second")


def deploy(name: str, artifact, bind: dict | None = None, **options) -> None:
    """An app of its own beside the main one, on /NAME: `bind` the deployment's arguments
    besides the artifact, `options` its `.options()`."""
    from serving.app import AttnLMServer

    options = {"name": name.title(), "ray_actor_options": {"num_cpus": 0}, **options}
    app = AttnLMServer.options(**options).bind(str(artifact), **(bind or {}))
    serve.run(app, name=name, route_prefix=f"/{name}", blocking=False)


@pytest.fixture(scope="module")
def guarded(server, artifact):
    """/guarded: two keys, /metrics behind them too. ($ATTNLM_API_KEY is read in the replica's
    environment, tests/unit/test_auth.py; not set here through runtime_env, whose env_vars
    Ray's runtime_env agent writes to its log.)"""
    deploy("guarded", artifact, bind={"api_keys": list(KEYS), "metrics_require_key": True})
    wait_healthy(server, "/guarded/health")
    yield server
    serve.delete("guarded")


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_guard_every_route_but_health_and_the_page(guarded):
    client, body = guarded, {"text": "The cat"}
    for headers in ({}, bearer("sk-wrong"), {"Authorization": KEYS[0]}):
        response = client.post("/guarded/v1/next-token", json=body, headers=headers)
        error = assert_error(response, 401)
        assert (
            error["code"] == "invalid_api_key" and response.headers["www-authenticate"] == "Bearer"
        )
    for key in KEYS:
        assert (
            client.post("/guarded/v1/next-token", json=body, headers=bearer(key)).status_code == 200
        )
    assert client.get("/guarded/health").status_code == 200
    assert client.get("/guarded/").status_code == 200  # the viewer page asks for the key itself
    assert client.get("/guarded/openapi.json").status_code == 200
    assert_error(client.get("/guarded/v1/models"), 401)
    assert_error(client.get("/guarded/metrics"), 401)  # metrics_require_key
    metrics = client.get("/guarded/metrics", headers=bearer(KEYS[1]))
    assert 'attnlm_errors_total{endpoint="next-token",status="401"} 3.0' in metrics.text
    assert not any(k in metrics.text for k in (*KEYS, "sk-wrong"))
    assert client.get("/metrics").status_code == 200  # the open deployment's stay open


def test_official_openai_client_with_an_api_key(guarded):
    openai = pytest.importorskip("openai")
    base = f"{guarded.base_url}/guarded/v1"
    client = openai.OpenAI(base_url=base, api_key=KEYS[1])
    completion = client.completions.create(model="tiny", prompt="The cat", max_tokens=3)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert client.models.list().data[0].id == "tiny"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="sk-wrong").completions.create(
            model="tiny", prompt="The cat", max_tokens=3
        )


def test_api_keys_never_reach_the_logs(guarded, ray_dir):
    guarded.post("/guarded/v1/next-token", json={"text": "x"}, headers=bearer("sk-test-wrong"))
    guarded.post("/guarded/v1/next-token", json={"text": "x"}, headers=bearer(KEYS[0]))
    time.sleep(1)  # log lines are flushed asynchronously
    found = []
    for path in Path(ray_dir).rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err", ".txt", ".json"):
            text = path.read_text(errors="replace")
            found += [(path.name, k) for k in (*KEYS, "sk-test-wrong") if k in text]
    assert not found, found


def test_a_completion_past_its_deadline_is_a_504_or_an_error_event(server, artifact):
    """A tiny request_timeout_s: every completion runs past it. (That the engine then frees the
    decode slots: tests/unit/test_text.py.)"""
    deploy("deadline", artifact, user_config={"request_timeout_s": 0.001})
    wait_healthy(server, "/deadline/health")
    body = {"model": "tiny", "prompt": "The cat", "max_tokens": 60, "n": 8, "temperature": 1.0}
    try:
        response = server.post("/deadline/v1/completions", json=body)
        error = assert_error(response, 504, contains="time limit of 0.001 s")
        assert (error["code"], error["type"]) == ("timeout", "server_error")

        async def burst():  # 24 requests x 8 rows: 6 times the decode slots
            async with httpx.AsyncClient(base_url=str(server.base_url), timeout=60) as client:
                posts = [client.post("/deadline/v1/completions", json=body) for _ in range(24)]
                return await asyncio.gather(*posts)

        assert {r.status_code for r in asyncio.run(burst())} <= {504, 503}
        stream = {**body, "stream": True}
        with server.stream("POST", "/deadline/v1/completions", json=stream) as response:
            assert response.status_code == 200
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"
        assert server.post("/deadline/v1/next-token", json={"text": "The cat"}).status_code == 200
    finally:
        serve.delete("deadline")


# -- batch invariance ----------------------------------------------------------------------------------
INVARIANT_TEXTS = [
    "The cats near the dog",
    "A dog",
    "The cat that was sitting on the mat",
    "The keys to the cabinet",
    "Birds",
    "The author of the books that the critics praised",
    "The cat sits.",
    "A bird near the trees sings",
]
BUSY_TEXTS = [("The dog that the cats near the tree " * 3)[: 6 + 9 * i] for i in range(16)]


PROBE_NOUNS = "mat table box chair house tree bench window river garden road wall shelf bus bed cup"
PROBE_NOUNS = PROBE_NOUNS.split()


def invariant_bodies(text: str, i: int) -> dict[str, dict]:
    return {
        "/invariant/v1/next-token": {"text": text, "top_k": 20},
        "/invariant/v1/attention": {"text": text, "aggregation": "rollout", "decimals": 8},
        "/invariant/v1/completions": {
            "model": "tiny",
            "prompt": text,
            "max_tokens": 12,
            "temperature": 0.9,
            "seed": i,
            "logprobs": 3,
            "n": 1 + i % 2,
        },
        # a sentence of the corpus grammar (subject "cats", verb "jump"), one of its own for each i
        "/invariant/v1/probe": {
            "text": f"The cats near {'the' if i < 100 else 'my'} {PROBE_NOUNS[i % 16]} "
            f"{'that was sitting on the mat ' * (i % 4)}jump."
        },
    }


def test_batch_invariant_numbers_alone_and_among_16_others(server, artifact):
    """`batch_invariant: true`: every endpoint's numbers, as JSON floats, are the same alone and
    among 16 other requests of other lengths (batched forwards, shared decode steps)."""
    deploy(
        "invariant",
        artifact,
        bind={"batch_invariant": True},
        user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.01, "max_in_flight": 64},
        max_ongoing_requests=64,
    )
    wait_healthy(server, "/invariant/health")
    try:
        requests = [
            (path, body)
            for i, text in enumerate(INVARIANT_TEXTS)
            for path, body in invariant_bodies(text, i).items()
        ]
        alone = [server.post(path, json=body).json() for path, body in requests]
        busy = [
            (path, body)
            for i, text in enumerate(BUSY_TEXTS)
            for path, body in invariant_bodies(text, 100 + i).items()
        ]

        async def crowd(path: str) -> list[httpx.Response]:
            ours = [(p, b) for p, b in requests if p == path]
            others = [(p, b) for p, b in busy if p == path]
            mixed = [x for pair in zip(others, ours, strict=False) for x in pair]
            mixed += others[len(ours) :]  # each of ours among 16 others
            async with httpx.AsyncClient(base_url=str(server.base_url), timeout=120) as client:
                answers = await asyncio.gather(*[client.post(p, json=b) for p, b in mixed])
            return [r for (p, b), r in zip(mixed, answers, strict=True) if (p, b) in ours]

        for path in invariant_bodies("", 0):
            want = [a for (p, _), a in zip(requests, alone, strict=True) if p == path]
            got = asyncio.run(crowd(path))
            assert [r.status_code for r in got] == [200] * len(want)
            for g, w in zip(got, want, strict=True):
                g = g.json()
                for volatile in ("id", "created"):
                    g.pop(volatile, None), w.pop(volatile, None)
                assert g == w, path
    finally:
        serve.delete("invariant")


# -- a replica lost, a replica drained ----------------------------------------------------------------
def replica_pids(app_name: str) -> list[int]:
    """Process ids of the Serve replicas of `app_name` (their title is ray::ServeReplica:APP:...)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError):
            continue
        if proc.name.isdigit() and title.startswith(f"ray::ServeReplica:{app_name}:"):
            pids.append(int(proc.name))
    return pids


@pytest.fixture(scope="module")
def slow_artifact(tmp_path_factory):
    """A wider model than the tiny one: completions that take a while on 2 cores."""
    return build_tiny_artifact(
        tmp_path_factory.mktemp("serve-slow") / "slow",
        n_layer=4,
        n_head=4,
        n_embd=256,
        block_size=256,
    )


async def completions_in_loops(base: str, path: str, body: dict, stop, results: list) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        while not stop.is_set():
            start = time.monotonic()
            try:
                response = await client.post(path, json=body)
                results.append((start, time.monotonic(), response))
            except httpx.TransportError as err:  # a connection cut: what must not happen
                results.append((start, time.monotonic(), err))


def test_a_replica_killed_under_load_answers_200s_or_retryable_503s(server, slow_artifact):
    deploy("victim", slow_artifact)
    wait_healthy(server, "/victim/health")
    body = {"model": "slow", "prompt": "The cat", "max_tokens": 40, "n": 2, "temperature": 1.0}
    results: list = []

    def recovered_after(killed: float) -> list[float]:
        return [
            end
            for start, end, r in results
            if start > killed and getattr(r, "status_code", 0) == 200
        ]

    async def load_and_kill() -> float:
        stop = asyncio.Event()
        path = "/victim/v1/completions"
        tasks = [
            asyncio.ensure_future(
                completions_in_loops(str(server.base_url), path, body, stop, results)
            )
            for _ in range(8)
        ]
        await asyncio.sleep(3)
        (pid,) = replica_pids("victim")
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while not recovered_after(killed) and time.monotonic() - killed < 30:
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
        return killed

    try:
        killed = asyncio.run(load_and_kill())
    finally:
        serve.delete("victim")
    outcomes = [
        r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for *_, r in results
    ]
    assert set(outcomes) <= {200, 503}, outcomes
    lost = [r for *_, r in results if isinstance(r, httpx.Response) and r.status_code == 503]
    assert lost, "the kill should have caught requests in flight"
    for response in lost:
        assert response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["code"] in ("replica_unavailable", "unavailable", "overloaded"), error
    recovered = recovered_after(killed)
    assert recovered and min(recovered) - killed < 30  # a new replica answers


def test_a_stopping_replica_finishes_the_requests_it_holds(server, slow_artifact):
    deploy("drain", slow_artifact)
    wait_healthy(server, "/drain/health")
    body = {"model": "slow", "prompt": "The cat", "max_tokens": 150, "n": 8, "stream": True}

    async def streams_across_a_delete() -> list[tuple[int, list[str]]]:
        first_events = asyncio.Queue()

        async def one(client: httpx.AsyncClient) -> tuple[int, list[str]]:
            async with client.stream("POST", "/drain/v1/completions", json=body) as response:
                events = []
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        if not events:
                            first_events.put_nowait(None)
                        events.append(line[6:])
                return response.status_code, events

        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=120) as client:
            tasks = [asyncio.ensure_future(one(client)) for _ in range(4)]
            for _ in tasks:  # every stream under way
                await first_events.get()
            await asyncio.to_thread(serve.delete, "drain", False)  # the replica is told to stop
            return await asyncio.gather(*tasks)

    results = asyncio.run(streams_across_a_delete())
    for status, events in results:
        assert status == 200 and events[-1] == "[DONE]"
        assert not any('"error"' in e for e in events)
        finished = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finished.count(None) < len(finished)  # the choices ran to their end
    for _ in range(60):  # then the replica goes
        if not replica_pids("drain"):
            break
        time.sleep(0.5)
    assert not replica_pids("drain")
