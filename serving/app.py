"""The Ray Serve application: one deployment, a FastAPI ingress in front of `serving.engine.Engine`.

    serve run configs/serve.yaml              # artifact, replicas, host/port in the config file
    serve run serving.app:build_app artifact=artifacts/tiny

Endpoints (docs/serving.md): POST /v1/completions (OpenAI's shape, SSE streaming), POST
/v1/chat/completions (through the folder's chat template), POST /v1/next-token, POST
/v1/attention, POST /v1/probe, GET /v1/models[/{id}], GET /tokenizer_info, POST /tokenize and
/detokenize (vLLM's shapes), GET /health, GET /metrics, GET / (viewer).
Next-token and attention forwards from concurrent requests are batched with `@serve.batch`
(size and wait in `user_config`, `serving.settings`). Every error answers OpenAI's error body
(`serving.http`): a bad request a 4xx (checked once: by the pydantic models of `serving.schemas`,
or by the engine), requests beyond `max_in_flight` a 503 with Retry-After, a completion past
`request_timeout_s` a 504, anything unexpected a 500 with the request id. API keys, when set,
guard every route but /health and the page (`serving.auth`); /openapi.json states the contract,
the model's bounds included (`serving.openapi`).
"""

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from fastapi import Depends, FastAPI
from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from ray import serve

from serving.api_params import attention_options, chat_params, completion_params
from serving.api_params import prompts as api_prompts
from serving.app_args import check_app_args
from serving.auth import Access, require_key
from serving.chat import tokenizer_info as describe_tokenizer
from serving.engine import AttentionOptions, CompletionParams, Engine, EngineError
from serving.http import (
    JSON,
    ActiveRequests,
    BodyLimit,
    ErrorGuard,
    error_response,
    error_type,
    install_error_handlers,
    internal_error_body,
    logger,
    request_id,
    sse_event,
)
from serving.metrics import ServerMetrics
from serving.openapi import (
    EVENT_STREAM,
    GET_ERRORS,
    POST_ERRORS,
    AttentionResponse,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    Health,
    ModelBounds,
    ModelCard,
    ModelList,
    NextTokenResponse,
    ProbeResponse,
    TokenizeResponse,
    TokenizerInfo,
    contract,
    responses,
)
from serving.params import CompletionDelta, Deadline
from serving.responses import as_chat, chat_chunk, completion_chunk
from serving.schemas import (
    AttentionRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    NextTokenRequest,
    ProbeRequest,
    TokenizeRequest,
    error_body,
)
from serving.settings import GRACEFUL_SHUTDOWN_TIMEOUT_S, MAX_ONGOING_REQUESTS, ServerSettings

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB
IDLE_S = 0.002  # a replica with no request for this long is idle (see AttnLMServer._alone)
DEFAULTS = ServerSettings()  # the user_config a deployment starts with


class Timed(NamedTuple):
    """An endpoint's JSON content and the seconds its engine call took (Server-Timing), and
    whether the attention q/k cache had the text ("hit" | "miss"; None: no cache)."""

    content: Any
    engine_s: float
    cache: str | None = None


