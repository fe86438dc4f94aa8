"""Pydantic request models of the HTTP API (docs/serving.md) and OpenAI's error body.

Requests are strict (a string where a number belongs is a 400, not a silent cast) and reject
unknown fields, except the OpenAI completion fields we accept for client compatibility.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class AttentionOptionsModel(_Strict):
    layers: list[StrictInt] | None = None
    heads: list[StrictInt] | None = None
    aggregation: Literal["none", "mean", "rollout"] = "none"
    encoding: Literal["json", "base64"] = "json"
    decimals: StrictInt = Field(4, ge=0, le=8)


class AttentionRequest(AttentionOptionsModel):
    model: StrictStr | None = None
    text: StrictStr


class NextTokenRequest(_Strict):
    model: StrictStr | None = None
    text: StrictStr
    top_k: StrictInt = Field(10, ge=1)


class ProbeRequest(_Strict):
    model: StrictStr | None = None
    text: StrictStr
    subject: StrictStr | None = None  # the subject's head noun, when the lexicon does not find it
    verb: StrictStr | None = None  # the main verb, when the grammar rules do not find it


class CompletionRequest(_Strict):
    model: StrictStr
    prompt: StrictStr | list[StrictStr]
    max_tokens: StrictInt | None = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=1)
    n: StrictInt = Field(1, ge=1, le=16)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    echo: StrictBool = False
    stop: StrictStr | list[StrictStr] | None = None
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
