"""What goes into and comes out of `serving.engine.Engine`: request parameters (checked at
construction, with the bounds of `serving.limits`), results, and `EngineError`.

Plain dataclasses without torch, Ray or pydantic: the HTTP layer builds the parameters from its
request models and writes the results as JSON.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from serving.limits import (
    AGGREGATIONS,
    DEFAULT_DECIMALS,
    DEFAULT_MAX_TOKENS,
    ENCODINGS,
    MAX_ATTENTION_ROWS,
    MAX_BIAS,
    MAX_DECIMALS,
    MAX_LOGPROBS,
    MAX_N,
    MAX_PENALTY,
    MAX_POOL,
    MAX_SEED,
    MAX_TOP_KEYS,
    MIN_SEED,
)


class EngineError(ValueError):
    """A request the engine cannot serve; the HTTP layer answers it with OpenAI's error body."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def invalid(message: str, param: str) -> EngineError:
    return EngineError(message, param=param, code="invalid_value")


def conflict(message: str, param: str) -> EngineError:
    """A 400 for values each in bounds that do not go together (no JSON schema states it)."""
    return EngineError(message, param=param, code="conflicting_parameters")


# -- request parameters ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionOptions:
    """What of the attention map to return; checked at construction (ranges by the engine)."""

    layers: list[int] | None = None  # layer indices, None = all
    heads: list[int] | None = None  # head indices, None = all
    aggregation: str = "none"  # "none" (per head) | "mean" (over heads) | "rollout"
    encoding: str = "json"  # "json" (nested lists) | "base64" (float16 bytes)
    decimals: int = DEFAULT_DECIMALS  # rounding of json values, 0..MAX_DECIMALS
    # long texts (serving.attention_select): query rows (positions, negative from the end, or
    # "last"), maps average-pooled to a side <= pool, or the top_keys largest weights per row
    rows: list[int] | str | None = None
    pool: int | None = None
    top_keys: int | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                not isinstance(value, (list, tuple))
                or not value
                or not all(is_int(i) for i in value)
            ):
                raise invalid(f"{name} must be a non-empty list of integers or null", name)
            object.__setattr__(self, name, list(value))
        if self.aggregation not in AGGREGATIONS:
            raise invalid(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {self.aggregation!r}",
                "aggregation",
            )
        if self.encoding not in ENCODINGS:
            raise invalid(
                f"encoding must be one of {', '.join(ENCODINGS)}; got {self.encoding!r}", "encoding"
            )
        if not is_int(self.decimals) or not 0 <= self.decimals <= MAX_DECIMALS:
            raise invalid(
                f"decimals must be an integer in 0..{MAX_DECIMALS}, got {self.decimals!r}",
                "decimals",
            )
        rows = self.rows
        if rows is not None and rows != "last":
            if (
                not isinstance(rows, (list, tuple))
                or not 1 <= len(rows) <= MAX_ATTENTION_ROWS
                or not all(is_int(i) for i in rows)
            ):
                raise invalid(
                    f'rows must be "last" or a list of 1..{MAX_ATTENTION_ROWS} positions '
                    "(negative: from the end)",
                    "rows",
                )
            object.__setattr__(self, "rows", list(rows))
        for name, top in (("pool", MAX_POOL), ("top_keys", MAX_TOP_KEYS)):
            value = getattr(self, name)
            if value is not None and not (is_int(value) and 1 <= value <= top):
                raise invalid(f"{name} must be an integer in 1..{top}, got {value!r}", name)
        if self.pool is not None and (self.rows is not None or self.top_keys is not None):
            raise invalid("pool pools whole maps: it goes with neither rows nor top_keys", "pool")


@dataclass(frozen=True)
class AttentionQuery:
    """One text (or its token ids) and what to return of its attention map (`Engine.attention`
    takes either these or texts plus options)."""

    text: str | list[int]
    options: AttentionOptions = field(default_factory=AttentionOptions)


@dataclass(frozen=True)
class Deadline:
    """When a request must have ended (`time.monotonic()` seconds) and the limit that set it; past
    it, the request ends with a 504 (`error`)."""

    at: float
    limit_s: float

    @classmethod
    def after(cls, limit_s: float) -> Deadline:
        return cls(time.monotonic() + limit_s, limit_s)

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def check(self) -> None:
        """Raise `error()` once the deadline has passed."""
        if time.monotonic() >= self.at:
            raise self.error()

    def error(self) -> EngineError:
        return EngineError(
            f"the request did not finish within the server's time limit of {self.limit_s:g} s; "
            "ask for fewer tokens, or retry",
            code="timeout",
            status=504,
        )


