"""Pydantic request models of the HTTP API (docs/serving.md) and OpenAI's error body.

Requests are strict (a string where a number belongs is a 400, not a silent cast) and reject
unknown fields, except the OpenAI completion fields we accept for client compatibility. Bounds,
defaults and choices come from `serving.limits`, the constants the engine checks, so the OpenAPI
schema (/openapi.json) states the constraints requests meet. Every text field is a `Text`: not
empty, valid Unicode (`serving.text`). What depends on the model (the context window in tokens,
`top_k` and token ids up to the vocabulary, layer and head indices) the engine checks; the
served schema states those bounds too (`serving.openapi`), all but the context, which no JSON
schema can count.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from serving.limits import (
    DEFAULT_DECIMALS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TOP_K,
    MAX_ATTENTION_ROWS,
    MAX_BIAS,
    MAX_DECIMALS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PENALTY,
    MAX_POOL,
    MAX_REPETITION_PENALTY,
    MAX_SEED,
    MAX_STOP,
    MAX_TEMPERATURE,
    MAX_TOP_KEYS,
    MIN_SEED,
    Aggregation,
    Encoding,
)
from serving.text import unicode_error


def _unicode(value: Any) -> Any:
    """A string with a lone surrogate is an `invalid_text` error, named before pydantic's own
    checks (whose `string_unicode` error says less)."""
    error = unicode_error(value) if isinstance(value, str) else None
    if error is not None:
        raise PydanticCustomError("invalid_text", error)
    return value


_Unicode = BeforeValidator(_unicode)


def _integral(value: Any) -> Any:
    """`value` with every float that has no fraction made an int: JSON Schema's "integer" is
    any such number (3 and 3.0 alike), so integer fields take both; a float field takes the int
    as it took the float. Strings and booleans stay what they are (strict)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


# a text field: a non-empty string of valid Unicode (no lone surrogate escapes)
Text = Annotated[StrictStr, Field(min_length=1), _Unicode]
# the probe's named words must hold a word: not only whitespace (str.strip's, see _Strict)
Word = Annotated[StrictStr, Field(min_length=1, pattern=r"\S"), _Unicode]
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
_PROMPT_KINDS = Union[Text, Annotated[list[Text], Field(min_length=1)], TokenIds]  # noqa: UP007
_PROMPT_SCHEMA = Union[_PROMPT_KINDS, Annotated[list[TokenIds], Field(min_length=1)]]  # noqa: UP007
_PROMPT_ADAPTERS = {
    "text": TypeAdapter(Text),
    "texts": TypeAdapter(list[Text]),
    "ids": TypeAdapter(TokenIds),
    "id lists": TypeAdapter(list[TokenIds]),
}


def _prompt(value: Any) -> str | list[str] | list[int] | list[list[int]]:
    """OpenAI's prompt: a text, a list of texts, token ids, or a list of token-id lists; one
    error naming what is wrong (a union would report one error per kind)."""
    if isinstance(value, str):
        kind = "text"
    elif not isinstance(value, list):
        raise PydanticCustomError(
            "prompt_type",
            "must be a string, a list of strings, or token ids (a list of integers "
            "or a list of such lists)",
        )
    elif not value:
        raise PydanticCustomError("empty_list", "prompt must not be an empty list")
    elif isinstance(value[0], list):
        kind = "id lists"
    elif isinstance(value[0], (int, float)) and not isinstance(value[0], bool):
        kind = "ids"
    else:
        kind = "texts"
    return _one_of(kind, value)


def _text_or_ids(value: Any) -> str | list[int]:
    """A text, or the token ids of one (as a prompt's): one error naming what is wrong."""
    if isinstance(value, str):
        return _one_of("text", value)
    if isinstance(value, list):
        return _one_of("ids", value)
    raise PydanticCustomError("text_type", "must be a string or token ids (a list of integers)")


def _one_of(kind: str, value: Any) -> Any:
    """`value` checked as the prompt form `kind`; its first error as the only one."""
    try:
        return _PROMPT_ADAPTERS[kind].validate_python(value, strict=True)
    except ValidationError as err:
        first = err.errors()[0]
        where = "".join(f"[{i}]" for i in first["loc"])
        raise PydanticCustomError(
            first["type"], f"{where}: {first['msg']}" if where else first["msg"]
        ) from None


Prompt = Annotated[Any, PlainValidator(_prompt, json_schema_input_type=_PROMPT_SCHEMA)]
# /v1/attention's text: a string, or token ids (a completion's, to ask for more of its maps)
TextOrIds = Annotated[
    Any,
    PlainValidator(_text_or_ids, json_schema_input_type=Union[Text, TokenIds]),  # noqa: UP007
]


def _listed(value: Any) -> Any:
    """One stop string as a list of one (OpenAI takes a string or a list)."""
    return [value] if isinstance(value, str) else value


