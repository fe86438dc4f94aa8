"""serving.params: the engine's parameters take their defaults and bounds from serving.limits,
accept every value up to each bound and reject the first one past it, naming the field."""

import pytest

from serving.limits import (
    AGGREGATIONS,
    DEFAULT_DECIMALS,
    DEFAULT_MAX_TOKENS,
    ENCODINGS,
    MAX_DECIMALS,
    MAX_LOGPROBS,
    MAX_N,
)
from serving.params import AttentionOptions, CompletionParams, EngineError


def test_defaults_are_the_limits_module_s():
    assert CompletionParams().max_tokens == DEFAULT_MAX_TOKENS
    assert AttentionOptions().decimals == DEFAULT_DECIMALS


@pytest.mark.parametrize(
    "build, param, last_good",
    [
        (lambda v: CompletionParams(n=v), "n", MAX_N),
        (lambda v: CompletionParams(logprobs=v), "logprobs", MAX_LOGPROBS),
        (lambda v: AttentionOptions(decimals=v), "decimals", MAX_DECIMALS),
    ],
)
def test_bounds_accept_the_limit_and_reject_past_it(build, param, last_good):
    build(last_good)
    with pytest.raises(EngineError) as info:
        build(last_good + 1)
    err = info.value
    assert (err.param, err.code, err.status) == (param, "invalid_value", 400)
    assert str(last_good) in str(err)  # the message states the range
    with pytest.raises(EngineError):
        build(True)  # a bool is not an integer


def test_choices_are_the_limits_module_s():
    for aggregation in AGGREGATIONS:
        assert AttentionOptions(aggregation=aggregation).aggregation == aggregation
    for encoding in ENCODINGS:
        assert AttentionOptions(encoding=encoding).encoding == encoding
    with pytest.raises(EngineError, match="none, mean, rollout"):
        AttentionOptions(aggregation="max")


def test_stop_becomes_a_tuple_and_layers_a_list():
    assert CompletionParams(stop="x").stop == ("x",)
    assert CompletionParams(stop=None).stop == ()
    assert CompletionParams(stop=["a", "b"]).stop == ("a", "b")
    assert AttentionOptions(layers=(1, 0)).layers == [1, 0]
    for bad in ([], [1.5], "0"):
        with pytest.raises(EngineError) as info:
            AttentionOptions(heads=bad)
        assert info.value.param == "heads"


def test_engine_error_carries_its_response():
    err = EngineError("no such model", param="model", code="model_not_found", status=404)
    assert (str(err), err.message, err.param, err.code, err.status) == (
        "no such model",
        "no such model",
        "model",
        "model_not_found",
        404,
    )
    assert isinstance(err, ValueError)
