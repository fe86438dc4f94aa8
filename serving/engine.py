"""The model work behind the HTTP API: next-token distributions, attention maps, completions.

Pure Python on the attnlm core (model, KV-cache generation loop, tokenizer, artifact); no Ray,
FastAPI or pydantic, so it runs and is tested on its own. `serving/app.py` puts it behind a Ray
Serve deployment and turns `EngineError` into OpenAI's error body (docs/serving.md). Its parts:
`serving.params` (parameters, results, EngineError; bounds from `serving.limits`),
`serving.forwards` (texts packed into few forwards), `serving.attention_maps` (selection,
rollout, encoding), `serving.detok` (incremental text, stop strings, logprobs),
`serving.decoder` (the thread that decodes completions together) and `serving.sentence_probe`
(`probe`).

    engine = Engine("artifacts/tiny")                  # cuda + bf16 when available, else cpu + fp32
    engine.next_token(["The cats near the dog"], top_k=5)[0].top
    engine.attention(["The cat sits."], AttentionOptions(aggregation="rollout"))[0].attention
    engine.complete("The cat", CompletionParams(max_tokens=8, temperature=0)).choices[0].text
    for delta in engine.stream("The cat", CompletionParams(stop=["."])):
        print(delta.text, end="")

`next_token` and `attention` batch any number of texts in one forward, packed side by side in
rows (each text with its own positions, attending only to itself: the same numbers as alone, with
almost no padding); an LSTM model gets right-padded length buckets instead, a batch-invariant
engine texts padded to multiples of 16 (`attnlm.invariance`). Completions decode
their `n` samples on the KV cache; those in flight at the same time share each decode step
(`serving.decoder.DecodeBatcher`, on the compiled decode step with `compile=True`), except
requests for attention maps, which go through `attnlm.generate.stream` alone, every layer through
SDPA, keeping the q and k of the layers their maps need (`serving.decoder.DecodedQK`). The served
vocabulary is the tokenizer's (`load_artifact` crops a padded folder's extra rows).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from attnlm import invariance
from attnlm.artifact import load_artifact
from attnlm.batching import DecodeBatch
from attnlm.fastdecode import preferred_dtype, weight_bytes
from attnlm.generate import SamplingParams
from attnlm.generate import stream as generate_stream
from serving.attention_cache import QKCache
from serving.attention_maps import attention_map, check_attention_options, layers_needed
from serving.attention_select import check_answer_size
from serving.chat import ChatTemplate, no_chat_template
from serving.decoder import DecodeBatcher, DecodedQK, DecodeModel
from serving.detok import Row, join_logprobs, logprobs_dict, prompt_logprobs, token_records
from serving.forwards import TextForwards
from serving.limits import (
    DEFAULT_ATTENTION_CACHE_BYTES,
    DEFAULT_MAX_ATTENTION_BYTES,
    DEFAULT_TOP_K,
)
from serving.params import (
    AttentionMap,
    AttentionOptions,
    AttentionQuery,
    Choice,
    Completion,
    CompletionDelta,
    CompletionParams,
    EngineError,
    NextToken,
    ProbeResult,
    conflict,
    invalid,
    is_int,
)
from serving.sentence_probe import probe_sentence
from serving.text import (
    check_text,
    check_token_ids,
    context_exceeded,
    max_text_chars,
    unicode_error,
)

DECODE_SLOTS = 32  # rows of the shared KV cache that concurrent completions decode in
# decode steps a non-streamed completion's thread takes at once (one wake-up each); a stop string
# is seen at most this many steps late, which are decoded in vain
COMPLETION_CHUNK = 16
log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _Run:
    """The state of one completion's decoding, shared by `complete` and `stream`."""

    prompt: str
    prompt_ids: list[int]
    params: CompletionParams
    rows: list[Row]
    qk: DecodedQK | None = None  # with attention: the q, k of the layers its maps need


def sampling_params(params: CompletionParams, stop_token_ids: Sequence[int]) -> SamplingParams:
    """The decoder's SamplingParams of a completion's (rows end on `stop_token_ids`)."""
    return SamplingParams(
        max_new_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        stop_token_ids=tuple(stop_token_ids),
        seed=params.seed,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        repetition_penalty=params.repetition_penalty,
        logit_bias=params.logit_bias,
        min_tokens=params.min_tokens,
    )


