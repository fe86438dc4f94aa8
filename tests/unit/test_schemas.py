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
from serving.schemas import AttentionRequest, CompletionRequest, NextTokenRequest, ProbeRequest


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
    from serving.api_params import attention_options as _attention_options
    from serving.api_params import completion_params as _completion_params

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
    assert (params.frequency_penalty, params.presence_penalty, params.repetition_penalty) == (
        0.0,
        0.0,
        1.0,
    )
    extremes = CompletionRequest.model_validate(
        {
            "model": "m",
            "prompt": "p",
            "max_tokens": 0,
            "echo": True,
            "frequency_penalty": -2,
            "presence_penalty": 2.0,
            "logit_bias": {"0": -100, "12": 100.0},
            "best_of": MAX_N,
            "min_tokens": 0,
            "repetition_penalty": 1e-3,
        }
    )
    params = _completion_params(extremes)
    assert params.logit_bias == {0: -100.0, 12: 100.0} and params.best_of == MAX_N
    for everything in (-1, 0):  # vLLM's "no top-k"
        request = CompletionRequest(model="m", prompt="p", top_k=everything)
        assert _completion_params(request).top_k is None
    assert (params.max_tokens, params.frequency_penalty) == (0, -2)


def _field_errors(model, body: dict) -> list[tuple[tuple, str]]:
    try:
        model.model_validate(body)
    except ValidationError as err:
        return [(e["loc"], e["type"]) for e in err.errors()]
    return []


@pytest.mark.parametrize(
    "model, body, field",
    [
        (NextTokenRequest, {"text": "{}"}, "text"),
        (AttentionRequest, {"text": "{}"}, "text"),
        (ProbeRequest, {"text": "{}"}, "text"),
        (ProbeRequest, {"text": "The cat sleeps.", "subject": "{}"}, "subject"),
        (ProbeRequest, {"text": "The cat sleeps.", "verb": "{}"}, "verb"),
        (CompletionRequest, {"model": "m", "prompt": "{}"}, "prompt"),
        (CompletionRequest, {"model": "m", "prompt": ["ok", "{}"]}, "prompt"),
        (CompletionRequest, {"model": "m", "prompt": "p", "stop": "{}"}, "stop"),
        (CompletionRequest, {"model": "m", "prompt": "p", "stop": ["ok", "{}"]}, "stop"),
        (CompletionRequest, {"model": "{}", "prompt": "p"}, "model"),
    ],
)
def test_every_text_field_rejects_empty_and_lone_surrogates(model, body, field):
    def fill(value):
        return {
            k: (
                v.replace("{}", value)
                if isinstance(v, str)
                else [x.replace("{}", value) for x in v]
            )
            for k, v in body.items()
        }

    assert _field_errors(model, fill("fine, \x00 \x07 \x1b[0m and all")) == []
    ((loc, kind),) = _field_errors(model, fill("ab\ud800cd"))
    assert (loc[0], kind) == (field, "invalid_text")
    ((loc, kind),) = _field_errors(model, fill(""))
    assert (loc[0], kind) == (field, "string_too_short")


def test_probe_words_must_hold_a_word():
    for blank in (" ", "\t\n", "\x1c", "\u2028"):  # str.strip()'s whitespace, as the probe's
        ((loc, kind),) = _field_errors(ProbeRequest, {"text": "t", "subject": blank})
        assert (loc, kind) == (("subject",), "string_pattern_mismatch")
    assert ProbeRequest.model_json_schema()["properties"]["verb"]["anyOf"][0]["pattern"] == r"\S"


@pytest.mark.parametrize(
    "prompt",
    ["The cat", ["The cat", "A dog"], [1, 2, 3], [[1, 2], [3]], [1.0, 2.0]],
    ids=["text", "texts", "ids", "id lists", "integral floats"],
)
def test_prompt_takes_openai_s_four_forms(prompt):
    parsed = CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt
    assert parsed == prompt and all(type(i) is int for i in parsed if not isinstance(i, str | list))


