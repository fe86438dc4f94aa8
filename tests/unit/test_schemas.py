"""serving.schemas: the request models' bounds, defaults and choices are serving.limits' (so the
OpenAPI schema states them); what pydantic lets through, the engine's parameters accept."""

import pytest
from pydantic import ValidationError

from serving.limits import (
    AGGREGATIONS,
    DEFAULT_DECIMALS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TOP_K,
    ENCODINGS,
    MAX_DECIMALS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP,
    MAX_TEMPERATURE,
)
from serving.schemas import AttentionRequest, CompletionRequest, NextTokenRequest


def test_json_schema_states_the_limits():
    completion = CompletionRequest.model_json_schema()["properties"]
    assert completion["n"]["maximum"] == MAX_N
    assert completion["logprobs"]["anyOf"][0]["maximum"] == MAX_LOGPROBS
    assert completion["temperature"]["maximum"] == MAX_TEMPERATURE
    assert completion["max_tokens"]["default"] == DEFAULT_MAX_TOKENS
    (as_list,) = [s for s in completion["stop"]["anyOf"] if s.get("type") == "array"]
    assert as_list["maxItems"] == MAX_STOP
    assert {"type": "string"} in completion["stop"]["anyOf"]  # one string or a list
    attention = AttentionRequest.model_json_schema()["properties"]
    assert attention["aggregation"]["enum"] == list(AGGREGATIONS)
    assert attention["encoding"]["enum"] == list(ENCODINGS)
    assert attention["decimals"]["maximum"] == MAX_DECIMALS
    assert attention["decimals"]["default"] == DEFAULT_DECIMALS
    assert NextTokenRequest.model_json_schema()["properties"]["top_k"]["default"] == DEFAULT_TOP_K


def test_stop_is_a_list_of_at_most_max_stop_strings():
    def stop(value):
        return CompletionRequest.model_validate({"model": "m", "prompt": "p", "stop": value}).stop

    assert stop("x") == ["x"] and stop(None) is None and stop(["a"] * MAX_STOP) == ["a"] * MAX_STOP
    for bad, kind in ((["a"] * (MAX_STOP + 1), "too_long"), (42, "list_type")):
        with pytest.raises(ValidationError) as info:
            stop(bad)
        (error,) = info.value.errors()
        assert (error["loc"], error["type"]) == (("stop",), kind)  # the field, not a union member


def test_what_pydantic_accepts_the_engine_accepts():
    from serving.app import _attention_options, _completion_params

    for aggregation in AGGREGATIONS:
        for encoding in ENCODINGS:
            request = AttentionRequest(
                text="t", aggregation=aggregation, encoding=encoding, decimals=MAX_DECIMALS
            )
            assert _attention_options(request).aggregation == aggregation
    request = CompletionRequest(
        model="m",
        prompt="p",
        max_tokens=None,
        n=MAX_N,
        logprobs=MAX_LOGPROBS,
        stop="x",
        top_p=1.0,
        return_attention=True,
    )
    params = _completion_params(request)
    assert (params.n, params.logprobs, params.stop) == (MAX_N, MAX_LOGPROBS, ("x",))
    assert params.max_tokens == DEFAULT_MAX_TOKENS and params.top_p is None  # null: defaults
    assert params.attention is not None
