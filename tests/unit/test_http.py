"""serving.http: every error in OpenAI's body. An exception nobody expected is a 500 whose
message carries the request id, logged with its traceback under that id; the router's 405 keeps
`Allow`; a request rejected by validation is counted in the replica's metrics."""

from __future__ import annotations

import logging

import pytest
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from serving.http import (
    ActiveRequests,
    BodyLimit,
    ErrorGuard,
    install_error_handlers,
    request_id,
    sse_event,
)
from serving.metrics import ServerMetrics
from serving.schemas import NextTokenRequest


@pytest.fixture()
def app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=100)
    app.add_middleware(ActiveRequests)
    app.add_middleware(ErrorGuard)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    @app.get("/id")
    async def current_id() -> dict:
        return {"id": request_id()}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def events():
            yield "data: 1\n\n"
            raise RuntimeError("a bug mid-stream")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/next-token")
    async def next_token(request: NextTokenRequest) -> dict:
        return {"text": request.text}

    return app


def test_an_unexpected_exception_is_a_json_500_with_the_logged_request_id(app, caplog):
    client = TestClient(app, raise_server_exceptions=False)
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        response = client.get("/boom", headers={"x-request-id": "req-123"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "server_error",
        "internal_error",
        None,
    )
    assert "req-123" in error["message"] and "a bug" not in error["message"]  # no internals
    (record,) = [r for r in caplog.records if "req-123" in r.getMessage()]
    assert record.exc_info and "a bug" in str(record.exc_info[1])
    # without the proxy's header a new id is made, and each request sees its own
    response = client.get("/boom")
    assert len(response.json()["error"]["message"]) > len("internal server error (request id )")
    assert client.get("/id", headers={"x-request-id": "abc"}).json() == {"id": "abc"}


def test_an_exception_after_the_answer_started_is_logged_and_raised(app, caplog):
    client = TestClient(app)
    with caplog.at_level(logging.ERROR, logger="ray.serve"), pytest.raises(RuntimeError):
        client.get("/stream")
    assert any("unexpected" in r.getMessage() for r in caplog.records)


def test_router_errors_keep_their_headers_and_have_codes(app):
    client = TestClient(app)
    response = client.request("TRACE", "/id")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert response.json()["error"]["code"] == "method_not_allowed"
    response = client.get("/nowhere")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    response = client.post("/v1/next-token", content=b'{"text": "' + b"a" * 200 + b'"}')
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_validation_errors_are_400s_counted_in_the_replica_metrics(app):
    metrics = ServerMetrics()
    app.state.metrics = metrics
    client = TestClient(app)
    response = client.post("/v1/next-token", json={"text": ""})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "text"
    response = client.post(
        "/v1/next-token", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert response.json()["error"]["code"] == "invalid_json"
    exposition = metrics.exposition().decode()
    assert 'attnlm_errors_total{endpoint="next-token",status="400"} 2.0' in exposition
    assert 'attnlm_requests_total{endpoint="next-token"} 2.0' in exposition


def test_an_event_stays_one_line_whatever_the_text():
    """U+0085, U+2028 and U+2029 are line ends to Python's splitlines (and httpx's iter_lines)
    but JSON leaves them raw: an event escapes them, the same string to a JSON reader."""
    import json

    text = "a\x85b\u2028c\u2029d\ne\rf\x0bg\x1ch"
    event = sse_event({"choices": [{"text": text}]})
    assert event.endswith("\n\n") and event.startswith("data: ")
    line = event[:-2]
    assert line.splitlines() == [line]
    assert json.loads(line[len("data: ") :]) == {"choices": [{"text": text}]}
