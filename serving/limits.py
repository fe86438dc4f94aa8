"""Every request limit and default of the API, written once.

The engine's parameter checks (`serving.params`) and the HTTP layer's pydantic models
(`serving.schemas`, whose bounds the OpenAPI schema at /openapi.json states) both import these;
nothing else writes them. Limits that depend on the model (the context window, the vocabulary)
are the engine's, read from the artifact.
"""

from __future__ import annotations

from typing import Literal, get_args

Aggregation = Literal["none", "mean", "rollout"]  # per head | mean over heads | attention rollout
Encoding = Literal["json", "base64"]  # nested lists | little-endian float16 bytes
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
ENCODINGS: tuple[str, ...] = get_args(Encoding)

DEFAULT_DECIMALS = 4  # rounding of "json"-encoded attention values
MAX_DECIMALS = 8
DEFAULT_TOP_K = 10  # next-token alternatives
DEFAULT_MAX_TOKENS = 16  # tokens per completion (OpenAI's default)
MAX_N = 16  # samples per completion request
MAX_LOGPROBS = 5  # alternatives per token, as OpenAI's legacy completions
MAX_PENALTY = 2.0  # frequency_penalty and presence_penalty in -2..2 (OpenAI's range)
MAX_BIAS = 100  # logit_bias values in -100..100 (OpenAI's range)
MAX_REPETITION_PENALTY = 2.0**31  # HTTP only: a bound for the schema; the engine takes any > 0
# seeds: integers exact as JSON numbers everywhere (JavaScript, float-based JSON tools)
MIN_SEED, MAX_SEED = -(2**53 - 1), 2**53 - 1

# HTTP only: the engine itself takes any number of stop strings and any temperature >= 0
MAX_STOP = 4  # stop strings per completion request (OpenAI's limit)
MAX_TEMPERATURE = 2.0  # OpenAI's range

# attention at scale (docs/serving.md, "Long texts"): what one request may select, and the
# replica's defaults for the bytes of one answer and of its cache of texts' q and k
MAX_ATTENTION_ROWS = 4096  # query positions listed in `rows`
MAX_POOL = 4096  # `pool`: the side of each pooled map
MAX_TOP_KEYS = 256  # `top_keys`: weights kept per query row
DEFAULT_MAX_ATTENTION_BYTES = 64 << 20  # over it: 400 answer_too_large, naming what would fit
DEFAULT_ATTENTION_CACHE_BYTES = 256 << 20  # ~6 texts of 1,024 tokens at GPT-2 124M's shape
