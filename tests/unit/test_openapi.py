"""serving.openapi: the served contract states the model's bounds, every error status with
OpenAI's body, no 422, the bearer scheme only when keys are required; the response models
describe what the engine's results become."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from serving.auth import Access
from serving.engine import AttentionOptions, CompletionParams, Engine
from serving.openapi import (
    AttentionBody,
    CompletionChoice,
    ModelBounds,
    NextTokenResponse,
    ProbeResponse,
    contract,
)
from tests.integration.helpers import build_tiny_artifact

BOUNDS = ModelBounds("tiny", vocab_size=300, n_layer=2, n_head=4, max_tokens=64, context_length=64)


@pytest.fixture(scope="module")
def spec() -> dict:
    from serving.app import app

    return contract(app, BOUNDS, Access(("sk-key",)))()


@pytest.fixture(scope="module")
def open_spec() -> dict:
    from serving.app import app

    return contract(app, BOUNDS, Access())()


def test_model_bounds_are_stated(spec):
    schemas = spec["components"]["schemas"]
    assert schemas["NextTokenRequest"]["properties"]["top_k"]["maximum"] == 300
    attention = schemas["AttentionRequest"]["properties"]
    assert attention["layers"]["anyOf"][0]["items"]["maximum"] == 1
    assert attention["heads"]["anyOf"][0]["items"]["maximum"] == 3
    completion = schemas["CompletionRequest"]["properties"]
    assert completion["max_tokens"]["anyOf"][0]["maximum"] == 64
    ids, id_lists = completion["prompt"]["anyOf"][2:]
    assert ids["items"]["maximum"] == 299 and id_lists["items"]["items"]["maximum"] == 299
    assert completion["model"]["enum"] == ["tiny"]
    assert schemas["ProbeRequest"]["properties"]["model"]["anyOf"][0]["enum"] == ["tiny"]
    assert "64 tokens" in attention["text"]["description"]
    assert "token ids" in attention["text"]["description"]
    assert attention["text"]["anyOf"][1]["items"]["maximum"] == 299
    options = schemas["AttentionOptionsModel"]["properties"]  # return_attention's
    assert options["layers"]["anyOf"][0]["items"]["maximum"] == 1


def test_every_route_documents_its_errors(spec, open_spec):
    paths = spec["paths"]
    for path in ("/v1/next-token", "/v1/attention", "/v1/probe", "/v1/completions"):
        responses = paths[path]["post"]["responses"]
        assert set(responses) >= {"200", "400", "401", "404", "413", "500", "503"}
        assert "422" not in responses
        for status in ("400", "500", "503"):
            ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorResponse"
    assert "504" in paths["/v1/completions"]["post"]["responses"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert "text/html" in paths["/"]["get"]["responses"]["200"]["content"]
    assert "401" not in open_spec["paths"]["/v1/models"]["get"]["responses"]
    assert "securitySchemes" not in open_spec["components"]


def test_security_only_where_a_key_is_needed(spec):
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    secured = {p for p, ops in spec["paths"].items() if any("security" in o for o in ops.values())}
    assert secured == {
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/next-token",
        "/v1/attention",
        "/v1/probe",
        "/v1/completions",
        "/v1/chat/completions",
        "/tokenizer_info",
        "/tokenize",
        "/detokenize",
    }


def test_evaluation_routes_state_their_bounds(spec):
    """Token ids below the vocabulary (detokenize, logit_bias keys), top_k, min_tokens and chat's
    max tokens up to their limits; every new route documents its errors."""
    import re

    schemas = spec["components"]["schemas"]
    detok = schemas["DetokenizeRequest"]["properties"]["tokens"]["items"]
    assert (detok["minimum"], detok["maximum"]) == (0, 299)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = schemas[name]["properties"]
        (bias,) = [n for n in props["logit_bias"]["anyOf"] if n.get("type") == "object"]
        pattern = re.compile(bias["propertyNames"]["pattern"])
        assert pattern.match("0") and pattern.match("299") and not pattern.match("300")
        assert (
            bias["additionalProperties"]["minimum"],
            bias["additionalProperties"]["maximum"],
        ) == (
            -100,
            100,
        )
        assert props["min_tokens"]["maximum"] == 64
        assert props["frequency_penalty"]["anyOf"][0]["minimum"] == -2
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["max_completion_tokens"]["anyOf"][0]["maximum"] == 64
    assert schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]["minimum"] == 0
    for path, method in (
        ("/tokenize", "post"),
        ("/detokenize", "post"),
        ("/v1/chat/completions", "post"),
        ("/v1/models/{model_id}", "get"),
    ):
        assert {"200", "404", "500", "503"} <= set(spec["paths"][path][method]["responses"])


def test_response_models_describe_the_engine_s_results(tmp_path):
    engine = Engine(build_tiny_artifact(tmp_path / "tiny"), device="cpu")
    (nt,) = engine.next_token(["The cat"], top_k=3)
    NextTokenResponse.model_validate({"model": "tiny", **asdict(nt)})
    for encoding in ("json", "base64"):
        (att,) = engine.attention(["The cat"], AttentionOptions(encoding=encoding))
        AttentionBody.model_validate(asdict(att) | {"attention": _plain(asdict(att)["attention"])})
    probe = engine.probe("The cats near the dog sleep.")
    ProbeResponse.model_validate({"model": "tiny", **asdict(probe)})
    params = CompletionParams(max_tokens=3, logprobs=2, echo=True, attention=AttentionOptions())
    choice = engine.complete("The cat", params).choices[0]
    entry = asdict(choice)
    entry["attention"]["attention"] = _plain(entry["attention"]["attention"])
    CompletionChoice.model_validate(entry)


def _plain(encoded: dict) -> dict:
    """The encoded map as JSON has it (numpy arrays are written as nested lists)."""
    data = encoded["data"]
    return {**encoded, "data": data if isinstance(data, str) else data.tolist()}