def _timed(fn, *args) -> tuple[Any, float]:
    """fn(*args) and the seconds it took, measured where it runs (event loop or thread)."""
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def create_app(max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app: every route behind `serving.auth.require_key` (open unless the
    deployment sets keys), errors in OpenAI's body, the middlewares outermost last."""
    app = FastAPI(
        title="attnlm",
        description="Completions, next-token and attention maps",
        version="0.1.0",
        dependencies=[Depends(require_key)],
    )
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(ActiveRequests)  # counts requests from before their body is read
    app.add_middleware(ErrorGuard)  # added last: the outermost, sees requests first
    return app


app = create_app(int(os.environ.get("ATTNLM_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)))


def _error_event(err: Exception) -> str:
    """One server-sent event with OpenAI's error body: an EngineError's own, or a 500's
    (logged with the request id) for anything else. (Defined above the deployment class, as
    everything its methods use: Ray pickles the class, with the globals it finds, at import.)"""
    if isinstance(err, EngineError):
        body = error_body(str(err), err.param, err.code, error_type(err.status))
    else:
        rid = request_id()
        logger.exception("stream of request %s failed with an unexpected error", rid)
        body = internal_error_body(rid)
    return sse_event(body)


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
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    health_check_period_s=10,
    # a replica told to stop (scale down, redeploy, shutdown) takes no new requests and finishes
    # those it holds, checking every second, before it exits
    graceful_shutdown_wait_loop_s=1.0,
    graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_TIMEOUT_S,
    user_config=asdict(DEFAULTS),
)
@serve.ingress(app)
class AttnLMServer:
    def __init__(
        self,
        artifact: str,
        device: str | None = None,
        dtype: str | None = None,
        model_name: str | None = None,
        api_keys: str | list[str] | None = None,
        metrics_require_key: bool = False,
        compile: bool = False,
        batch_invariant: bool = False,
    ) -> None:
        """Load `artifact`, served as `model_name` (default the folder's name); `api_keys` (with
        those of $ATTNLM_API_KEY, `serving.auth`) guard every route but /health and the viewer
        page, /metrics too with `metrics_require_key`; `compile` compiles the decode step,
        `batch_invariant` makes every request's numbers independent of its batch (`Engine`)."""
        access = Access.configure(api_keys, metrics_require_key)
        self.engine = Engine(
            artifact, device=device, dtype=dtype, compile=compile, batch_invariant=batch_invariant
        )
        if model_name is not None:  # the served model id; the engine's default: the folder's name
            self.engine.model_name = model_name
        self.created = int(time.time())
        self.settings = DEFAULTS
        self.in_flight = 0
        self.replica = _replica_name()
        self.node_id = _node_id()
        self.metrics = ServerMetrics()
        # one replica per process: the module's app is this replica's
        app.state.access, app.state.metrics = access, self.metrics
        app.openapi = contract(app, ModelBounds.of(self.engine), access)
        # Completion threads mostly wait for the engine's shared decode steps: a pool of their
        # own, as large as the requests a replica takes, so that all of them decode together
        # (asyncio's default pool has min(32, CPUs + 4) threads).
        self._decode_pool = ThreadPoolExecutor(max_workers=MAX_ONGOING_REQUESTS)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config (`ServerSettings`): batch size and wait of the batched forwards, the
        in-flight bound, the completions' time limit, the attention cache's and answers' bytes;
        keys left out keep their defaults."""
        self.settings = ServerSettings.from_user_config(config)
        self.engine.configure_attention(
            self.settings.attention_cache_bytes, self.settings.max_attention_bytes
        )
        for batched in (self._next_token_batch, self._attention_batch):
            batched.set_max_batch_size(self.settings.max_batch_size)
            batched.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

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
        batched forward's whole time for each request in the batch), and for attention
        `attention_cache` whether the replica's q/k cache had the text."""
        self.metrics.request(endpoint)
        if self.in_flight >= self.settings.max_in_flight:
            self.metrics.error(endpoint, 503)
            return error_response(
                503,
                f"server is at capacity ({self.settings.max_in_flight} requests in flight); "
                "retry shortly",
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
        except Exception:  # serving.http.ErrorGuard answers it (a 500) and logs it
            self.metrics.error(endpoint, 500)
            raise
        finally:
            self.in_flight -= 1
            elapsed = time.perf_counter() - start
            self.metrics.latency(endpoint, elapsed)
        if isinstance(result, StreamingResponse):
            return result
        timing = f"app;dur={1e3 * elapsed:.3f}"
        if isinstance(result, Timed):
            timing = f"engine;dur={1e3 * result.engine_s:.3f}, {timing}"
            if result.cache is not None:
                timing += f', attention_cache;desc="{result.cache}"'
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

    async def _forward(self, engine_fn, check, batched, text: str, arg) -> tuple[Any, float]:
        """One text's engine result and the engine seconds: at once when the request is alone,
        else through the `@serve.batch` method `batched`, checked first (`check(arg)`, then the
        text) so that a bad request fails alone instead of failing its batch."""
        if self._alone():
            (result,), secs = _timed(engine_fn, [text], arg)
            return result, secs
        check(arg)
        self.engine.encode(text)
        result = await batched((text, arg))
        if isinstance(result, EngineError):
            raise result
        return result

    @serve.batch(
        max_batch_size=DEFAULTS.max_batch_size, batch_wait_timeout_s=DEFAULTS.batch_wait_timeout_s
    )
    async def _next_token_batch(self, items: list[tuple[str, int]]) -> list[Any]:
        top_k = max(k for _, k in items)  # one forward; each request keeps its own k
        texts = [t for t, _ in items]
        try:
            results, secs = await asyncio.to_thread(_timed, self.engine.next_token, texts, top_k)
        except EngineError as err:
            return [err] * len(items)
        return [(r, secs) for r in results]  # each request cuts `top` to its own k

    @serve.batch(
        max_batch_size=DEFAULTS.max_batch_size, batch_wait_timeout_s=DEFAULTS.batch_wait_timeout_s
    )
    async def _attention_batch(self, items: list[tuple[str, AttentionOptions]]) -> list[Any]:
        try:
            maps, secs = await asyncio.to_thread(
                _timed, self.engine.attention, [t for t, _ in items], [o for _, o in items]
            )
        except EngineError as err:
            return [err] * len(items)
        return [(m, secs) for m in maps]

    # -- endpoints ------------------------------------------------------------------------------------
    @app.get("/health", response_model=None, responses=responses(Health, *GET_ERRORS))
    async def health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.engine.model_name,
            "replica": self.replica,
            "node_id": self.node_id,
        }

    def _model_card(self) -> dict[str, Any]:
        config = self.engine.config
        return {
            "id": self.engine.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "attnlm",
            # extensions: what the viewer needs to know (an LSTM has no attention maps)
            "arch": config.arch,
            "attention": config.attention if config.has_attention else None,
            "n_layers": config.n_layer,
            "n_heads": config.n_head if config.has_attention else None,
            "context_length": self.engine.max_context,
        }

    @app.get("/v1/models", response_model=None, responses=responses(ModelList, *GET_ERRORS))
    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self._model_card()]}

    @app.get(
        "/v1/models/{model_id}",
        response_model=None,
        responses=responses(ModelCard, 404, *GET_ERRORS),
    )
    async def model(self, model_id: str) -> Response:
        async def work():
            self._check_model(model_id)
            return self._model_card()

        return await self._admit("models", work)

    @app.get(
        "/tokenizer_info", response_model=None, responses=responses(TokenizerInfo, *GET_ERRORS)
    )
    async def tokenizer_info(self) -> dict[str, Any]:
        return describe_tokenizer(self.engine)

    @app.post("/tokenize", responses=responses(TokenizeResponse, *POST_ERRORS))
    async def tokenize(self, request: TokenizeRequest) -> Response:
        async def work():
            self._check_model(request.model)
            ids = await asyncio.to_thread(self.engine.tokenize, request.prompt)
            strs = self.engine.tokenizer.token_strings(ids) if request.return_token_strs else None
            return {
                "count": len(ids),
                "max_model_len": self.engine.max_context,
                "tokens": ids,
                "token_strs": strs,
            }

        return await self._admit("tokenize", work)

    @app.post("/detokenize", responses=responses(DetokenizeResponse, *POST_ERRORS))
    async def detokenize(self, request: DetokenizeRequest) -> Response:
        async def work():
            self._check_model(request.model)
            return {"prompt": self.engine.detokenize(request.tokens)}

        return await self._admit("detokenize", work)

    @app.get("/metrics", response_class=PlainTextResponse, responses=responses(None, *GET_ERRORS))
    async def metrics(self) -> Response:
        return Response(self.metrics.exposition(), media_type=self.metrics.content_type)

    @app.get("/", response_class=HTMLResponse, responses=responses(None, *GET_ERRORS))
    async def viewer(self) -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    @app.post("/v1/next-token", responses=responses(NextTokenResponse, *POST_ERRORS))
    async def next_token(self, request: NextTokenRequest) -> Response:
        async def work():
            self._check_model(request.model)
            nt, secs = await self._forward(
                self.engine.next_token,
                self.engine.check_top_k,
                self._next_token_batch,
                request.text,
                request.top_k,
            )
            content = {
                "model": self.engine.model_name,
                "tokens": nt.tokens,
                "token_ids": nt.token_ids,
                "top": nt.top[: request.top_k],
            }
            return Timed(content, secs)

        return await self._admit("next-token", work)

    @app.post("/v1/attention", responses=responses(AttentionResponse, *POST_ERRORS))
    async def attention(self, request: AttentionRequest) -> Response:
        async def work():
            self._check_model(request.model)
            att_map, secs = await self._forward(
                self.engine.attention,
                lambda options: self.engine.check_attention_request(request.text, options),
                self._attention_batch,
                request.text,
                attention_options(request),
            )
            body = {"model": self.engine.model_name, **att_map.body()}
            return Timed(body, secs, att_map.cache)

        return await self._admit("attention", work)

    @app.post("/v1/probe", responses=responses(ProbeResponse, *POST_ERRORS))
    async def probe(self, request: ProbeRequest) -> Response:
        async def work():
            self._check_model(request.model)
            result, secs = await asyncio.to_thread(
                _timed, self.engine.probe, request.text, request.subject, request.verb
            )
            return Timed({"model": self.engine.model_name, **asdict(result)}, secs)

        return await self._admit("probe", work)

    @app.post(
        "/v1/completions",
        responses=responses(CompletionResponse, *POST_ERRORS, 504, content=EVENT_STREAM),
    )
    async def completions(self, request: CompletionRequest) -> Response:
        async def work():
            self._check_model(request.model)
            prompts = api_prompts(request.prompt)
            params = completion_params(request, self.settings.request_timeout_s)
            for p in prompts:
                self.engine.encode(p, param="prompt")
            completion_id = f"cmpl-{uuid.uuid4().hex[:24]}"
            if request.stream:  # the engine checks the parameters here: a 400, not an event
                streams = [self.engine.stream(p, params) for p in prompts]
                events = self._stream(completion_id, streams, params, completion_chunk)
                return StreamingResponse(events, media_type="text/event-stream")
            return await self._in_time(
                params.deadline, self._complete, completion_id, prompts, params
            )

        return await self._admit("completions", work)

    @app.post(
        "/v1/chat/completions",
        responses=responses(ChatCompletionResponse, *POST_ERRORS, 504, content=EVENT_STREAM),
    )
    async def chat_completions(self, request: ChatCompletionRequest) -> Response:
        """Chat through the folder's chat template (`serving.chat`): one prompt, completed."""

        async def work():
            self._check_model(request.model)
            prompt = self.engine.chat_prompt([m.model_dump() for m in request.messages])
            self.engine.encode(prompt, param="messages")
            timeout_s = self.settings.request_timeout_s
            params = chat_params(request, self.engine.max_tokens_limit, timeout_s)
            completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            if request.stream:
                streams = [self.engine.stream(prompt, params)]
                events = self._stream(completion_id, streams, params, chat_chunk)
                return StreamingResponse(events, media_type="text/event-stream")
            body = await self._in_time(
                params.deadline, self._complete, completion_id, [prompt], params
            )
            return as_chat(body)

        return await self._admit("chat-completions", work)

    async def _in_time(self, deadline: Deadline | None, fn, *args):
        """fn(*args) on the decode thread pool, answered by the deadline at the latest (504): the
        engine itself stops decoding at its next step, freeing the slots."""
        if deadline is None:
            return await self._in_decode_thread(fn, *args)
        try:
            return await asyncio.wait_for(
                self._in_decode_thread(fn, *args), max(0.0, deadline.remaining())
            )
        except asyncio.TimeoutError:
            raise deadline.error() from None

    def _complete(
        self, completion_id: str, prompts: list[str | list[int]], params: CompletionParams
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
        self,
        completion_id: str,
        streams: list[Iterator[CompletionDelta]],
        params: CompletionParams,
        chunk_of,
    ) -> AsyncIterator[str]:
        """Server-sent events of the completion, one engine stream per prompt, each delta one
        chunk (`chunk_of(delta, index, first)`: a completion's, a chat's); an error (the
        deadline, anything unexpected) is one `data: {"error": ...}` event, then `data: [DONE]`.
        A stream left behind is closed when dropped (CPython frees it at once), freeing its
        decode slots; the engine also stops one past its deadline at its next step."""
        created = int(time.time())
        generated, seen = 0, set()
        for p_index, deltas in enumerate(streams):
            while True:
                try:
                    delta = await self._in_time(params.deadline, next, deltas, None)
                except Exception as err:
                    yield _error_event(err)
                    yield "data: [DONE]\n\n"
                    return
                if delta is None:
                    break
                generated += 1 if delta.text or delta.finish_reason is None else 0
                index = p_index * params.n + delta.index
                kind, choice = chunk_of(delta, index, index not in seen)
                seen.add(index)
                chunk = {
                    "id": completion_id,
                    "object": kind,
                    "created": created,
                    "model": self.engine.model_name,
                    "choices": [choice],
                }
                yield sse_event(chunk)
        self.metrics.generated(generated)
        yield "data: [DONE]\n\n"


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` / config files: args `artifact` (required), `device`,
    `dtype`, `model_name` (the served model id: `/v1/models`, the `model` of requests and
    responses; default the artifact folder's name), `api_keys` (a key or a list;
    $ATTNLM_API_KEY adds to them), `metrics_require_key`, `compile` (the decode step, default
    false), `batch_invariant` (default false). They are checked here, before any
    replica starts (`check_app_args`): a bad one fails the application with one line."""
    args = check_app_args(args)
    access = {
        k: args[k]
        for k in ("api_keys", "metrics_require_key", "compile", "batch_invariant")
        if k in args
    }
    return AttnLMServer.bind(
        args["artifact"], args.get("device"), args.get("dtype"), args.get("model_name"), **access
    )
