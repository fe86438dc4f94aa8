"""The deployment's runtime settings: Ray Serve's `user_config`, defaults written once.

    settings = ServerSettings.from_user_config({"max_batch_size": 8})   # the rest: defaults
    asdict(ServerSettings())          # the @serve.deployment's default user_config

`serving.app` uses the defaults for `@serve.deployment(user_config=...)` and `@serve.batch(...)`,
starts a replica with them and replaces them in `reconfigure`; configs/serve.yaml sets them for
a deployment.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from serving.limits import DEFAULT_ATTENTION_CACHE_BYTES, DEFAULT_MAX_ATTENTION_BYTES

MAX_ONGOING_REQUESTS = 64  # requests Ray Serve hands one replica at once (>= max_batch_size)


@dataclass(frozen=True)
class ServerSettings:
    """One replica's knobs; checked at construction (every error at once, naming each field)."""

    max_batch_size: int = 16  # next-token / attention requests batched into one engine call
    batch_wait_timeout_s: float = 0.005  # how long a batch waits to fill
    max_in_flight: int = 48  # requests inside the app; beyond, 503 with Retry-After
    # a completion (streamed or not) still running after this many seconds ends with a 504
    # (an error event on a stream) and frees its decode slots; None: no limit
    request_timeout_s: float | None = 60.0
    # attention of long texts (docs/serving.md): bytes of recent texts' q and k kept in float16
    # for their next request (0: none), and the most bytes one attention answer may carry
    attention_cache_bytes: int = DEFAULT_ATTENTION_CACHE_BYTES
    max_attention_bytes: int = DEFAULT_MAX_ATTENTION_BYTES

    def __post_init__(self) -> None:
        errors = []
        for name, least in (
            ("max_batch_size", 1),
            ("max_in_flight", 1),
            ("attention_cache_bytes", 0),
            ("max_attention_bytes", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                errors.append(f"{name} must be an integer >= {least}, got {value!r}")
        wait = self.batch_wait_timeout_s
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
            errors.append(f"batch_wait_timeout_s must be a number >= 0, got {wait!r}")
        limit = self.request_timeout_s
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0
        ):
            errors.append(f"request_timeout_s must be a number > 0 or null, got {limit!r}")
        if errors:
            raise ValueError("invalid user_config: " + "; ".join(errors))

    @classmethod
    def from_user_config(cls, config: dict[str, Any] | None) -> ServerSettings:
        """Settings from a deployment's user_config: the fields it names, defaults for the rest;
        ValueError for unknown keys or bad values."""
        config = dict(config or {})
        unknown = sorted(set(config) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"invalid user_config: unknown key(s) {', '.join(unknown)}")
        return cls(**config)


# how long a replica told to stop may take to finish the requests it holds: past the default
# time limit of a completion, so that a drained replica ends every one of them
GRACEFUL_SHUTDOWN_TIMEOUT_S = ServerSettings().request_timeout_s + 5.0
