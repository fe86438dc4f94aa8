"""The API's contract as `/openapi.json` states it: response models of every endpoint, the error
statuses each route can answer (all with OpenAI's error body), and the bounds that depend on
the served model.

    @app.post("/v1/next-token", responses=responses(NextTokenResponse, *POST_ERRORS))
    app.openapi = contract(app, ModelBounds.of(engine), access)   # what /openapi.json serves

The request models (`serving.schemas`) state every bound known without a model. A replica knows
its model, so the schema it serves also states `top_k` up to the vocabulary, token ids below
it, layer and head indices, `max_tokens` up to the engine's limit, and, in words, the context
window (a JSON schema cannot count tokens: a text over it is a 400 `context_length_exceeded`);
with API keys configured (`serving.auth`), the bearer scheme and a 401 on the routes that need
one. FastAPI's 422 (never answered: validation errors are 400s) is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict

from serving.auth import Access
from serving.limits import Aggregation, Encoding

# -- response bodies -----------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str  # "invalid_request_error" (4xx) | "server_error" (5xx)
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class TopToken(BaseModel):
    token: str
    token_id: int
    prob: float
    logprob: float


class NextTokenResponse(BaseModel):
    model: str
    tokens: list[str]
    token_ids: list[int]
    top: list[TopToken]  # most likely first


class EncodedAttention(BaseModel):
    encoding: Encoding
    shape: list[int]
    dtype: Literal["float32", "float16"]
    data: list[Any] | str  # nested lists of numbers ("json") | base64 float16 bytes


class EncodedKeys(BaseModel):
    encoding: Encoding
    shape: list[int]
    dtype: Literal["int32"]
    data: list[Any] | str  # nested lists of integers ("json") | base64 little-endian int32


class AttentionBody(BaseModel):
    tokens: list[str]
    token_ids: list[int]
    n_layers: int
    n_heads: int
    layers: list[int]
    heads: list[int]
    aggregation: Aggregation
    attention: EncodedAttention
    rows: list[int] | None = None  # with `rows`: the query position of each row
    pool_block: int | None = None  # with `pool`: tokens per side of a pooled cell
    keys: EncodedKeys | None = None  # with `top_keys`: the key position of each weight


class AttentionResponse(AttentionBody):
    model: str


class ProbeSubject(BaseModel):
    text: str
    token_positions: list[int]


class ProbeVerb(BaseModel):
    as_written: str
    correct: str
    wrong: str | None  # None: the verb marks no number ("jumped")
    token_position: int


class ProbeAgreement(BaseModel):
    verdict: Literal["correct", "wrong"] | None
    correct_logprob: float
    wrong_logprob: float | None


class BestHead(BaseModel):
    layer: int
    head: int
    weight: float


class ProbeResponse(BaseModel):
    model: str
    tokens: list[str]
    token_ids: list[int]
    subject: ProbeSubject
    verb: ProbeVerb
    number: Literal["singular", "plural"] | None
    distance: int
    agreement: ProbeAgreement
    attention_to_subject: list[list[float]] | None  # [layer][head]; None for an LSTM
    best_head: BestHead | None


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"]
    attention: AttentionBody | None = None  # with return_attention only
    tokens: list[str] | None = None  # with return_attention only


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    arch: str
    attention: str | None  # None: no attention maps (an LSTM)
    n_layers: int
    n_heads: int | None
    context_length: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TokenizerInfo(BaseModel):
    """vLLM's /tokenizer_info: the tokenizer config's fields, these always."""

    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    chat_template: str | None  # None: no chat completions
    model_max_length: int
    vocab_size: int


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None  # with return_token_strs only


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok"]
    model: str
    replica: str
    node_id: str | None


# -- statuses per route ----------------------------------------------------------------------------
ERRORS = {
    400: "a bad request: a field out of its bounds, bad text, a text over the context window, "
    "an attention answer over the server's `max_attention_bytes` (`answer_too_large`)",
    401: "no API key, or a wrong one",
    404: "no such model (`model` names another one); for chat completions also a model "
    "without a chat template (`chat_template_missing`)",
    413: "the request body is over the server's limit",
    500: "an unexpected error; the message carries the request id the server logged",
    503: "the replica is at capacity or was lost: retry after `Retry-After` seconds",
    504: "the completion ran past the server's time limit (`request_timeout_s`)",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
POST_ERRORS = (400, 404, 413, 500, 503)
GET_ERRORS = (500, 503)
EVENT_STREAM = {  # before OpenAPI 3.2, the schema of an event stream is that of one event
    "text/event-stream": {
        "schema": {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": "with `stream: true`: one chunk in OpenAI's format (JSON), or "
                    'an error (`{"error": ...}`); the last event is `[DONE]`',
                },
                "event": {"type": "string"},
            },
        }
    }
}


def error_entry(status: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"model": ErrorResponse, "description": ERRORS[status]}
    if status == 503:
        entry["headers"] = RETRY_AFTER
    return entry


def responses(ok: type[BaseModel] | None, *statuses: int, **ok_extra: Any) -> dict[int, Any]:
    """A route's `responses=`: the 200 body (`ok`) and the errors it can answer."""
    table: dict[int, Any] = {status: error_entry(status) for status in statuses}
    if ok is not None or ok_extra:
        table[200] = {**({"model": ok} if ok is not None else {}), **ok_extra}
    return table


