"""Pydantic request models of the HTTP API (docs/serving.md) and OpenAI's error body.

Requests are strict (a string where a number belongs is a 400, not a silent cast) and reject
unknown fields, except the OpenAI completion fields we accept for client compatibility. Bounds,
defaults and choices come from `serving.limits`, the constants the engine checks, so the OpenAPI
schema (/openapi.json) states the constraints requests meet; what depends on the model (the
context window, `top_k` up to the vocabulary, layer and head indices) the engine checks.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)

from serving.limits import (
    DEFAULT_DECIMALS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TOP_K,
    MAX_DECIMALS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_STOP,
    MAX_TEMPERATURE,
    Aggregation,
    Encoding,
)


def _listed(value: Any) -> Any:
    """One stop string as a list of one (OpenAI takes a string or a list)."""
    return [value] if isinstance(value, str) else value


_StopList = Annotated[list[StrictStr], Field(max_length=MAX_STOP)]
StopStrings = Annotated[
    _StopList | None, BeforeValidator(_listed, json_schema_input_type=StrictStr | _StopList | None)
]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class AttentionOptionsModel(_Strict):
    layers: list[StrictInt] | None = None
    heads: list[StrictInt] | None = None
    aggregation: Aggregation = "none"
    encoding: Encoding = "json"
    decimals: StrictInt = Field(DEFAULT_DECIMALS, ge=0, le=MAX_DECIMALS)


class AttentionRequest(AttentionOptionsModel):
    model: StrictStr | None = None
    text: StrictStr


class NextTokenRequest(_Strict):
    model: StrictStr | None = None
    text: StrictStr
    top_k: StrictInt = Field(DEFAULT_TOP_K, ge=1)


class ProbeRequest(_Strict):
    model: StrictStr | None = None
    text: StrictStr
    subject: StrictStr | None = None  # the subject's head noun, when the lexicon does not find it
    verb: StrictStr | None = None  # the main verb, when the grammar rules do not find it


class CompletionRequest(_Strict):
    model: StrictStr
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = Field(DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=1)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    stop: StopStrings = None  # a string is a list of one
    seed: StrictInt | None = None
    user: StrictStr | None = None
    # OpenAI fields without an effect here: accepted at their neutral values only
    presence_penalty: float | None = Field(None, ge=0.0, le=0.0)
    frequency_penalty: float | None = Field(None, ge=0.0, le=0.0)
    best_of: StrictInt | None = Field(None, ge=1, le=1)
    # extensions
    return_attention: StrictBool | AttentionOptionsModel = False


def error_body(
    message: str,
    param: str | None = None,
    code: str | None = None,
    type_: str = "invalid_request_error",
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
