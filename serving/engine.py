"""The model work behind the HTTP API: next-token distributions, attention maps, completions.

Pure Python on the attnlm core (model, KV-cache generation loop, tokenizer, artifact); no Ray,
FastAPI or pydantic, so it runs and is tested on its own. `serving/app.py` puts it behind a Ray
Serve deployment and turns `EngineError` into OpenAI's error body (docs/serving.md).

    engine = Engine("artifacts/tiny")                  # cuda + bf16 when available, else cpu + fp32
    engine.next_token(["The cats near the dog"], top_k=5)[0].top
    engine.attention(["The cat sits."], AttentionOptions(aggregation="rollout"))[0].attention
    engine.complete("The cat", CompletionParams(max_tokens=8, temperature=0)).choices[0].text
    for delta in engine.stream("The cat", CompletionParams(stop=["."])):
        print(delta.text, end="")

`next_token` and `attention` batch any number of texts in one forward, packed side by side in
rows (each text with its own positions, attending only to itself: the same numbers as alone, with
almost no padding); an LSTM model gets right-padded length buckets instead. Completions decode
their `n` samples on the KV cache; those in flight at the same time share each decode step
(`_DecodeBatcher`), except requests for attention maps, which go through `attnlm.generate.stream`
alone. The model's vocabulary
may be padded past the tokenizer's; ids without text are never reported nor sampled.
"""

from __future__ import annotations

import base64
import bisect
import math
import os
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from attnlm.artifact import load_artifact
from attnlm.batching import DecodeBatch, DecodeRequest
from attnlm.fastdecode import preferred_dtype
from attnlm.generate import GenerationStep, SamplingParams, assemble_attention
from attnlm.generate import stream as generate_stream
from attnlm.lstm import LSTMLM
from attnlm.model import GPT, GPTOutput
from attnlm.probe import ProbeError, analyze, score_items

AGGREGATIONS = ("none", "mean", "rollout")
ENCODINGS = ("json", "base64")
MAX_DECIMALS = 8
MAX_N = 16  # samples per completion request
DECODE_SLOTS = 32  # rows of the shared KV cache that concurrent completions decode in
# decode steps a non-streamed completion's thread takes at once (one wake-up each); a stop string
# is seen at most this many steps late, which are decoded in vain
COMPLETION_CHUNK = 16
MAX_LOGPROBS = 5  # alternatives per token, as OpenAI's legacy completions
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 character decodes to


MAX_PADDING = 0.2  # a length bucket may be this fraction padding (models that cannot pack)
PACK_TOKENS = 64  # packed rows hold this many tokens (or the longest text, if longer)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices packed into rows of at most `capacity` tokens, first fit by decreasing length
    (a text longer than `capacity` gets a row of its own)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max(capacity - lengths[i], 0))
    return rows


def length_buckets(lengths: list[int], max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices grouped into buckets of similar length (longest first), each padded to its
    longest row with at most `max_padding` of its tokens being padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    buckets: list[list[int]] = []
    for i in order:
        if buckets:
            bucket = buckets[-1]
            longest = lengths[bucket[0]]
            real = sum(lengths[j] for j in bucket) + lengths[i]
            if 1 - real / (longest * (len(bucket) + 1)) <= max_padding:
                bucket.append(i)
                continue
        buckets.append([i])
    return buckets


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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _invalid(message: str, param: str) -> EngineError:
    return EngineError(message, param=param, code="invalid_value")


# -- request parameters ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionOptions:
    """What of the attention map to return; checked at construction (ranges by the engine)."""

    layers: list[int] | None = None  # layer indices, None = all
    heads: list[int] | None = None  # head indices, None = all
    aggregation: str = "none"  # "none" (per head) | "mean" (over heads) | "rollout"
    encoding: str = "json"  # "json" (nested lists) | "base64" (float16 bytes)
    decimals: int = 4  # rounding of json values, 0..8

    def __post_init__(self) -> None:
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                not isinstance(value, (list, tuple))
                or not value
                or not all(_is_int(i) for i in value)
            ):
                raise _invalid(f"{name} must be a non-empty list of integers or null", name)
            object.__setattr__(self, name, list(value))
        if self.aggregation not in AGGREGATIONS:
            raise _invalid(
                f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {self.aggregation!r}",
                "aggregation",
            )
        if self.encoding not in ENCODINGS:
            raise _invalid(
                f"encoding must be one of {', '.join(ENCODINGS)}; got {self.encoding!r}", "encoding"
            )
        if not _is_int(self.decimals) or not 0 <= self.decimals <= MAX_DECIMALS:
            raise _invalid(
                f"decimals must be an integer in 0..{MAX_DECIMALS}, got {self.decimals!r}",
                "decimals",
            )


@dataclass(frozen=True)
class AttentionQuery:
    """One text and what to return of its attention map (`Engine.attention` takes either these
    or texts plus options)."""

    text: str
    options: AttentionOptions = field(default_factory=AttentionOptions)


