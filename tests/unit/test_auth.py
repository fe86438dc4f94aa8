"""serving.auth: optional API keys, OpenAI's way (`Authorization: Bearer <key>`): several keys,
from the deployment and $ATTNLM_API_KEY; /health and the viewer page open, /metrics as configured;
a missing or wrong key is a 401 in OpenAI's body; a key never shows in a repr or the metrics."""

from __future__ import annotations

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from serving.auth import ENV_VAR, Access, require_key
from serving.http import install_error_handlers
from serving.metrics import ServerMetrics

KEYS = ("sk-first", "sk-second")


def test_keys_come_from_the_deployment_and_the_environment():
    access = Access.configure(["sk-a"], environ={ENV_VAR: "sk-b, sk-c,,sk-a"})
    assert access.keys == ("sk-a", "sk-b", "sk-c") and access.required
    assert Access.configure("sk-a", environ={}).keys == ("sk-a",)
    assert not Access.configure(None, environ={}).required
    assert not Access.configure(None, environ={ENV_VAR: " "}).required
    assert "sk-a" not in repr(access) and "sk-b" not in str(access)


def test_bad_keys_are_named_at_once():
    with pytest.raises(ValueError) as info:
        Access(keys=("ok", " padded"), metrics_require_key="yes")
    assert "API key" in str(info.value) and "metrics_require_key" in str(info.value)
    with pytest.raises(ValueError, match="api_keys"):
        Access(keys=(1, 2))


def test_which_routes_need_a_key():
    access = Access(KEYS)
    assert [access.route_needs_key(r) for r in ("/health", "/", "/metrics", "/v1/models")] == [
        False,
        False,
        False,
        True,
    ]
    assert Access(KEYS, metrics_require_key=True).route_needs_key("/metrics")
    assert not Access().route_needs_key("/v1/completions")  # no keys: all open


@pytest.mark.parametrize(
    "header, ok",
    [
        ("Bearer sk-first", True),
        ("bearer sk-second", True),
        ("Bearer  sk-first ", True),
        ("Bearer sk-third", False),
        ("Bearer sk-firs", False),
        ("Basic sk-first", False),
        ("sk-first", False),
        ("Bearer ", False),
        (None, False),
    ],
)
def test_accepts_a_bearer_key(header, ok):
    assert Access(KEYS).accepts(header) is ok


@pytest.fixture()
def client() -> tuple[TestClient, ServerMetrics]:
    app = FastAPI(dependencies=[Depends(require_key)])
    install_error_handlers(app)
    metrics = ServerMetrics()
    app.state.access, app.state.metrics = Access(KEYS), metrics

    for path in ("/health", "/", "/metrics", "/v1/models"):
        app.get(path)(lambda: {"ok": True})
    app.post("/v1/completions")(lambda: {"ok": True})
    return TestClient(app), metrics


def test_a_missing_or_wrong_key_is_a_401_in_openai_s_body(client):
    client, metrics = client
    for headers, words in (
        ({}, "needs an API key"),
        ({"Authorization": "Bearer nope"}, "incorrect"),
    ):
        response = client.post("/v1/completions", headers=headers)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        error = response.json()["error"]
        assert words in error["message"] and error["code"] == "invalid_api_key"
        assert error["type"] == "invalid_request_error"
        assert "nope" not in response.text
    ok = client.post("/v1/completions", headers={"Authorization": "Bearer sk-second"})
    assert ok.status_code == 200
    for path in ("/health", "/", "/metrics"):
        assert client.get(path).status_code == 200, path
    assert client.get("/v1/models").status_code == 401
    exposition = metrics.exposition().decode()
    assert 'attnlm_errors_total{endpoint="completions",status="401"} 2.0' in exposition
    assert not any(key in exposition for key in (*KEYS, "nope"))


def test_metrics_can_need_a_key(client):
    client, _ = client
    client.app.state.access = Access(KEYS, metrics_require_key=True)
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer sk-first"}).status_code == 200
    assert client.get("/health").status_code == 200
    client.app.state.access = None  # a deployment that set none: all open
    assert client.post("/v1/completions").status_code == 200
