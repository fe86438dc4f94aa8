"""serving.proxy: the middleware around Ray Serve's proxy. A request that got no answer (its
replica died) is a 503 with Retry-After in OpenAI's body; a stream cut mid-way ends with an error
event and [DONE]; the proxy's own plain-text errors get OpenAI's body; answers pass unchanged."""

from __future__ import annotations

import json

from starlette.testclient import TestClient

from serving.proxy import ReplicaErrors, middlewares


def client_of(app) -> TestClient:
    return TestClient(ReplicaErrors(app), raise_server_exceptions=False)


async def _start(send, status: int, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type)],
        }
    )


async def silent(scope, receive, send) -> None:
    """What Ray's proxy does when the replica died: nothing."""


async def raising(scope, receive, send) -> None:
    raise RuntimeError("ActorDiedError")


async def cut_stream(scope, receive, send) -> None:
    await _start(send, 200, b"text/event-stream")
    await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})


async def plain_503(scope, receive, send) -> None:
    await _start(send, 503, b"text/plain; charset=utf-8")
    await send({"type": "http.response.body", "body": b"Deployment unavailable", "more_body": True})
    await send({"type": "http.response.body", "body": b", try later"})


async def answer(scope, receive, send) -> None:
    await _start(send, 200, b"text/plain; version=0.0.4")
    await send({"type": "http.response.body", "body": b"metric 1"})


def test_no_answer_is_a_retryable_503():
    for app in (silent, raising):
        response = client_of(app).post("/v1/completions")
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["code"] == "replica_unavailable" and error["type"] == "server_error"
        assert "retry" in error["message"]


def test_a_cut_stream_ends_with_an_error_event_and_done():
    response = client_of(cut_stream).post("/v1/completions")
    assert response.status_code == 200
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[0] == "{}" and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "replica_unavailable"


def test_the_proxy_s_plain_text_errors_get_openai_s_body():
    response = client_of(plain_503).get("/v1/models")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (
        error["message"] == "Deployment unavailable, try later" and error["code"] == "unavailable"
    )


def test_answers_pass_unchanged():
    response = client_of(answer).get("/metrics")
    assert response.status_code == 200 and response.text == "metric 1"
    assert response.headers["content-type"] == "text/plain; version=0.0.4"


def test_the_callback_returns_what_ray_serve_takes():
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    (middleware,) = validate_http_proxy_callback_return(middlewares())
    assert middleware.cls is ReplicaErrors