@dataclass(frozen=True)
class CompletionParams:
    """OpenAI legacy-completions sampling parameters; checked at construction (`max_tokens`'s
    upper limit by the engine)."""

    max_tokens: int = 16  # 1..the engine's limit; the context window may end a row sooner
    temperature: float = 1.0  # 0 = greedy
    top_p: float | None = None  # nucleus sampling, in (0, 1]
    top_k: int | None = None  # keep the k most likely tokens, >= 1
    stop: Sequence[str] = ()  # the text ends before the first occurrence of any of these
    seed: int | None = None  # reproducible sampling
    n: int = 1  # samples, 1..16, decoded as one batch
    echo: bool = False  # prepend the prompt to each choice's text
    logprobs: int | None = None  # report the chosen token's and this many (0..5) top logprobs
    attention: AttentionOptions | None = None  # return the map over prompt + completion

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise _invalid("stop must be a non-empty string or a list of them", "stop")
        object.__setattr__(self, "stop", tuple(stop))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise _invalid(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens"
            )
        if not _is_number(self.temperature) or not (
            math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise _invalid(f"temperature must be >= 0, got {self.temperature!r}", "temperature")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise _invalid(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise _invalid(f"top_k must be an integer >= 1, got {self.top_k!r}", "top_k")
        if self.seed is not None and not _is_int(self.seed):
            raise _invalid(f"seed must be an integer, got {self.seed!r}", "seed")
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise _invalid(f"n must be an integer in 1..{MAX_N}, got {self.n!r}", "n")
        if not isinstance(self.echo, bool):
            raise _invalid(f"echo must be a boolean, got {self.echo!r}", "echo")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise _invalid(
                f"logprobs must be an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}",
                "logprobs",
            )
        if self.attention is not None and not isinstance(self.attention, AttentionOptions):
            raise _invalid("attention must be AttentionOptions or None", "attention")


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


# -- array helpers -------------------------------------------------------------------------------------
def rollout(att: torch.Tensor) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) of att (L, H, T, T): per layer
    Â = 0.5·mean_heads(A) + 0.5·I with rows renormalised, R_l = Â_l @ R_{l-1} from layer 0 up.

    Returns:
        (L, T, T): R after each layer; every row sums to 1.
    """
    T = att.size(-1)
    eye = torch.eye(T, dtype=att.dtype, device=att.device)  # (T, T)
    mixed = 0.5 * att.mean(dim=1) + 0.5 * eye  # (L, T, T)
    mixed = mixed / mixed.sum(dim=-1, keepdim=True)
    result, maps = eye, []
    for layer_map in mixed:
        result = layer_map @ result  # (T, T)
        maps.append(result)
    return torch.stack(maps)  # (L, T, T)


def select_attention(
    att: torch.Tensor, layers: list[int], heads: list[int], aggregation: str
) -> torch.Tensor:
    """Selected part of one text's map att (L, H, T, T) (indices already checked).

    Returns:
        "none": (len(layers), len(heads), T, T); "mean" / "rollout": (len(layers), T, T), where
        rollout mixes the selected heads through every layer up to each selected one.
    """
    att = att[:, heads]  # (L, h, T, T)
    if aggregation == "none":
        return att[layers]
    if aggregation == "mean":
        return att.mean(dim=1)[layers]
    if aggregation == "rollout":
        return rollout(att[: max(layers) + 1])[layers]
    raise _invalid(f"aggregation must be one of {', '.join(AGGREGATIONS)}", "aggregation")


def encode_array(t: torch.Tensor, encoding: str = "json", decimals: int = 4) -> dict:
    """{"encoding", "shape", "dtype", "data"}: "json" gives the values rounded to `decimals` as
    a C-contiguous float64 numpy array, which the server writes as nested JSON lists
    (`serving.app.JSON`, orjson: ~10x faster than nested Python lists through `json.dumps`);
    "base64" gives little-endian float16 bytes, row-major."""
    shape = list(t.shape)
    if encoding == "json":
        values = torch.round(t.detach().to("cpu", torch.float64), decimals=decimals)
        data = np.ascontiguousarray(values.numpy())
        return {"encoding": "json", "shape": shape, "dtype": "float32", "data": data}
    if encoding == "base64":
        raw = t.detach().to("cpu", torch.float16).contiguous().numpy().astype("<f2").tobytes()
        data = base64.b64encode(raw).decode("ascii")
        return {"encoding": "base64", "shape": shape, "dtype": "float16", "data": data}
    raise _invalid(f"encoding must be one of {', '.join(ENCODINGS)}; got {encoding!r}", "encoding")


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


# -- decoding internals -------------------------------------------------------------------------------
class _DecodeModel:
    """The engine's model as if it were a decoder's own, for `attnlm.generate.stream`: logits
    cut to the tokenizer's ids, and KV caches of its own.
    A cache is put into the shared model only for the length of one forward, under the engine's
    lock, so decoders interleaved by threads or by async streams never overwrite each other's."""

    def __init__(self, model: GPT | LSTMLM, vocab_size: int, lock: threading.Lock) -> None:
        self.model = model
        self.config = model.config
        self.vocab_size = vocab_size
        self._lock = lock
        self._caches: object | None = None

    def set_kv_cache(self, batch_size: int, max_seq_length: int | None = None, **kwargs) -> None:
        with self._lock:
            self.model.set_kv_cache(batch_size, max_seq_length, **kwargs)
            self._caches = self.model.kv_cache_state()
            self.model.clear_kv_cache()

    def clear_kv_cache(self) -> None:
        self._caches = None

    def kv_cache_state(self) -> object | None:
        return self._caches

    def load_kv_cache_state(self, state: object | None) -> None:
        self._caches = state

    def __call__(
        self,
        idx: torch.Tensor,
        *,
        input_pos: int | None = None,
        row_positions: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> GPTOutput:
        with self._lock:
            if self._caches is not None:
                self.model.load_kv_cache_state(self._caches)
            try:
                out = self.model(
                    idx,
                    input_pos=input_pos,
                    row_positions=row_positions,
                    return_attention=return_attention,
                )
            finally:
                self.model.clear_kv_cache()
        return out._replace(logits=out.logits[..., : self.vocab_size])  # (B, T, V_tokenizer)


class _BatchRun:
    """One completion (n rows) handed to `_DecodeBatcher`: waiting for slots, then decoding.
    Its steps reach the consumer `chunk` at a time: one wake-up of its thread per chunk (with 32
    completions in flight, waking each consumer every step cost the decode thread a quarter of
    its time in GIL hand-overs)."""

    def __init__(self, prompt: torch.Tensor, params: SamplingParams, chunk: int) -> None:
        self.prompt = prompt  # (n, T)
        self.params = params
        self.chunk = chunk
        self.cancelled = False
        self._items: list = []  # GenerationSteps, then None (the end) or an exception
        self._ready = threading.Condition()

    def put(self, item: GenerationStep | BaseException | None) -> None:
        """Hand over a step, or the end (None, an exception): the consumer wakes at the end or
        once a chunk is there."""
        with self._ready:
            self._items.append(item)
            if not isinstance(item, GenerationStep) or len(self._items) >= self.chunk:
                self._ready.notify()

    def take(self) -> list:
        """Wait for a chunk of steps (or the end) and take every item handed over so far."""
        with self._ready:
            self._ready.wait_for(
                lambda: (
                    len(self._items) >= self.chunk
                    or (self._items and not isinstance(self._items[-1], GenerationStep))
                )
            )
            items, self._items = self._items, []
        return items


class _DecodeBatcher:
    """Schedules concurrent completions onto one `attnlm.batching.DecodeBatch`, which decodes
    them together: each request is prefilled alone into its slots of one shared KV cache, then
    every decode step is one forward over the active rows of all requests, each row at its own
    position, each request sampling with its own parameters and seed (the same
    `GenerationStep`s as `attnlm.generate.stream` alone). A request waits for free slots when
    all are taken, first come first served. The work runs on one background thread, holding
    `lock` (the engine's, see _DecodeModel) around the batch's forwards; a closed stream leaves
    the batch before the next step."""

    def __init__(self, batch: DecodeBatch, lock: threading.Lock) -> None:
        self.n_slots = batch.n_slots
        self._batch = batch  # touched by the decode thread only
        self._lock = lock
        self._runs: dict[DecodeRequest, _BatchRun] = {}  # decoding now
        self._pending: deque[_BatchRun] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def stream(
        self, prompt: torch.Tensor, params: SamplingParams, chunk: int = 1
    ) -> Iterator[GenerationStep]:
        """`attnlm.generate.stream(model, prompt, params)` (no attention), decoded together with
        the other requests in flight, its steps handed over `chunk` at a time. Closing the
        iterator early frees the request's slots."""
        if prompt.size(0) > self.n_slots:
            raise ValueError(f"{prompt.size(0)} rows; the batcher has {self.n_slots} slots")
        run = _BatchRun(prompt, params, chunk)
        with self._wake:
            self._pending.append(run)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="decode-batcher", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        try:
            while True:
                for item in run.take():
                    if item is None:
                        return
                    if isinstance(item, BaseException):
                        raise item
                    yield item
        finally:
            run.cancelled = True

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._runs:
                    self._wake.wait()
                admitted, free = [], self._batch.free_slots
                while self._pending and free >= self._pending[0].prompt.size(0):
                    run = self._pending.popleft()
                    if not run.cancelled:
                        admitted.append(run)
                        free -= run.prompt.size(0)
            for run in admitted:
                try:
                    with self._lock:
                        request = self._batch.add(run.prompt, run.params)
                except BaseException as err:  # fail this request, keep serving
                    run.put(err)
                    continue
                if request is None:  # nothing to decode
                    run.put(None)
                else:
                    self._runs[request] = run
            try:
                self._step()
            except BaseException as err:  # fail the requests in flight, keep serving
                for request, run in self._runs.items():
                    run.put(err)
                    self._batch.remove(request)
                self._runs.clear()

    def _step(self) -> None:
        for request, run in list(self._runs.items()):
            if run.cancelled:
                self._batch.remove(request)
                del self._runs[request]
        with self._lock:
            results = self._batch.step()
        for request, step in results:
            run = self._runs[request]
            run.put(step)
            if request.done:
                run.put(None)
                del self._runs[request]


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper start of some stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class _Row:
    """One sample of a completion as its tokens arrive: its text, cut before the first stop
    string; what of it is safe to hand out (no incomplete UTF-8 character at the end, nothing that
    may yet turn into a stop string); one logprob record and text offset per token of the text.

    Decoding is incremental: only the tokens after the last complete character are decoded again
    (byte-level BPE: the text of ids[:k] followed by that of ids[k:] is the text of ids when the
    former ends on a character boundary), so a row costs linear, not quadratic, time.
    """

    def __init__(self, tokenizer, stops: Sequence[str] = (), end_id: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.end_id = end_id  # the token that ends the row (end-of-text), excluded from the text
        self.generated: list[int] = []  # every sampled id: end-of-text and stop-string ones too
        self.ids: list[int] = []  # ids whose text makes up the completion
        self.offsets: list[int] = []  # where each id's text starts in `text`
        self.records: list[tuple | None] = []  # (token string, logprob, {token: logprob})
        self.text = ""
        self.finish_reason: str | None = None
        self.cut = False  # a stop string cut the text (tokens past the cut are not reported)
        self.emitted = 0  # characters of text handed out
        self.emitted_tokens = 0  # records handed out
        self.closed = False  # the last delta (with finish_reason) went out
        self._clean = 0  # ids[:_clean] decode to _clean_text, which ends on a whole character
        self._clean_text = ""
        self._longest_stop = max((len(s) for s in self.stops), default=0)

    def add(self, token_id: int, record: tuple | None = None) -> None:
        self.generated.append(token_id)
        if token_id == self.end_id:
            self.finish_reason = "stop"
            return
        previous, shared = self.text, len(self._clean_text)
        self.ids.append(token_id)
        self.records.append(record)
        tail = self.tokenizer.decode(self.ids[self._clean :])
        self.text = self._clean_text + tail
        if not tail.endswith(_REPLACEMENT):
            self._clean, self._clean_text = len(self.ids), self.text
        # the token's text starts where the old and new texts part; a token that completes a
        # character started by earlier ones moves their offsets back to that character
        limit = min(len(previous), len(self.text))
        while shared < limit and previous[shared] == self.text[shared]:
            shared += 1
        for j in range(len(self.offsets) - 1, -1, -1):
            if self.offsets[j] <= shared:
                break
            self.offsets[j] = shared
        self.offsets.append(shared)
        if self.stops:
            start = max(0, len(previous.rstrip(_REPLACEMENT)) - self._longest_stop + 1)
            found = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
            if found:
                self.text = self.text[: min(found)]
                self.finish_reason, self.cut = "stop", True

    def take(self) -> tuple[str, list[tuple], list[int]]:
        """The text newly safe to hand out, and the records and offsets of the tokens whose text
        starts in it (all that is left once the row has finished)."""
        if self.finish_reason is not None:
            limit = len(self.text)
        else:
            limit = len(self.text.rstrip(_REPLACEMENT))
            limit -= _stop_prefix_length(self.text[:limit], self.stops)
        limit = max(limit, self.emitted)
        text = self.text[self.emitted : limit]
        if self.finish_reason is not None and not self.cut:
            n_tokens = len(self.offsets)
        else:  # tokens starting at or past a stop string's cut are not reported
            n_tokens = max(bisect.bisect_left(self.offsets, limit), self.emitted_tokens)
        records = self.records[self.emitted_tokens : n_tokens]
        offsets = self.offsets[self.emitted_tokens : n_tokens]
        self.emitted, self.emitted_tokens = limit, n_tokens
        return text, records, offsets


def _logprobs_dict(records: Sequence[tuple | None], offsets: Sequence[int], base: int) -> dict:
    """OpenAI legacy-completions logprobs of tokens; text offsets shifted by `base`."""
    return {
        "tokens": [r[0] for r in records],
        "token_logprobs": [r[1] for r in records],
        "top_logprobs": [r[2] for r in records],
        "text_offset": [base + o for o in offsets],
    }


def _join_logprobs(first: dict | None, second: dict) -> dict:
    if first is None:
        return second
    return {key: first[key] + second[key] for key in second}


@dataclass
class _Run:
    """The state of one completion's decoding, shared by `complete` and `stream`."""

    prompt: str
    prompt_ids: list[int]
    params: CompletionParams
    rows: list[_Row]
    prefill: list[torch.Tensor] = field(default_factory=list)  # (L, n, H, T, T)
    attention_rows: list[torch.Tensor] = field(default_factory=list)  # (L, n, H, 1, T + i + 1)


# -- the engine ------------------------------------------------------------------------------------------
class Engine:
    """An exported artifact on one device, answering the API's model questions."""

    def __init__(
        self,
        artifact: str | os.PathLike,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        max_tokens_limit: int | None = None,
        compile: bool = False,
    ) -> None:
        """Load `artifact` (an `attnlm export` folder); ArtifactError propagates.

        Args:
            device: "cuda", "cpu", ...; default cuda when available.
            dtype: "float32" | "bfloat16" | "float16" | "auto" (bfloat16 where the hardware
                has it: `attnlm.fastdecode.preferred_dtype`); default bfloat16 on cuda, float32
                on cpu.
            max_tokens_limit: the largest `max_tokens` a completion may ask; default the context.
            compile: compile the decode step completions share (`attnlm.fastdecode`: inductor
                on CPU, CUDA graphs on CUDA), warmed up here; eager, logged, where it cannot.
        """
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif dtype == "auto":
            dtype = preferred_dtype(self.device)
        elif isinstance(dtype, str):
            if dtype not in _DTYPES:
                names = ", ".join([*_DTYPES, "auto"])
                raise ValueError(f"dtype must be one of {names}; got {dtype!r}")
            dtype = _DTYPES[dtype]
        self.dtype = dtype
        loaded = load_artifact(artifact, device=self.device, dtype=dtype)
        self.model = loaded.model.eval()
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.info = loaded.info
        self.model_name = Path(artifact).resolve().name
        self.max_context = self.config.block_size
        if max_tokens_limit is None:
            max_tokens_limit = self.max_context
        if not _is_int(max_tokens_limit) or max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be an integer >= 1, got {max_tokens_limit!r}")
        self.max_tokens_limit = max_tokens_limit
        self._lock = threading.Lock()  # held by KV-cache forwards (see _DecodeModel)
        # completions without attention maps decode together across requests; an LSTM cannot
        self._batcher = None
        if self.model.has_attention:
            batch = DecodeBatch(self.model, DECODE_SLOTS, compile, self.tokenizer.vocab_size)
            self._batcher = _DecodeBatcher(batch, self._lock)

    # -- validation ---------------------------------------------------------------------------------
    def encode(self, text: str, param: str = "text") -> list[int]:
        """Token ids of `text`; EngineError when it is not a string, empty, or over the context."""
        if not isinstance(text, str):
            raise _invalid(f"{param} must be a string", param)
        if not text:
            raise EngineError(f"{param} must not be empty", param=param, code="empty_text")
        ids = self.tokenizer.encode(text)
        if len(ids) > self.max_context:
            raise EngineError(
                f"{param} is {len(ids)} tokens; the context window is {self.max_context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def check_attention_options(self, options: AttentionOptions) -> None:
        """EngineError (code "out_of_range") for a layer or head the model does not have."""
        if not isinstance(options, AttentionOptions):
            raise _invalid("attention options must be AttentionOptions", "attention")
        if not self.model.has_attention:
            raise EngineError(
                f"model {self.model_name!r} is an {self.config.arch.upper()}: it has no "
                "attention maps (next-token and completions without return_attention work)",
                param="return_attention",
                code="attention_unavailable",
            )
        for name, values, count in (
            ("layers", options.layers, self.config.n_layer),
            ("heads", options.heads, self.config.n_head),
        ):
            bad = [i for i in values or () if not 0 <= i < count]
            if bad:
                raise EngineError(
                    f"{name} {bad} out of range: the model has {count} {name}, "
                    f"indices 0..{count - 1}",
                    param=name,
                    code="out_of_range",
                )

    def _check_completion(self, prompt: str, params: CompletionParams) -> list[int]:
        if not isinstance(params, CompletionParams):
            raise TypeError(f"params must be CompletionParams, got {type(params).__name__}")
        if params.max_tokens > self.max_tokens_limit:
            raise EngineError(
                f"max_tokens must be at most {self.max_tokens_limit}, got {params.max_tokens}",
                param="max_tokens",
                code="invalid_value",
            )
        if params.attention is not None:
            self.check_attention_options(params.attention)
        return self.encode(prompt, param="prompt")

    # -- one-forward endpoints ----------------------------------------------------------------------
    def _forward(self, rows: list[list[int]], return_attention: bool = False) -> GPTOutput:
        """One forward over right-padded rows; logits cut to the tokenizer's vocabulary."""
        idx = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)  # (B, T)
        for b, ids in enumerate(rows):
            idx[b, : len(ids)] = torch.tensor(ids)
        out = self.model(idx.to(self.device), return_attention=return_attention)
        return out._replace(logits=out.logits[..., : self.tokenizer.vocab_size])

    def _batches(self, rows: list[list[int]], return_attention: bool = False):
        """Batched forwards over `rows`: yields (placements, GPTOutput), where a placement
        (i, r, s) says that rows[i] sits in row r of the output from position s.

        Attention models pack: texts side by side in rows of `PACK_TOKENS`, each with its own
        positions and attending only to itself (`segments`), so one forward of nearly no padding
        serves them all (texts of 4 to 27 tokens: 1.5x faster than length buckets). A model
        without attention (the LSTM) cannot: rows sorted by length are cut into buckets whose
        right padding stays under `MAX_PADDING` of their tokens.
        """
        lengths = [len(r) for r in rows]
        if not self.model.has_attention:
            for bucket in length_buckets(lengths, MAX_PADDING):
                placements = [(i, b, 0) for b, i in enumerate(bucket)]
                yield placements, self._forward([rows[i] for i in bucket], return_attention)
            return
        packed = pack_rows(lengths, min(max(max(lengths), PACK_TOKENS), self.max_context))
        width = max(sum(lengths[i] for i in row) for row in packed)
        idx = torch.zeros(len(packed), width, dtype=torch.long)  # (B, T)
        segments = torch.full((len(packed), width), -1, dtype=torch.long)  # padding: its own
        placements = []
        for r, row in enumerate(packed):
            start = 0
            for i in row:
                n = lengths[i]
                idx[r, start : start + n] = torch.tensor(rows[i])
                segments[r, start : start + n] = i
                placements.append((i, r, start))
                start += n
        out = self.model(
            idx.to(self.device),
            return_attention=return_attention,
            segments=segments.to(self.device),
        )
        yield placements, out._replace(logits=out.logits[..., : self.tokenizer.vocab_size])

    @torch.inference_mode()
    def next_token(self, texts: list[str], top_k: int = 10) -> list[NextToken]:
        """The `top_k` most likely next tokens after each text, from one packed forward."""
        vocab = self.tokenizer.vocab_size
        if not _is_int(top_k) or not 1 <= top_k <= vocab:
            raise _invalid(f"top_k must be an integer in 1..{vocab}, got {top_k!r}", "top_k")
        rows = [self.encode(text) for text in texts]
        if not rows:
            return []
        logits = torch.empty(len(rows), self.tokenizer.vocab_size, device=self.device)  # (B, V)
        for placements, out in self._batches(rows):
            at = torch.tensor([(r, s + len(rows[i]) - 1) for i, r, s in placements])  # (n, 2)
            at = at.to(self.device)
            logits[[i for i, _, _ in placements]] = out.logits[at[:, 0], at[:, 1]].float()
        top_logprobs, top_ids = F.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
        top_logprobs, top_ids = top_logprobs.tolist(), top_ids.tolist()
        strings = self.tokenizer.token_strings([i for ids in top_ids for i in ids])
        results = []
        for b, ids in enumerate(rows):
            top = [
                {
                    "token": strings[b * top_k + j],
                    "token_id": i,
                    "prob": math.exp(lp),
                    "logprob": lp,
                }
                for j, (i, lp) in enumerate(zip(top_ids[b], top_logprobs[b], strict=True))
            ]
            results.append(NextToken(self.tokenizer.token_strings(ids), ids, top))
        return results

    def attention_map(
        self, token_ids: list[int], att: torch.Tensor, options: AttentionOptions
    ) -> AttentionMap:
        """The selected, aggregated and encoded map of one text's att (L, H, T, T)."""
        layers = list(range(self.config.n_layer)) if options.layers is None else options.layers
        heads = list(range(self.config.n_head)) if options.heads is None else options.heads
        data = select_attention(att, layers, heads, options.aggregation)
        return AttentionMap(
            tokens=self.tokenizer.token_strings(token_ids),
            token_ids=list(token_ids),
            n_layers=self.config.n_layer,
            n_heads=self.config.n_head,
            layers=list(layers),
            heads=list(heads),
            aggregation=options.aggregation,
            attention=encode_array(data, options.encoding, options.decimals),
        )

    @torch.inference_mode()
    def attention(
        self,
        texts: Sequence[str | AttentionQuery],
        options: Sequence[AttentionOptions] | AttentionOptions | None = None,
    ) -> list[AttentionMap]:
        """Attention maps of texts from batched forwards (length buckets).

        Args:
            texts: strings, or AttentionQuery (text + options; then `options` is left out).
            options: one AttentionOptions for all texts, or one per text; default all, "none".
        """
        texts = list(texts)
        if options is None or isinstance(options, AttentionOptions):
            options = [options or AttentionOptions()] * len(texts)
        options = list(options)
        if len(options) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(options)} attention options")
        for i, text in enumerate(texts):
            if isinstance(text, AttentionQuery):
                texts[i], options[i] = text.text, text.options
        for opts in options:
            self.check_attention_options(opts)
        rows = [self.encode(text) for text in texts]
        if not rows:
            return []
        maps: list[AttentionMap | None] = [None] * len(rows)
        for placements, out in self._batches(rows, return_attention=True):
            att = out.attention  # (L, rows, H, T, T)
            for i, r, s in placements:
                n = len(rows[i])
                maps[i] = self.attention_map(
                    rows[i], att[:, r, :, s : s + n, s : s + n], options[i]
                )
        return maps

    # -- probe -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def probe(self, text: str, subject: str | None = None, verb: str | None = None) -> ProbeResult:
        """The agreement probe on one sentence (`attnlm.probe`): subject and main verb found in
        `text` (or named), whether the model prefers the verb form that agrees with the subject,
        and each head's attention from the verb-predicting position to the subject."""
        ids = self.encode(text)
        for name, word in (("subject", subject), ("verb", verb)):
            if word is not None and (not isinstance(word, str) or not word.strip()):
                raise _invalid(f"{name} must be a non-empty string or null", name)
        try:
            item = analyze(self.tokenizer, text, subject, verb)
        except ProbeError as err:
            raise EngineError(str(err), param=err.param or "text", code="probe_failed") from err
        needed = 1 + len(item.prefix_ids) + max(len(item.verb_ids), len(item.wrong_ids or []))
        if needed > self.max_context:
            raise EngineError(
                f"text up to the verb with its forms is {needed} tokens (with the end-of-text "
                f"token before it); the context window is {self.max_context} tokens",
                param="text",
                code="context_length_exceeded",
            )
        score = score_items(
            self.model, [item], self.tokenizer.eot_id, vocab_size=self.tokenizer.vocab_size
        )[0]
        best = None
        att = score.attention_to_subject
        if att is not None:
            layer, head = divmod(int(att.argmax()), att.size(1))
            best = {"layer": layer, "head": head, "weight": round(float(att[layer, head]), 4)}
        verdict = None if score.correct is None else ("correct" if score.correct else "wrong")
        return ProbeResult(
            tokens=self.tokenizer.token_strings(ids),
            token_ids=ids,
            subject={"text": item.subject, "token_positions": item.subject_positions},
            verb={
                "as_written": item.written_verb,
                "correct": item.verb,
                "wrong": item.wrong_verb,
                "token_position": item.verb_position,
            },
            number=item.number,
            distance=item.distance,
            agreement={
                "verdict": verdict,
                "correct_logprob": round(score.correct_logprob, 4),
                "wrong_logprob": None
                if score.wrong_logprob is None
                else round(score.wrong_logprob, 4),
            },
            attention_to_subject=None
            if att is None
            else [[round(float(x), 4) for x in row] for row in att],
            best_head=best,
        )

    # -- completions ------------------------------------------------------------------------------------
    def complete(self, prompt: str, params: CompletionParams) -> Completion:
        """`params.n` samples continuing `prompt`, decoded together on the KV cache."""
        run = self._start(prompt, params)
        for _ in self._steps(run, chunk=COMPLETION_CHUNK):
            pass
        base = len(prompt) if params.echo else 0
        echo_logprobs = self._prompt_logprobs(run)
        choices = []
        for index, row in enumerate(run.rows):
            text, records, offsets = row.take()
            logprobs = None
            if params.logprobs is not None:
                logprobs = _join_logprobs(echo_logprobs, _logprobs_dict(records, offsets, base))
            choice = Choice(
                text=prompt + text if params.echo else text,
                index=index,
                finish_reason=row.finish_reason,
                logprobs=logprobs,
            )
            if params.attention is not None:
                attention = asdict(self._row_attention(run, index))
                choice.tokens, choice.attention = attention["tokens"], attention
            choices.append(choice)
        return Completion(
            choices=choices,
            prompt_tokens=len(run.prompt_ids),
            completion_tokens=sum(len(row.generated) for row in run.rows),
        )

    def stream(self, prompt: str, params: CompletionParams) -> Iterator[CompletionDelta]:
        """`complete` one delta at a time: per step and choice, the text that became final (an
        incomplete UTF-8 character or a possible start of a stop string is held back); each
        choice's last delta has its finish_reason (and, with attention, its map). The parameters
        are checked here, before the first delta is asked for."""
        run = self._start(prompt, params)
        return self._deltas(run)

    def _deltas(self, run: _Run) -> Iterator[CompletionDelta]:
        params = run.params
        base = len(run.prompt) if params.echo else 0
        if params.echo:
            echo_logprobs = self._prompt_logprobs(run)
            for index in range(params.n):
                yield CompletionDelta(index, run.prompt, None, echo_logprobs)
        for _ in self._steps(run):
            for index in range(params.n):
                delta = self._delta(run, index, base)
                if delta is not None:
                    yield delta
        for index in range(params.n):
            delta = self._delta(run, index, base)
            if delta is not None:
                yield delta

    def _delta(self, run: _Run, index: int, base: int) -> CompletionDelta | None:
        row = run.rows[index]
        if row.closed:
            return None
        text, records, offsets = row.take()
        if not text and not records and row.finish_reason is None:
            return None
        logprobs = None
        if run.params.logprobs is not None:
            logprobs = _logprobs_dict(records, offsets, base)
        delta = CompletionDelta(index, text, row.finish_reason, logprobs)
        if row.finish_reason is not None:
            row.closed = True
            if run.params.attention is not None:
                attention = asdict(self._row_attention(run, index))
                delta.tokens, delta.attention = attention["tokens"], attention
        return delta

    def _start(self, prompt: str, params: CompletionParams) -> _Run:
        prompt_ids = self._check_completion(prompt, params)
        rows = [_Row(self.tokenizer, params.stop, self.tokenizer.eot_id) for _ in range(params.n)]
        return _Run(prompt, prompt_ids, params, rows)

    def _steps(self, run: _Run, chunk: int = 1) -> Iterator[None]:
        """Decode until every row has finished; yields after each step (batched decoding hands
        the steps over `chunk` at a time)."""
        params = run.params
        sampling = SamplingParams(
            max_new_tokens=params.max_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            stop_token_ids=(self.tokenizer.eot_id,),
            seed=params.seed,
        )
        prompt = torch.tensor([run.prompt_ids] * params.n, device=self.device)  # (n, T)
        if params.attention is None and self._batcher is not None:
            steps = self._batcher.stream(prompt, sampling, chunk)
        else:  # the map needs each step's attention rows: this request decodes alone
            model = _DecodeModel(self.model, self.tokenizer.vocab_size, self._lock)
            steps = generate_stream(
                model, prompt, sampling, params.attention is not None, run.prefill
            )
        try:
            for step in steps:
                tokens = step.tokens.tolist()
                records = self._step_records(step.tokens, step.logits, params.logprobs)
                if step.attention is not None:
                    run.attention_rows.append(step.attention)
                for row, token, record in zip(run.rows, tokens, records, strict=True):
                    if row.finish_reason is None:
                        row.add(token, record)
                yield
                if all(row.finish_reason is not None for row in run.rows):
                    break
        finally:
            steps.close()
        for row in run.rows:
            if row.finish_reason is None:
                row.finish_reason = "length"

    @torch.inference_mode()
    def _step_records(
        self, tokens: torch.Tensor, logits: torch.Tensor, k: int | None
    ) -> list[tuple | None]:
        """Per row: (chosen token's string, its logprob, {string: logprob} of the top k and the
        chosen one), or None without logprobs."""
        if k is None:
            return [None] * tokens.size(0)
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (n, V)
        chosen = logprobs.gather(1, tokens[:, None])[:, 0].tolist()  # (n,)
        top_logprobs, top_ids = logprobs.topk(k, dim=-1)  # (n, k)
        top_logprobs, top_ids = top_logprobs.tolist(), top_ids.tolist()
        ids = tokens.tolist()
        strings = self.tokenizer.token_strings(ids + [i for row in top_ids for i in row])
        records = []
        for b in range(len(ids)):
            token_string = strings[b]
            start = len(ids) + b * k
            top = dict(zip(strings[start : start + k], top_logprobs[b], strict=True))
            top.setdefault(token_string, chosen[b])
            records.append((token_string, chosen[b], top))
        return records

    @torch.inference_mode()
    def _prompt_logprobs(self, run: _Run) -> dict | None:
        """Logprobs of the prompt's tokens (the first has none), for echo with logprobs."""
        k = run.params.logprobs
        if not run.params.echo or k is None:
            return None
        ids = run.prompt_ids
        logprobs = F.log_softmax(self._forward([ids]).logits[0].float(), dim=-1)  # (T, V)
        records: list[tuple | None] = [None] * len(ids)
        for i in range(1, len(ids)):
            records[i] = self._step_records(
                torch.tensor([ids[i]], device=logprobs.device), logprobs[i - 1 : i], k
            )[0]
        strings = self.tokenizer.token_strings(ids)
        prompt_row = _Row(self.tokenizer)
        for token in ids:
            prompt_row.add(token)
        return {
            "tokens": strings,
            "token_logprobs": [None if r is None else r[1] for r in records],
            "top_logprobs": [None if r is None else r[2] for r in records],
            "text_offset": prompt_row.offsets,
        }

    @torch.inference_mode()
    def _row_attention(self, run: _Run, index: int) -> AttentionMap:
        """The map over the prompt and every token row `index` sampled, from the prefill map and
        the decode steps' rows (no recomputation)."""
        row = run.rows[index]
        ids = run.prompt_ids + row.generated
        if run.prefill:
            full = assemble_attention(
                run.prefill[0][:, index : index + 1],
                [r[:, index : index + 1] for r in run.attention_rows[: len(row.generated)]],
            )[:, 0]  # (L, H, T + g, T + g)
        else:  # the prompt filled the context: nothing was decoded
            full = self._forward([ids], return_attention=True).attention[:, 0]
        return self.attention_map(ids, full, run.params.attention)