# -- the served contract -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelBounds:
    """What of the request bounds depends on the served model."""

    model_name: str  # the one `model` a request may name
    vocab_size: int
    n_layer: int
    n_head: int
    max_tokens: int  # the largest `max_tokens`
    context_length: int  # tokens; no JSON schema can state it as a bound

    @classmethod
    def of(cls, engine) -> ModelBounds:
        config = engine.config
        return cls(
            engine.model_name,
            engine.tokenizer.vocab_size,
            config.n_layer,
            config.n_head,
            engine.max_tokens_limit,
            engine.max_context,
        )


def _walk(schema: Any):
    """Every dict inside a JSON schema, itself first."""
    if isinstance(schema, dict):
        yield schema
        for value in schema.values():
            yield from _walk(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from _walk(value)


def _bound_integers(schema: dict, maximum: int) -> None:
    for node in _walk(schema):
        if node.get("type") == "integer":
            node["maximum"] = maximum


def digits_below(n: int) -> str:
    """A regular expression of the decimal numbers 0..n-1 (no leading zeros), n >= 1."""
    top = str(n - 1)
    options = ["0"] if n > 1 else []
    for length in range(1, len(top)):  # shorter numbers: any digits
        options.append("[1-9]" + ("[0-9]" * (length - 1)))
    for i, digit in enumerate(top):  # as long as n - 1: smaller at position i, same before it
        low = "1" if i == 0 else "0"
        if digit > low:
            options.append(f"{top[:i]}[{low}-{int(digit) - 1}]" + "[0-9]" * (len(top) - i - 1))
    options.append(top)
    return "^(" + "|".join(dict.fromkeys(options)) + ")$"


def _state_bounds(schemas: dict[str, Any], bounds: ModelBounds) -> None:
    context = (
        f" At most {bounds.context_length} tokens (the context window); beyond, a 400 "
        "`context_length_exceeded`."
    )
    for name, props in ((n, s.get("properties", {})) for n, s in schemas.items()):
        if "text" in props and name.endswith("Request"):
            props["text"]["description"] = "A non-empty text, valid Unicode." + context
        if "model" in props and name.endswith("Request"):  # another name is a 404
            for node in _walk(props["model"]):
                if node.get("type") == "string":
                    node["enum"] = [bounds.model_name]
        if name in ("AttentionOptionsModel", "AttentionRequest"):
            _bound_integers(props["layers"], bounds.n_layer - 1)
            _bound_integers(props["heads"], bounds.n_head - 1)
            for node in _walk(props["rows"]):  # positions, negative from the end
                if node.get("type") == "integer":
                    node["minimum"], node["maximum"] = (
                        -bounds.context_length,
                        bounds.context_length - 1,
                    )
    attention_text = schemas["AttentionRequest"]["properties"]["text"]
    _bound_integers(attention_text, bounds.vocab_size - 1)
    attention_text["description"] = (
        "A non-empty text, valid Unicode, or its token ids (each below the vocabulary size, "
        f"{bounds.vocab_size}: a completion's `token_ids`, for more of its maps)." + context
    )
    _bound_integers(schemas["NextTokenRequest"]["properties"]["top_k"], bounds.vocab_size)
    _bound_integers(schemas["DetokenizeRequest"]["properties"]["tokens"], bounds.vocab_size - 1)
    chat = schemas["ChatCompletionRequest"]["properties"]
    for props in (chat, schemas["CompletionRequest"]["properties"]):
        for node in _walk(props["logit_bias"]):
            if "patternProperties" in node:  # token id -> bias: ids below the vocabulary
                (bias,) = node.pop("patternProperties").values()
                node["propertyNames"] = {"pattern": digits_below(bounds.vocab_size)}
                node["additionalProperties"] = bias
        _bound_integers(props["min_tokens"], bounds.max_tokens)
    _bound_integers(chat["max_tokens"], bounds.max_tokens)
    _bound_integers(chat["max_completion_tokens"], bounds.max_tokens)
    completion = schemas["CompletionRequest"]["properties"]
    _bound_integers(completion["max_tokens"], bounds.max_tokens)
    _bound_integers(completion["prompt"], bounds.vocab_size - 1)
    completion["prompt"]["description"] = (
        "A text, a list of texts, token ids (each below the vocabulary size, "
        f"{bounds.vocab_size}), or a list of token-id lists." + context
    )


def _require_keys(spec: dict[str, Any], access: Access) -> None:
    spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for path, operations in spec["paths"].items():
        if not access.route_needs_key(path):
            continue
        for operation in operations.values():
            operation["security"] = [{"bearer": []}]
            operation["responses"]["401"] = {
                "description": ERRORS[401],
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
                },
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
            }


def contract(app: FastAPI, bounds: ModelBounds, access: Access):
    """The `app.openapi` of a replica: FastAPI's schema with its 422s left out, the model's
    bounds and, when keys are required, the bearer scheme. Built once, on first use."""
    built: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not built:
            spec = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                servers=app.servers or None,
            )
            for operations in spec["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            schemas = spec["components"]["schemas"]
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            _state_bounds(schemas, bounds)
            if access.required:
                _require_keys(spec, access)
            built.update(spec)
        return built

    return openapi