_StopList = Annotated[list[Text], Field(max_length=MAX_STOP)]
StopStrings = Annotated[
    _StopList | None,
    BeforeValidator(_listed, json_schema_input_type=StrictStr | _StopList | None),
    # minLength beside anyOf binds the one-string form (and only strings): no empty stop string
    Field(json_schema_extra={"minLength": 1}),
]
Indices = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
# query positions, negative from the end (the served schema bounds them by the context)
Rows = Annotated[list[StrictInt], Field(min_length=1, max_length=MAX_ATTENTION_ROWS)]


class _Strict(BaseModel):
    # python-re: a pattern's \s is str.isspace(), what the engine strips (Rust's regex differs)
    model_config = ConfigDict(strict=True, extra="forbid", regex_engine="python-re")

    @model_validator(mode="before")
    @classmethod
    def _integers(cls, data: Any) -> Any:
        return _integral(data)


def _both(first: str, second: str, first_type: str, second_type: list[str]) -> dict[str, Any]:
    """A JSON schema that holds when both fields are given, not null."""
    return {
        "required": [first, second],
        "properties": {first: {"type": first_type}, second: {"type": second_type}},
    }


class AttentionOptionsModel(_Strict):
    # pool goes with neither rows nor top_keys (the engine says so too: a 400 naming pool)
    model_config = ConfigDict(
        json_schema_extra={
            "not": {
                "anyOf": [
                    _both("pool", "rows", "integer", ["array", "string"]),
                    _both("pool", "top_keys", "integer", ["integer"]),
                ]
            }
        }
    )

    layers: Indices | None = None  # each < the model's layers (the served schema says how many)
    heads: Indices | None = None
    aggregation: Aggregation = "none"
    encoding: Encoding = "json"
    decimals: StrictInt = Field(DEFAULT_DECIMALS, ge=0, le=MAX_DECIMALS)
    # long texts (docs/serving.md): these rows only; each map pooled to a side <= pool; the
    # top_keys largest weights of each row with their key positions (pool goes with neither)
    rows: Rows | Literal["last"] | None = None
    pool: StrictInt | None = Field(None, ge=1, le=MAX_POOL)
    top_keys: StrictInt | None = Field(None, ge=1, le=MAX_TOP_KEYS)


class AttentionRequest(AttentionOptionsModel):
    model: Text | None = None
    text: TextOrIds  # token ids: each below the vocabulary (the served schema says it)


class NextTokenRequest(_Strict):
    model: Text | None = None
    text: Text
    top_k: StrictInt = Field(DEFAULT_TOP_K, ge=1)  # up to the vocabulary


class ProbeRequest(_Strict):
    model: Text | None = None
    text: Text
    subject: Word | None = None  # the subject's head noun, when the lexicon does not find it
    verb: Word | None = None  # the main verb, when the grammar rules do not find it


# a token id as a JSON object key (logit_bias): decimal digits (the served schema bounds them)
TokenKey = Annotated[StrictStr, Field(pattern=r"^(0|[1-9][0-9]{0,9})$")]
Bias = Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS)]
Penalty = Annotated[float, Field(ge=-MAX_PENALTY, le=MAX_PENALTY)]


class _Sampling(_Strict):
    """The sampling fields completions and chat completions share (OpenAI's, vLLM's extras)."""

    model: Text
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: StrictInt = Field(1, ge=1, le=MAX_N)
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    stop: StopStrings = None  # a string is a list of one
    seed: StrictInt | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    user: Annotated[StrictStr, _Unicode] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[TokenKey, Bias] | None = None  # token id -> bias
    # vLLM's extras
    top_k: StrictInt | None = Field(None, ge=-1)  # -1 or 0 (vLLM's "all"): no top-k
    repetition_penalty: float | None = Field(None, gt=0.0, le=MAX_REPETITION_PENALTY)
    min_tokens: StrictInt = Field(0, ge=0)  # up to max_tokens


class CompletionRequest(_Sampling):
    prompt: Prompt  # str | list[str] | list[int] | list[list[int]]
    max_tokens: StrictInt | None = Field(DEFAULT_MAX_TOKENS, ge=0)  # 0: with echo only
    logprobs: StrictInt | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool = False
    best_of: StrictInt | None = Field(None, ge=1, le=MAX_N)  # >= n
    # extensions
    return_attention: StrictBool | AttentionOptionsModel = False


class TextPart(_Strict):
    type: Literal["text"]
    text: Annotated[StrictStr, _Unicode]


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], Field(min_length=1)]  # text parts are joined
    name: Annotated[StrictStr, _Unicode] | None = None


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = Field(None, ge=1)  # OpenAI's older name
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class TokenizeRequest(_Strict):
    model: Text | None = None
    prompt: Annotated[StrictStr, _Unicode]  # any text, also over the context window
    add_special_tokens: StrictBool = True  # vLLM's; this tokenizer adds none either way
    return_token_strs: StrictBool = False


class DetokenizeRequest(_Strict):
    model: Text | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]  # each below the vocabulary


def error_body(
    message: str,
    param: str | None = None,
    code: str | None = None,
    type_: str = "invalid_request_error",
) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