@pytest.mark.parametrize(
    "prompt, kind",
    [
        ([], "empty_list"),
        ([""], "string_too_short"),
        (["a", 1], "string_type"),
        ([1, "a"], "int_type"),
        ([[1], []], "too_short"),
        ([1.5], "int_type"),
        ([-1], "greater_than_equal"),
        (5, "prompt_type"),
        ({"a": 1}, "prompt_type"),
    ],
)
def test_a_bad_prompt_is_one_error_naming_the_prompt(prompt, kind):
    assert _field_errors(CompletionRequest, {"model": "m", "prompt": prompt}) == [
        (("prompt",), kind)
    ]


@pytest.mark.parametrize(
    "text, kind",
    [([], "too_short"), ([-1], "greater_than_equal"), (["a"], "int_type"), (5, "text_type")],
)
def test_attention_text_is_a_string_or_token_ids(text, kind):
    assert AttentionRequest.model_validate({"text": [3, 1.0]}).text == [3, 1]
    assert _field_errors(AttentionRequest, {"text": text}) == [(("text",), kind)]


def test_integers_are_json_integers_strings_and_booleans_are_not():
    body = {"model": "m", "prompt": "p", "max_tokens": 3.0, "n": 2.0, "temperature": 1}
    parsed = CompletionRequest.model_validate(body)
    assert (parsed.max_tokens, parsed.n, parsed.temperature) == (3, 2, 1.0)
    assert type(parsed.max_tokens) is int
    for bad in ("3", True, 3.5):
        assert _field_errors(CompletionRequest, {**body, "max_tokens": bad}) == [
            (("max_tokens",), "int_type")
        ]
    options = AttentionRequest.model_validate({"text": "t", "layers": [1.0], "decimals": 2.0})
    assert options.layers == [1] and options.decimals == 2


def test_schema_states_the_text_and_seed_bounds():
    from serving.limits import MAX_SEED, MIN_SEED

    completion = CompletionRequest.model_json_schema()["properties"]
    assert completion["stop"]["minLength"] == 1  # binds the one-string form
    seed = completion["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (MIN_SEED, MAX_SEED)
    kinds = completion["prompt"]["anyOf"]
    assert kinds[0] == {"type": "string", "minLength": 1}
    assert kinds[2]["items"] == {"type": "integer", "minimum": 0} and kinds[2]["minItems"] == 1
    for model in (NextTokenRequest, ProbeRequest):
        assert model.model_json_schema()["properties"]["text"]["minLength"] == 1
    text, ids = AttentionRequest.model_json_schema()["properties"]["text"]["anyOf"]
    assert text["minLength"] == 1 and ids["minItems"] == 1 and ids["items"]["minimum"] == 0
    layers = AttentionRequest.model_json_schema()["properties"]["layers"]["anyOf"][0]
    assert layers["minItems"] == 1 and layers["items"]["minimum"] == 0


def test_attention_rows_pool_and_top_keys_are_bounded():
    from serving.limits import MAX_ATTENTION_ROWS, MAX_POOL, MAX_TOP_KEYS

    ok = AttentionRequest.model_validate({"text": "a", "rows": [-1, 3], "top_keys": MAX_TOP_KEYS})
    assert ok.rows == [-1, 3] and ok.pool is None
    assert AttentionRequest.model_validate({"text": "a", "rows": "last"}).rows == "last"
    assert AttentionRequest.model_validate({"text": "a", "pool": MAX_POOL}).pool == MAX_POOL
    for bad in (
        {"rows": []},
        {"rows": "first"},
        {"rows": [0.5]},
        {"rows": list(range(MAX_ATTENTION_ROWS + 1))},
        {"pool": 0},
        {"pool": MAX_POOL + 1},
        {"top_keys": 0},
        {"top_keys": MAX_TOP_KEYS + 1},
        {"top_keys": "16"},
    ):
        with pytest.raises(ValidationError):
            AttentionRequest.model_validate({"text": "a", **bad})
    schema = AttentionRequest.model_json_schema()["properties"]
    assert schema["pool"]["anyOf"][0]["maximum"] == MAX_POOL
    assert schema["top_keys"]["anyOf"][0]["maximum"] == MAX_TOP_KEYS