def best_rows(rows: list[Row], n: int) -> list[Row]:
    """The n rows of best mean logprob over their sampled tokens (best_of), best first; all rows,
    in order, when there are n."""
    if len(rows) == n:
        return rows
    return sorted(rows, key=lambda r: -r.logprob_sum / max(len(r.generated), 1))[:n]


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
        batch_invariant: bool = False,
        attention_cache_bytes: int = DEFAULT_ATTENTION_CACHE_BYTES,
        max_attention_bytes: int = DEFAULT_MAX_ATTENTION_BYTES,
    ) -> None:
        """Load `artifact` (an `attnlm export` folder); ArtifactError propagates.

        Args:
            device: "cuda", "cpu", ...; default cuda when available.
            dtype: "float32" | "bfloat16" | "float16" | "auto" (bfloat16 where the hardware
                has it and the model is large enough for it to pay:
                `attnlm.fastdecode.preferred_dtype`); default bfloat16 on cuda, float32 on cpu.
            max_tokens_limit: the largest `max_tokens` a completion may ask; default the context.
            compile: compile the decode step completions share (`attnlm.fastdecode`: inductor
                on CPU, CUDA graphs on CUDA), warmed up here; eager, logged, where it cannot.
            batch_invariant: a request's numbers do not depend on what else is batched with
                it (`attnlm.invariance`; slower): the model's batch-invariant attention, texts
                padded to multiples of 16 instead of packed rows, decode steps of fixed minimum
                shapes; checked
                here on the model's weights (`invariance_problem`, logged, says what failed).
                Transformers only.
            attention_cache_bytes, max_attention_bytes: see `configure_attention`.
        """
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        elif dtype == "auto":
            dtype = None  # chosen for the model's size once it is loaded
        elif isinstance(dtype, str):
            if dtype not in _DTYPES:
                names = ", ".join([*_DTYPES, "auto"])
                raise ValueError(f"dtype must be one of {names}; got {dtype!r}")
            dtype = _DTYPES[dtype]
        loaded = load_artifact(artifact, device=self.device, dtype=dtype)
        self.model = loaded.model.eval()
        if dtype is None:
            dtype = preferred_dtype(self.device, weight_bytes(self.model))
            self.model.to(dtype)
        self.dtype = dtype
        if batch_invariant and not self.model.has_attention:
            raise ValueError(
                f"batch_invariant needs a Transformer; {artifact} holds an "
                f"{loaded.config.arch.upper()}"
            )
        if batch_invariant:
            self.model.set_batch_invariant(True)
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.info = loaded.info
        self.artifact_path = loaded.path
        self.chat_template = ChatTemplate.of(loaded.path)  # None: chat completions are a 404
        self.model_name = Path(artifact).resolve().name
        self.max_context = self.config.block_size
        self._max_text_chars = max_text_chars(self.tokenizer, self.max_context)
        self._forwards = TextForwards(
            self.model, self.tokenizer.vocab_size, self.max_context, self.device, batch_invariant
        )
        if max_tokens_limit is None:
            max_tokens_limit = self.max_context
        if not is_int(max_tokens_limit) or max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be an integer >= 1, got {max_tokens_limit!r}")
        self.max_tokens_limit = max_tokens_limit
        self._qk_cache = QKCache(0)
        self.configure_attention(attention_cache_bytes, max_attention_bytes)
        self._lock = threading.Lock()  # held by KV-cache forwards (see DecodeModel)
        # completions without attention maps decode together across requests; an LSTM cannot
        self._batcher = None
        if self.model.has_attention:
            batch = DecodeBatch(self.model, DECODE_SLOTS, compile, self.tokenizer.vocab_size)
            self._batcher = DecodeBatcher(batch, self._lock)
        self.invariance_problem = None  # what the start-up check found (batch_invariant)
        if batch_invariant:
            self.invariance_problem = invariance.check(self.model, batch)
            if self.invariance_problem is not None:
                log.warning("batch_invariant does not hold here: %s", self.invariance_problem)

    def configure_attention(self, cache_bytes: int, max_answer_bytes: int) -> None:
        """The bytes of recent texts' q and k kept for their next attention request (float16,
        least recently used out; 0: none kept, `serving.attention_cache`) and the most bytes one
        attention answer may carry (over it: a 400 `answer_too_large`); ValueError if bad."""
        if (
            isinstance(max_answer_bytes, bool)
            or not is_int(max_answer_bytes)
            or max_answer_bytes < 1
        ):
            raise ValueError(
                f"max_attention_bytes must be an integer >= 1, got {max_answer_bytes!r}"
            )
        if self._forwards.batch_invariant and cache_bytes:  # a hit's float16 q, k: other bits
            log.info("batch_invariant: no attention cache (attention_cache_bytes %d)", cache_bytes)
            cache_bytes = 0
        self._qk_cache.resize(cache_bytes)
        self.max_attention_bytes = max_answer_bytes

    # -- validation ---------------------------------------------------------------------------------
    def encode(self, text: str | list[int], param: str = "text") -> list[int]:
        """Token ids of `text`, or the token ids given (a prompt); EngineError when it is empty,
        not valid Unicode, an id out of the vocabulary, or over the context (`serving.text`)."""
        if isinstance(text, list):
            ids = check_token_ids(text, self.tokenizer.vocab_size, param)
        else:
            check_text(text, param)
            # over the context even in the longest tokens: not worth tokenizing (a 1 MiB text ~1 s)
            ids = self.tokenizer.encode(text) if len(text) <= self._max_text_chars else None
        if ids is None or len(ids) > self.max_context:
            raise context_exceeded(
                param, None if ids is None else len(ids), len(text), self.max_context
            )
        return ids

    def tokenize(self, text: str) -> list[int]:
        """Token ids of any text (`POST /tokenize`: also over the context window)."""
        error = unicode_error(text)
        if error is not None:
            raise invalid(error, "prompt")
        return self.tokenizer.encode(text)

    def detokenize(self, ids: list[int]) -> str:
        """The text of token ids (`POST /detokenize`), each checked against the vocabulary."""
        if not ids:
            return ""
        return self.tokenizer.decode(check_token_ids(ids, self.tokenizer.vocab_size, "tokens"))

    def chat_prompt(self, messages: list[dict]) -> str:
        """The prompt of chat messages through the folder's chat template; a 404
        `chat_template_missing` without one."""
        if self.chat_template is None:
            raise no_chat_template(self.model_name)
        return self.chat_template.render(messages)

    def check_attention_options(self, options: AttentionOptions) -> None:
        """EngineError for options this model cannot answer: code "attention_unavailable"
        without attention maps, "out_of_range" for a layer or head it does not have."""
        check_attention_options(self.config, options, self.model_name)

    def check_attention_request(
        self, text: str | list[int], options: AttentionOptions
    ) -> list[int]:
        """The text's token ids, after every check an attention request gets before its forward:
        the options (`check_attention_options`), the text, the answer's size for its length."""
        self.check_attention_options(options)
        ids = self.encode(text)
        check_answer_size(
            options,
            len(ids),
            self.config.n_layer,
            self.config.n_head,
            self.max_attention_bytes,
            "text",
        )
        return ids

    def check_top_k(self, top_k: int) -> None:
        """EngineError unless 1 <= top_k <= the tokenizer's vocabulary (next-token alternatives)."""
        vocab = self.tokenizer.vocab_size
        if not is_int(top_k) or not 1 <= top_k <= vocab:
            raise invalid(f"top_k must be an integer in 1..{vocab}, got {top_k!r}", "top_k")

    def _check_completion(self, prompt: str | list[int], params: CompletionParams) -> list[int]:
        if not isinstance(params, CompletionParams):
            raise TypeError(f"params must be CompletionParams, got {type(params).__name__}")
        vocab = self.tokenizer.vocab_size
        outside = [i for i in params.logit_bias if i >= vocab]
        if outside:
            raise invalid(
                f"logit_bias: token id {outside[0]} is not in the vocabulary (ids 0..{vocab - 1})",
                "logit_bias",
            )
        if params.max_tokens > self.max_tokens_limit:
            raise EngineError(
                f"max_tokens must be at most {self.max_tokens_limit}, got {params.max_tokens}",
                param="max_tokens",
                code="invalid_value",
            )
        ids = self.encode(prompt, param="prompt")
        if params.attention is not None:
            self.check_attention_options(params.attention)
            longest = min(len(ids) + params.max_tokens, self.max_context)
            config, limit = self.config, self.max_attention_bytes
            check_answer_size(
                params.attention, longest, config.n_layer, config.n_head, limit, "return_attention"
            )
        return ids

    # -- one-forward endpoints ----------------------------------------------------------------------
    @torch.inference_mode()
    def next_token(self, texts: list[str], top_k: int = DEFAULT_TOP_K) -> list[NextToken]:
        """The `top_k` most likely next tokens after each text, from one packed forward."""
        self.check_top_k(top_k)
        rows = [self.encode(text) for text in texts]
        if not rows:
            return []
        logits = self._forwards.last_logits(rows)  # (B, V)
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

    @torch.inference_mode()
    def attention(
        self,
        texts: Sequence[str | list[int] | AttentionQuery],
        options: Sequence[AttentionOptions] | AttentionOptions | None = None,
    ) -> list[AttentionMap]:
        """Attention maps of texts: another selection of a text in the q/k cache is computed
        from its kept q, k; the others from one packed SDPA forward that keeps q and k
        (`serving.attention_maps`: only the layers, heads and rows asked for are computed).

        Args:
            texts: strings or token ids, or AttentionQuery (text + options; then `options` is
                left out).
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
        rows = [self.check_attention_request(t, o) for t, o in zip(texts, options, strict=True)]
        maps: list[AttentionMap | None] = [None] * len(rows)
        cache = self._qk_cache if self._qk_cache.enabled else None
        for i, ids in enumerate(rows):  # another selection of a recent text: no forward
            entry = cache.get(ids) if cache is not None else None
            if entry is not None:
                maps[i] = self._map_from_qk(ids, entry, options[i], "hit")
        missing = [i for i, m in enumerate(maps) if m is None]
        if missing:
            self._attention_forward(
                [rows[i] for i in missing], [options[i] for i in missing], cache, maps, missing
            )
        return maps

    def _attention_forward(
        self,
        rows: list[list[int]],
        options: list[AttentionOptions],
        cache: QKCache | None,
        maps: list[AttentionMap | None],
        where: list[int],
    ) -> None:
        """One packed SDPA forward over `rows` up to the q, k of the layers needed (all with
        the cache on, which keeps them; `TextForwards.keep_qk`: no logits); each text's map
        computed from its own q, k, into maps[where[j]] for rows[j]."""
        L = self.config.n_layer
        if cache is not None:
            layers = list(range(L))
        else:
            layers = sorted({i for opts in options for i in layers_needed(opts, L)})
        kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def sink(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
            kept[layer] = (q, k)  # (B, H, T, hs) each

        for group in self._forwards.groups(rows):  # one group, but in batch-invariant mode
            kept.clear()
            placements = self._forwards.keep_qk([rows[j] for j in group], layers, sink)
            for g, r, s in placements:
                j = group[g]
                n = len(rows[j])
                qk = [None] * L
                for layer, (q, k) in kept.items():
                    qk[layer] = (q[r, :, s : s + n], k[r, :, s : s + n])  # (H, n, hs)
                status = None if cache is None else "miss"
                maps[where[j]] = self._map_from_qk(rows[j], qk, options[j], status)
                if cache is not None:
                    cache.put(rows[j], qk)

    def _map_from_qk(
        self, ids: list[int], qk: list, options: AttentionOptions, cache: str | None
    ) -> AttentionMap:
        return attention_map(
            self.tokenizer,
            self.config,
            ids,
            options,
            qk=qk,
            blocks=self.model.transformer.h,
            dtype=self.dtype,
            cache=cache,
        )

    # -- probe -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def probe(self, text: str, subject: str | None = None, verb: str | None = None) -> ProbeResult:
        """The agreement probe on one sentence (`attnlm.probe`): subject and main verb found in
        `text` (or named), whether the model prefers the verb form that agrees with the subject,
        and each head's attention from the verb-predicting position to the subject."""
        return probe_sentence(
            self.model, self.tokenizer, self.max_context, text, self.encode(text), subject, verb
        )

    # -- completions ------------------------------------------------------------------------------------
    def complete(self, prompt: str | list[int], params: CompletionParams) -> Completion:
        """`params.n` samples continuing `prompt` (a text or token ids), decoded together on the
        KV cache."""
        run = self._start(prompt, params)
        prompt = run.prompt
        for _ in self._steps(run, chunk=COMPLETION_CHUNK):
            pass
        base = len(prompt) if params.echo else 0
        echo_logprobs = self._prompt_logprobs(run)
        choices = []
        for index, row in enumerate(best_rows(run.rows, params.n)):
            text, records, offsets = row.take()
            logprobs = None
            if params.logprobs is not None:
                logprobs = join_logprobs(echo_logprobs, logprobs_dict(records, offsets, base))
            choice = Choice(
                text=prompt + text if params.echo else text,
                index=index,
                finish_reason=row.finish_reason,
                logprobs=logprobs,
            )
            if params.attention is not None:
                attention = self._row_attention(run, index).body()
                choice.tokens, choice.attention = attention["tokens"], attention
            choices.append(choice)
        return Completion(
            choices=choices,
            prompt_tokens=len(run.prompt_ids),
            completion_tokens=sum(len(row.generated) for row in run.rows),
        )

    def stream(
        self, prompt: str | list[int], params: CompletionParams
    ) -> Iterator[CompletionDelta]:
        """`complete` one delta at a time: per step and choice, the text that became final (an
        incomplete UTF-8 character or a possible start of a stop string is held back); each
        choice's last delta has its finish_reason (and, with attention, its map). The parameters
        are checked here, before the first delta is asked for (best_of > 1 cannot stream)."""
        if params.best_of is not None and params.best_of > 1:
            raise conflict("best_of > 1 cannot be streamed (as in OpenAI's API)", "best_of")
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
            logprobs = logprobs_dict(records, offsets, base)
        delta = CompletionDelta(index, text, row.finish_reason, logprobs)
        if row.finish_reason is not None:
            row.closed = True
            if run.params.attention is not None:
                attention = self._row_attention(run, index).body()
                delta.tokens, delta.attention = attention["tokens"], attention
        return delta

    def _start(self, prompt: str | list[int], params: CompletionParams) -> _Run:
        prompt_ids = self._check_completion(prompt, params)
        if not isinstance(prompt, str):  # token ids: echo writes their text
            prompt = self.tokenizer.decode(prompt_ids)
        rows = [
            Row(self.tokenizer, params.stop, self.tokenizer.eot_id, params.min_tokens)
            for _ in range(params.candidates)
        ]
        return _Run(prompt, prompt_ids, params, rows)

    def _steps(self, run: _Run, chunk: int = 1) -> Iterator[None]:
        """Decode until every row has finished; yields after each step (batched decoding hands
        the steps over `chunk` at a time)."""
        params = run.params
        if params.max_tokens == 0:  # echo only: the prompt's scores, nothing decoded
            for row in run.rows:
                row.finish_reason = "length"
            return
        sampling = sampling_params(params, (self.tokenizer.eot_id,))
        rows = params.candidates
        prompt = torch.tensor([run.prompt_ids] * rows, device=self.device)  # (rows, T)
        if params.attention is None and self._batcher is not None:
            steps = self._batcher.stream(prompt, sampling, chunk)
        else:  # maps need each step's q and k (an LSTM cannot batch): this request decodes alone
            model = DecodeModel(self.model, self.tokenizer.vocab_size, self._lock)
            kept = {}
            if params.attention is not None:  # every layer through SDPA; these q, k kept
                run.qk = DecodedQK(layers_needed(params.attention, self.config.n_layer))
                kept = {"attention_layers": run.qk.layers, "attention_sink": run.qk}
            steps = generate_stream(model, prompt, sampling, **kept)
        try:
            for step in steps:
                tokens = step.tokens.tolist()
                records = token_records(self.tokenizer, step.tokens, step.logits, params.logprobs)
                scores = [0.0] * rows
                if rows > params.n:  # best_of: each row's mean logprob ranks it
                    logprobs = F.log_softmax(step.logits.float(), dim=-1)  # (rows, V)
                    scores = logprobs.gather(1, step.tokens[:, None])[:, 0].tolist()
                for row, token, record, score in zip(
                    run.rows, tokens, records, scores, strict=True
                ):
                    if row.finish_reason is None:
                        row.add(token, record)
                        row.logprob_sum += score
                yield
                if all(row.finish_reason is not None for row in run.rows):
                    break
                if params.deadline is not None:  # a 504 past it; `finally` frees the slots
                    params.deadline.check()
        finally:
            steps.close()
        for row in run.rows:
            if row.finish_reason is None:
                row.finish_reason = "length"

    @torch.inference_mode()
    def _prompt_logprobs(self, run: _Run) -> dict | None:
        """Logprobs of the prompt's tokens (the first has none), for echo with logprobs."""
        k = run.params.logprobs
        if not run.params.echo or k is None:
            return None
        logits = self._forwards.padded([run.prompt_ids]).logits[0]  # (T, V)
        return prompt_logprobs(self.tokenizer, run.prompt_ids, logits, k)

    @torch.inference_mode()
    def _row_attention(self, run: _Run, index: int) -> AttentionMap:
        """The map over the prompt and every token row `index` sampled: only the layers, heads
        and rows asked for, computed from the q and k its decode kept (no forward again)."""
        ids = run.prompt_ids + run.rows[index].generated
        options = run.params.attention
        if run.qk is None or run.qk.positions == 0:  # nothing decoded: the prompt alone
            (att_map,) = self.attention([ids], options)
            att_map.cache = None
            return att_map
        qk = run.qk.row(index, len(ids), self.config.n_layer)
        return self._map_from_qk(ids, qk, options, None)
