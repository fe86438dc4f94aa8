"""A middleware for Ray Serve's HTTP proxy: what a client sees when a replica is lost mid-request,
and OpenAI's error body for what the proxy answers itself.

    RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serving.proxy:middlewares serve run configs/serve.yaml

Ray Serve does not retry a request whose replica dies while serving it (only one that never
reached a replica): its proxy gets `ActorDiedError`, answers nothing, and uvicorn writes a
plain-text `500 Internal Server Error`. The proxy takes Starlette middlewares from the callback
named by that environment variable (read when the proxy starts, so set it where Ray starts);
this one makes it:

- a request whose replica answered nothing: a 503 with `Retry-After: 1` and OpenAI's error body
  (code `replica_unavailable`). Every endpoint of this API is a pure function of its request
  (no state on the server, a seeded completion samples the same tokens), so a client may retry
  any of them, completions included;
- a stream cut after its first event (the replica died while decoding): one last
  `data: {"error": ...}` event (the same code) and `data: [DONE]`, so an SSE client sees an
  error, not a connection dropped mid-chunk; the text it got so far is incomplete;
- an error the proxy writes itself as plain text (e.g. 503 when no replica is up or
  `max_queued_requests` is exceeded, 404 for an unknown route prefix, 408 past
  `request_timeout_s`): the same status and message in OpenAI's body, 503s with `Retry-After`.
"""

from __future__ import annotations

import asyncio

from starlette.middleware import Middleware

from serving.http import dumps, error_type, sse_event
from serving.schemas import error_body

RETRY_AFTER_S = 1
LOST = "the replica serving this request was lost before it answered; retry the request"
CODES = {503: "unavailable", 404: "not_found", 408: "timeout", 429: "overloaded"}


def _json_start(status: int, body: bytes) -> dict:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    return {"type": "http.response.start", "status": status, "headers": headers}


def _error_json(status: int, message: str, code: str | None) -> bytes:
    return dumps(error_body(message, None, code, error_type(status)))


class ReplicaErrors:
    """ASGI middleware around Ray Serve's proxy app (see the module docstring)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = finished = False
        event_stream = False
        held: dict | None = None  # the start of a plain-text error, rewritten with its body
        # started: an answer's start went out; finished: its last body part
        held_body = b""

        async def guarded_send(message) -> None:
            nonlocal started, finished, event_stream, held, held_body
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                content_type = headers.get(b"content-type", b"").decode("latin-1")
                event_stream = content_type.startswith("text/event-stream")
                if message["status"] >= 400 and content_type.startswith("text/plain"):
                    held = message
                    return
            elif message["type"] == "http.response.body":
                finished = not message.get("more_body", False)
                if held is not None:
                    held_body += message.get("body", b"")
                    if not finished:
                        return
                    status = held["status"]
                    code = CODES.get(status)
                    body = _error_json(status, held_body.decode("utf-8", "replace"), code)
                    await send(_json_start(status, body))
                    message = {"type": "http.response.body", "body": body}
            started = True  # something went out: the start of an answer at least
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except asyncio.CancelledError:
            raise  # the client is gone
        except Exception:
            pass  # the proxy logged it; the client gets the answer below
        if not started:
            body = _error_json(503, LOST, "replica_unavailable")
            await send(_json_start(503, body))
            await send({"type": "http.response.body", "body": body})
        elif event_stream and not finished:
            event = sse_event(error_body(LOST, None, "replica_unavailable", "server_error"))
            tail = f"{event}data: [DONE]\n\n".encode()
            await send({"type": "http.response.body", "body": tail})


def middlewares() -> list[Middleware]:
    """The callback of RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH."""
    return [Middleware(ReplicaErrors)]
