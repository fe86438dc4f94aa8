"""The Ray Serve application: one deployment, a FastAPI ingress in front of `serving.engine.Engine`.

    serve run configs/serve.yaml              # artifact, replicas, host/port in the config file
    serve run serving.app:build_app artifact=artifacts/tiny

Endpoints (docs/serving.md): POST /v1/completions (OpenAI's shape, SSE streaming), POST
/v1/next-token, POST /v1/attention, POST /v1/probe, GET /v1/models, GET /health, GET /metrics,
GET / (viewer).
Next-token and attention forwards from concurrent requests are batched with `@serve.batch`
(size and wait in `user_config`). Every bad request answers a 4xx with OpenAI's error body;
requests beyond `max_in_flight` answer 503 with Retry-After.
"""

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine import AttentionOptions, CompletionParams, Engine, EngineError
from serving.metrics import ServerMetrics
from serving.schemas import (
    AttentionOptionsModel,
    AttentionRequest,
    CompletionRequest,
    NextTokenRequest,
    ProbeRequest,
    error_body,
)

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
IDLE_S = 0.002  # a replica with no request for this long is idle (see AttnLMServer._alone)
MAX_DECODE_THREADS = 64  # = max_ongoing_requests in configs/serve.yaml


class JSON(JSONResponse):
    """JSON through orjson: numpy arrays (the engine's "json"-encoded attention maps) are written
    as nested lists without passing through Python floats; a 27-token map of 6 layers x 6 heads
    takes ~0.4 ms instead of ~5 ms with `json.dumps` of nested lists."""

    def render(self, content: Any) -> bytes:
        return dumps(content)


def dumps(content: Any) -> bytes:
    """orjson bytes of `content`, numpy arrays included (NaN/inf would become null)."""
    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


class Timed(NamedTuple):
    """An endpoint's JSON content and the seconds its engine call took (Server-Timing)."""

    content: Any
    engine_s: float


def _timed(fn, *args) -> tuple[Any, float]:
    """fn(*args) and the seconds it took, measured where it runs (event loop or thread)."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSON:
    type_ = "invalid_request_error" if status < 500 else "server_error"
    return JSON(error_body(message, param, code, type_), status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: 413 for request bodies over `max_bytes` (Content-Length or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._reject(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope, receive, send) -> None:
        response = error_response(
            413, f"request body exceeds {self.max_bytes} bytes", code="body_too_large"
        )
        await response(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class ActiveRequests:
    """ASGI middleware counting the HTTP requests inside the app, from their first byte (before
    the body is read) until the last byte of the answer (a stream included)."""

    count = 0  # one replica per process: class attributes are the replica's
    last_exit = 0.0  # time.monotonic() when a request last left

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ActiveRequests.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            ActiveRequests.count -= 1
            ActiveRequests.last_exit = time.monotonic()


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body" and not isinstance(p, int)]
    return ".".join(parts) or None


def create_app(max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(
        title="attnlm", description="Completions, next-token and attention maps", version="0.1.0"
    )

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON", code="invalid_json")
        param = _param_of(tuple(first.get("loc", ())))
        message = first.get("msg", "invalid request")
        if first.get("type") == "extra_forbidden":
            message = f"unknown field {param!r}"
        elif first.get("type") == "missing":
            message = f"missing required field {param!r}"
        else:
            message = f"{param}: {message}" if param else message
        return error_response(400, message, param=param, code=first.get("type"))

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(exc.status, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
        )

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(ActiveRequests)  # added last: the outermost, sees requests first
    return app


app = create_app(int(os.environ.get("ATTNLM_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)))


def _attention_options(source: AttentionOptionsModel | bool | None) -> AttentionOptions | None:
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
    )


def _attention_dict(result) -> dict[str, Any]:
    return {
        "tokens": result.tokens,
        "token_ids": result.token_ids,
        "n_layers": result.n_layers,
        "n_heads": result.n_heads,
        "layers": result.layers,
        "heads": result.heads,
        "aggregation": result.aggregation,
        "attention": result.attention,
    }


def _replica_name() -> str:
    """This replica's id (reported by /health, to tell replicas apart), or "local" outside Serve."""
    try:
        context = serve.get_replica_context()
    except Exception:  # not inside a Serve replica
        return "local"
    replica_id = getattr(context, "replica_id", None)
    return getattr(replica_id, "unique_id", None) or str(replica_id or "local")