@dataclass(frozen=True)
class CompletionParams:
    """OpenAI legacy-completions sampling parameters and vLLM's extras; checked at construction
    (`max_tokens`'s upper limit and `logit_bias` ids against the vocabulary by the engine)."""

    # 0..the engine's limit (0: score the prompt, with echo only); the context may end a row sooner
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = None  # nucleus sampling, in (0, 1]
    top_k: int | None = None  # keep the k most likely tokens, >= 1
    stop: Sequence[str] = ()  # the text ends before the first occurrence of any of these
    seed: int | None = None  # reproducible sampling
    n: int = 1  # samples, 1..MAX_N, decoded as one batch
    echo: bool = False  # prepend the prompt to each choice's text
    logprobs: int | None = None  # the chosen token's and this many (0..MAX_LOGPROBS) top logprobs
    attention: AttentionOptions | None = None  # return the map over prompt + completion
    deadline: Deadline | None = None  # stop decoding past it, with a 504 EngineError
    frequency_penalty: float = 0.0  # -MAX_PENALTY..MAX_PENALTY, OpenAI's
    presence_penalty: float = 0.0  # -MAX_PENALTY..MAX_PENALTY, OpenAI's
    repetition_penalty: float = 1.0  # > 0, vLLM's (1: none)
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> -100..100
    min_tokens: int = 0  # vLLM's: no end-of-text (or stop string) before this many tokens
    best_of: int | None = None  # >= n candidates; the n of best mean logprob are returned

    @property
    def candidates(self) -> int:
        """Rows decoded: best_of, or n."""
        return self.n if self.best_of is None else self.best_of

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise invalid("stop must be a non-empty string or a list of them", "stop")
        object.__setattr__(self, "stop", tuple(stop))
        if not is_int(self.max_tokens) or self.max_tokens < 0:
            raise invalid(
                f"max_tokens must be an integer >= 0, got {self.max_tokens!r}", "max_tokens"
            )
        if not is_number(self.temperature) or not (
            math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise invalid(f"temperature must be >= 0, got {self.temperature!r}", "temperature")
        if self.top_p is not None and not (is_number(self.top_p) and 0 < self.top_p <= 1):
            raise invalid(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise invalid(f"top_k must be an integer >= 1, got {self.top_k!r}", "top_k")
        if self.seed is not None and not (is_int(self.seed) and MIN_SEED <= self.seed <= MAX_SEED):
            raise invalid(
                f"seed must be an integer in {MIN_SEED}..{MAX_SEED}, got {self.seed!r}", "seed"
            )
        if not is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise invalid(f"n must be an integer in 1..{MAX_N}, got {self.n!r}", "n")
        if not isinstance(self.echo, bool):
            raise invalid(f"echo must be a boolean, got {self.echo!r}", "echo")
        if self.logprobs is not None and (
            not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise invalid(
                f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}",
                "logprobs",
            )
        if self.attention is not None and not isinstance(self.attention, AttentionOptions):
            raise invalid("attention must be AttentionOptions or None", "attention")
        if self.deadline is not None and not isinstance(self.deadline, Deadline):
            raise invalid("deadline must be a Deadline or None", "deadline")
        self._check_extras()

    def _check_extras(self) -> None:
        """The penalties, logit_bias, min_tokens, best_of and max_tokens 0."""
        if self.max_tokens == 0 and not self.echo:
            raise conflict(
                "max_tokens 0 scores the prompt only: set echo (with logprobs for the scores), "
                "or ask for at least 1 token",
                "max_tokens",
            )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise invalid(
                    f"{name} must be in -{MAX_PENALTY:g}..{MAX_PENALTY:g}, got {value!r}", name
                )
        if not is_number(self.repetition_penalty) or not (
            math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0
        ):
            raise invalid(
                f"repetition_penalty must be > 0, got {self.repetition_penalty!r}",
                "repetition_penalty",
            )
        bias = self.logit_bias if self.logit_bias is not None else {}
        if not isinstance(bias, Mapping):
            raise invalid("logit_bias must map token ids to biases", "logit_bias")
        parsed = {}
        for key, value in bias.items():
            token = int(key) if isinstance(key, str) and key.isdigit() else key
            if not is_int(token) or token < 0:
                raise invalid(f"logit_bias: {key!r} is not a token id", "logit_bias")
            if not is_number(value) or not -MAX_BIAS <= value <= MAX_BIAS:
                raise invalid(
                    f"logit_bias: the bias of {key} must be in -{MAX_BIAS}..{MAX_BIAS}, "
                    f"got {value!r}",
                    "logit_bias",
                )
            parsed[token] = float(value)
        object.__setattr__(self, "logit_bias", parsed)
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise invalid(
                f"min_tokens must be an integer >= 0, got {self.min_tokens!r}", "min_tokens"
            )
        if self.min_tokens > self.max_tokens:
            raise conflict(
                f"min_tokens ({self.min_tokens}) must be at most max_tokens ({self.max_tokens})",
                "min_tokens",
            )
        if self.best_of is not None:
            if not is_int(self.best_of) or not 1 <= self.best_of <= MAX_N:
                raise invalid(
                    f"best_of must be an integer in 1..{MAX_N}, got {self.best_of!r}", "best_of"
                )
            if self.best_of < self.n:
                raise conflict(f"best_of ({self.best_of}) must be at least n ({self.n})", "best_of")
            if self.attention is not None and self.best_of > self.n:
                raise conflict("best_of with return_attention is not supported", "best_of")


# -- results -----------------------------------------------------------------------------------------
@dataclass
class NextToken:
    tokens: list[str]  # the text's tokens, each decoded alone
    token_ids: list[int]
    top: list[dict]  # {"token", "token_id", "prob", "logprob"}, most likely first


@dataclass
class AttentionMap:
    tokens: list[str]
    token_ids: list[int]
    n_layers: int  # of the model
    n_heads: int
    layers: list[int]  # the selected ones, in the order of the map's first axis
    heads: list[int]
    aggregation: str
    attention: dict  # encode_array: {"encoding", "shape", "dtype", "data"}
    rows: list[int] | None = None  # with `rows`: the query positions of the rows, in order
    pool_block: int | None = None  # with `pool`: tokens per side of each pooled cell
    keys: dict | None = None  # with `top_keys`: the key positions of the weights (int32)
    cache: str | None = None  # "hit" | "miss" in the replica's q/k cache; None: no cache

    def body(self) -> dict:
        """The JSON fields: those of the options asked for only (an old request's answer has
        the fields it always had); `cache` goes to Server-Timing, not here."""
        body = {
            "tokens": self.tokens,
            "token_ids": self.token_ids,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "layers": self.layers,
            "heads": self.heads,
            "aggregation": self.aggregation,
            "attention": self.attention,
        }
        for name in ("rows", "pool_block", "keys"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        return body


@dataclass
class Choice:
    text: str
    index: int
    finish_reason: str  # "stop" (end-of-text or a stop string) | "length"
    logprobs: dict | None  # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    tokens: list[str] | None = None  # prompt + generated tokens, with attention only
    attention: dict | None = None  # AttentionMap's fields over those tokens


@dataclass
class Completion:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int  # every sampled token of every choice (end-of-text included)


@dataclass
class CompletionDelta:
    index: int  # the choice
    text: str  # new text of the choice (the prompt first, with echo)
    finish_reason: str | None  # set on the choice's last delta
    logprobs: dict | None  # of the tokens whose text starts in this delta
    tokens: list[str] | None = None  # on the last delta, with attention only
    attention: dict | None = None  # on the last delta, with attention only


@dataclass
class ProbeResult:
    tokens: list[str]  # the text's tokens
    token_ids: list[int]
    subject: dict  # {"text", "token_positions"} (indices into tokens)
    verb: dict  # {"as_written", "correct", "wrong", "token_position"}
    number: str | None  # the subject's number, None when its noun is not in the lexicon
    distance: int  # tokens from the subject's last token to the verb
    agreement: dict  # {"verdict": "correct" | "wrong" | None, "correct_logprob", "wrong_logprob"}
    attention_to_subject: list[list[float]] | None  # [layer][head]; None for an LSTM
    best_head: dict | None  # {"layer", "head", "weight"}
