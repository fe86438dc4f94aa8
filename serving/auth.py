"""Optional API keys, taken the way OpenAI's API and vLLM's `--api-key` take them:
`Authorization: Bearer <key>` (the official `openai` client sends its `api_key` so).

    access = Access.configure(args.get("api_keys"), metrics_require_key=False)  # + $ATTNLM_API_KEY
    app.state.access = access        # read per request by `require_key`, a global dependency

No key configured: every route is open, as without this module. One or more keys (any of them
is accepted): every route needs one, except `GET /health` (load balancers, Ray's own checks),
the viewer page `GET /` (it asks for the key itself) and the API's description (`/openapi.json`,
`/docs`: FastAPI's own routes), and `GET /metrics` unless `metrics_require_key`. A missing or
wrong key is a 401 in OpenAI's error body (code `invalid_api_key`) with `WWW-Authenticate:
Bearer`. Keys are compared in constant time and never written to a log, a metric, an answer or
a repr.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fastapi import Request
from starlette.exceptions import HTTPException

from serving.http import count_rejection

ENV_VAR = "ATTNLM_API_KEY"  # one key, or several separated by commas
OPEN_ROUTES = frozenset({"/health", "/"})


@dataclass(frozen=True)
class Access:
    """Who may call the API: the accepted keys (none: everyone) and whether /metrics needs one.
    Checked at construction, every error at once."""

    keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_require_key: bool = False

    def __post_init__(self) -> None:
        errors = []
        keys = self.keys
        if not isinstance(keys, (tuple, list)) or not all(isinstance(k, str) for k in keys):
            errors.append("api_keys must be a string or a list of strings")
        elif any(not k or k != k.strip() or "," in k for k in keys):
            errors.append("an API key must be non-empty, without spaces around it or commas")
        if not isinstance(self.metrics_require_key, bool):
            errors.append(
                f"metrics_require_key must be a boolean, got {self.metrics_require_key!r}"
            )
        if errors:
            raise ValueError("; ".join(errors))
        object.__setattr__(self, "keys", tuple(dict.fromkeys(keys)))

    @classmethod
    def configure(
        cls,
        api_keys: str | Sequence[str] | None = None,
        metrics_require_key: bool = False,
        environ: Mapping[str, str] = os.environ,
    ) -> Access:
        """The keys configured (a deployment argument) and those of $ATTNLM_API_KEY, together."""
        configured = [api_keys] if isinstance(api_keys, str) else list(api_keys or [])
        from_env = [k.strip() for k in environ.get(ENV_VAR, "").split(",") if k.strip()]
        return cls(tuple(configured + from_env), metrics_require_key)

    @property
    def required(self) -> bool:
        return bool(self.keys)

    def route_needs_key(self, route_path: str) -> bool:
        if not self.keys or route_path in OPEN_ROUTES:
            return False
        return route_path != "/metrics" or self.metrics_require_key

    def accepts(self, authorization: str | None) -> bool:
        """Whether an `Authorization` header holds one of the keys (constant time per key)."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        given = key.strip().encode()
        return any(hmac.compare_digest(given, k.encode()) for k in self.keys)  # no short cut


async def require_key(request: Request) -> None:
    """FastAPI dependency of every route: a 401 unless the request may pass (`app.state.access`;
    open when the deployment set none)."""
    access: Access | None = getattr(request.app.state, "access", None)
    route = getattr(request.scope.get("route"), "path", "")
    if access is None or not access.route_needs_key(route):
        return
    authorization = request.headers.get("authorization")
    if access.accepts(authorization):
        return
    count_rejection(request, 401)
    message = (
        "incorrect API key provided"
        if authorization
        else "this server needs an API key: send the header 'Authorization: Bearer <key>'"
    )
    raise HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})
