"""The engine's parameters of an HTTP request: `CompletionParams` of a completion or a chat
completion request (`serving.schemas`), the prompts of OpenAI's four `prompt` forms, the
attention options of `return_attention`. Defaults that differ between the API and the engine
are settled here: a `top_p` of 1 is no nucleus sampling, a null penalty is 0.
"""

from __future__ import annotations

from typing import Any

from serving.limits import DEFAULT_MAX_TOKENS
from serving.params import AttentionOptions, CompletionParams, Deadline, invalid
from serving.schemas import (
    AttentionOptionsModel,
    ChatCompletionRequest,
    CompletionRequest,
)


def attention_options(source: AttentionOptionsModel | bool | None) -> AttentionOptions | None:
    if source is None or source is False:
        return None
    if source is True:
        return AttentionOptions()
    return AttentionOptions(
        layers=source.layers,
        heads=source.heads,
        aggregation=source.aggregation,
        encoding=source.encoding,
        decimals=source.decimals,
        rows=source.rows,
        pool=source.pool,
        top_keys=source.top_keys,
    )


def _sampling(request: CompletionRequest | ChatCompletionRequest) -> dict[str, Any]:
    """The fields completions and chat completions share, as CompletionParams arguments."""
    return {
        "temperature": request.temperature,
        "top_p": None if request.top_p >= 1.0 else request.top_p,
        "top_k": None if request.top_k is not None and request.top_k < 1 else request.top_k,
        "stop": request.stop,
        "seed": request.seed,
        "n": request.n,
        "frequency_penalty": request.frequency_penalty or 0.0,
        "presence_penalty": request.presence_penalty or 0.0,
        "repetition_penalty": 1.0
        if request.repetition_penalty is None
        else request.repetition_penalty,
        "logit_bias": {int(k): v for k, v in (request.logit_bias or {}).items()},
        "min_tokens": request.min_tokens,
    }


def _deadline(timeout_s: float | None) -> Deadline | None:
    return None if timeout_s is None else Deadline.after(timeout_s)


def completion_params(
    request: CompletionRequest, timeout_s: float | None = None
) -> CompletionParams:
    """The engine's parameters of a completion request (`max_tokens` null: the default), with
    a deadline `timeout_s` from now (None: none)."""
    return CompletionParams(
        max_tokens=DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens,
        echo=request.echo,
        logprobs=request.logprobs,
        best_of=request.best_of,
        attention=attention_options(request.return_attention),
        deadline=_deadline(timeout_s),
        **_sampling(request),
    )


def chat_params(
    request: ChatCompletionRequest, max_tokens: int, timeout_s: float | None = None
) -> CompletionParams:
    """The engine's parameters of a chat completion: `max_completion_tokens` (or the older
    `max_tokens`), else `max_tokens`, the engine's limit (the context ends a row sooner)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(request, name)
        if value is not None and value > max_tokens:
            raise invalid(f"{name} must be at most {max_tokens}, got {value}", name)
    asked = request.max_completion_tokens or request.max_tokens
    return CompletionParams(
        max_tokens=max_tokens if asked is None else asked,
        deadline=_deadline(timeout_s),
        **_sampling(request),
    )


def prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """The prompts of a request, each a text or token ids (OpenAI's four forms of `prompt`)."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)