def _node_id() -> str | None:
    """The id of the Ray node this replica runs on (reported by /health), or None outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    health_check_period_s=10,
    user_config={"max_batch_size": 16, "batch_wait_timeout_s": 0.005, "max_in_flight": 48},
)
@serve.ingress(app)
class AttnLMServer:
    def __init__(
        self,
        artifact: str,
        device: str | None = None,
        dtype: str | None = None,
        compile: bool = False,
    ) -> None:
        self.engine = Engine(artifact, device=device, dtype=dtype, compile=compile)
        self.created = int(time.time())
        self.max_in_flight = 48
        self.in_flight = 0
        self.replica = _replica_name()
        self.node_id = _node_id()
        self.metrics = ServerMetrics()
        # Completion threads mostly wait for the engine's shared decode steps: a pool of their
        # own, as large as the requests a replica takes, so that all of them decode together
        # (asyncio's default pool has min(32, CPUs + 4) threads).
        self._decode_pool = ThreadPoolExecutor(max_workers=MAX_DECODE_THREADS)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: batch size and wait of the batched forwards, the in-flight bound."""
        self._next_token_batch.set_max_batch_size(int(config.get("max_batch_size", 16)))
        self._next_token_batch.set_batch_wait_timeout_s(
            float(config.get("batch_wait_timeout_s", 0.005))
        )
        self._attention_batch.set_max_batch_size(int(config.get("max_batch_size", 16)))
        self._attention_batch.set_batch_wait_timeout_s(
            float(config.get("batch_wait_timeout_s", 0.005))
        )
        self.max_in_flight = int(config.get("max_in_flight", 48))

    # -- plumbing ---------------------------------------------------------------------------------
    async def _in_decode_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._decode_pool, fn, *args)

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.engine.model_name:
            raise EngineError(
                f"the model {name!r} does not exist; this server serves {self.engine.model_name!r}",
                param="model",
                code="model_not_found",
                status=404,
            )

    async def _admit(self, endpoint: str, work) -> Response:
        """Count, time and bound a request; turn EngineError into its 4xx response.

        Non-streamed answers carry a `Server-Timing` header: `app` is the time inside the
        replica, `engine` (next-token, attention, probe) the engine call that served it (a
        batched forward's whole time for each request in the batch)."""
        self.metrics.request(endpoint)
        if self.in_flight >= self.max_in_flight:
            self.metrics.error(endpoint, 503)
            return error_response(
                503,
                f"server is at capacity ({self.max_in_flight} requests in flight); retry shortly",
                code="overloaded",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        start = time.perf_counter()
        try:
            result = await work()
        except EngineError as err:
            self.metrics.error(endpoint, err.status)
            return error_response(err.status, str(err), param=err.param, code=err.code)
        finally:
            self.in_flight -= 1
            elapsed = time.perf_counter() - start
            self.metrics.latency(endpoint, elapsed)
        if isinstance(result, StreamingResponse):
            return result
        timing = f"app;dur={1e3 * elapsed:.3f}"
        if isinstance(result, Timed):
            timing = f"engine;dur={1e3 * result.engine_s:.3f}, {timing}"
            result = result.content
        response = result if isinstance(result, Response) else JSON(result)
        response.headers["Server-Timing"] = timing
        return response

    # -- batched forwards ---------------------------------------------------------------------------
    def _alone(self) -> bool:
        """True when this request is the only HTTP request inside the replica's app (counted
        from before its body is read, streams until their end) and the replica was idle before
        it (no request left in the last `IDLE_S`). Its next-token / attention forward then runs
        at once on the event loop: no batch wait (nothing to batch with) and no thread hop
        (nothing to keep the loop free for); requests arriving meanwhile wait at most that one
        forward. Under load requests follow each other closely and always take the batched path
        (without the idle condition, a request that happened to find the app empty between two
        batches blocked the loop and cut concurrency-32 throughput by ~15 %). Measured at
        concurrency 1 (bench/serve_load.py, small shape): the thread hop costs ~0.5 ms, the batch
        wait with batching on its whole `batch_wait_timeout_s`."""
        idle = time.monotonic() - ActiveRequests.last_exit >= IDLE_S
        return ActiveRequests.count <= 1 and idle

    async def _forward(self, engine_fn, batched, text: str, arg) -> tuple[Any, float]:
        """One text's engine result and the engine seconds: at once when the request is alone,
        else through the `@serve.batch` method `batched`, validated first so that a bad text
        fails alone instead of failing its batch."""
        if self._alone():
            (result,), secs = _timed(engine_fn, [text], arg)
            return result, secs
        self.engine.encode(text)
        result = await batched((text, arg))
        if isinstance(result, EngineError):
            raise result
        return result

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _next_token_batch(self, items: list[tuple[str, int]]) -> list[Any]:
        top_k = max(k for _, k in items)  # one forward; each request keeps its own k
        texts = [t for t, _ in items]
        try:
            results, secs = await asyncio.to_thread(_timed, self.engine.next_token, texts, top_k)
        except EngineError as err:
            return [err] * len(items)
        return [(r, secs) for r in results]  # each request cuts `top` to its own k

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _attention_batch(self, items: list[tuple[str, AttentionOptions]]) -> list[Any]:
        try:
            maps, secs = await asyncio.to_thread(
                _timed, self.engine.attention, [t for t, _ in items], [o for _, o in items]
            )
        except EngineError as err:
            return [err] * len(items)
        return [(m, secs) for m in maps]

    # -- endpoints ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.engine.model_name,
            "replica": self.replica,
            "node_id": self.node_id,
        }

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.engine.model_name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "attnlm",
                    # extensions: what the viewer needs to know (an LSTM has no attention maps)
                    "arch": self.engine.config.arch,
                    "attention": self.engine.config.attention
                    if self.engine.config.has_attention
                    else None,
                    "n_layers": self.engine.config.n_layer,
                    "n_heads": self.engine.config.n_head
                    if self.engine.config.has_attention
                    else None,
                    "context_length": self.engine.max_context,
                }
            ],
        }

    @app.get("/metrics")
    async def metrics(self) -> Response:
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def viewer(self) -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.post("/v1/next-token")
    async def next_token(self, request: NextTokenRequest) -> Response:
        async def work():
            self._check_model(request.model)
            if request.top_k > self.engine.tokenizer.vocab_size:
                raise EngineError(
                    f"top_k must be at most {self.engine.tokenizer.vocab_size}", param="top_k"
                )
            nt, secs = await self._forward(
                self.engine.next_token, self._next_token_batch, request.text, request.top_k
            )
            content = {
                "model": self.engine.model_name,
                "tokens": nt.tokens,
                "token_ids": nt.token_ids,
                "top": nt.top[: request.top_k],
            }
            return Timed(content, secs)

        return await self._admit("next-token", work)

    @app.post("/v1/attention")
    async def attention(self, request: AttentionRequest) -> Response:
        async def work():
            self._check_model(request.model)
            options = _attention_options(request)
            self.engine.check_attention_options(options)
            att_map, secs = await self._forward(
                self.engine.attention, self._attention_batch, request.text, options
            )
            return Timed({"model": self.engine.model_name, **_attention_dict(att_map)}, secs)

        return await self._admit("attention", work)

    @app.post("/v1/probe")
    async def probe(self, request: ProbeRequest) -> Response:
        async def work():
            self._check_model(request.model)
            result, secs = await asyncio.to_thread(
                _timed, self.engine.probe, request.text, request.subject, request.verb
            )
            return Timed({"model": self.engine.model_name, **asdict(result)}, secs)

        return await self._admit("probe", work)

    @app.post("/v1/completions")
    async def completions(self, request: CompletionRequest) -> Response:
        async def work():
            self._check_model(request.model)
            prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
            if not prompts:
                raise EngineError("prompt must not be an empty list", param="prompt")
            stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
            if len(stop) > 4:
                raise EngineError("at most 4 stop sequences", param="stop")
            params = CompletionParams(
                max_tokens=request.max_tokens or 16,
                temperature=request.temperature,
                top_p=None if request.top_p >= 1.0 else request.top_p,
                top_k=request.top_k,
                stop=stop,
                seed=request.seed,
                n=request.n,
                echo=request.echo,
                logprobs=request.logprobs,
                attention=_attention_options(request.return_attention),
            )
            for p in prompts:
                self.engine.encode(p, param="prompt")
            completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
            if request.stream:
                return StreamingResponse(
                    self._stream(completion_id, prompts, params),
                    media_type="text/event-stream",
                )
            return await self._in_decode_thread(self._complete, completion_id, prompts, params)

        return await self._admit("completions", work)

    def _complete(
        self, completion_id: str, prompts: list[str], params: CompletionParams
    ) -> dict[str, Any]:
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for p_index, prompt in enumerate(prompts):
            result = self.engine.complete(prompt, params)
            prompt_tokens += result.prompt_tokens
            completion_tokens += result.completion_tokens
            for choice in result.choices:
                entry = {
                    "text": choice.text,
                    "index": p_index * params.n + choice.index,
                    "logprobs": choice.logprobs,
                    "finish_reason": choice.finish_reason,
                }
                if choice.attention is not None:
                    entry["attention"] = choice.attention
                    entry["tokens"] = choice.tokens
                choices.append(entry)
        self.metrics.generated(completion_tokens)
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.engine.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _stream(
        self, completion_id: str, prompts: list[str], params: CompletionParams
    ) -> AsyncIterator[str]:
        created = int(time.time())
        generated = 0
        for p_index, prompt in enumerate(prompts):
            deltas = iter(self.engine.stream(prompt, params))
            while True:
                try:
                    delta = await self._in_decode_thread(next, deltas, None)
                except EngineError as err:
                    yield f"data: {dumps(error_body(str(err), err.param, err.code)).decode()}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                if delta is None:
                    break
                generated += 1 if delta.text or delta.finish_reason is None else 0
                chunk = {
                    "id": completion_id,
                    "object": "text_completion",
                    "created": created,
                    "model": self.engine.model_name,
                    "choices": [
                        {
                            "text": delta.text,
                            "index": p_index * params.n + delta.index,
                            "logprobs": delta.logprobs,
                            "finish_reason": delta.finish_reason,
                        }
                    ],
                }
                yield f"data: {dumps(chunk).decode()}\n\n"
        self.metrics.generated(generated)
        yield "data: [DONE]\n\n"


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` / config files: args `artifact` (required), `device`,
    `dtype`, `compile`."""
    unknown = set(args) - {"artifact", "device", "dtype", "compile"}
    if unknown:
        raise ValueError(f"unknown application argument(s): {', '.join(sorted(unknown))}")
    if "artifact" not in args:
        raise ValueError("application argument 'artifact' (an exported model folder) is required")
    if not isinstance(args.get("compile", False), bool):
        raise ValueError("application argument 'compile' must be true or false")
    artifact = str(Path(args["artifact"]).resolve())  # replicas need not share the caller's cwd
    return AttnLMServer.bind(
        artifact, args.get("device"), args.get("dtype"), args.get("compile", False)
    )
