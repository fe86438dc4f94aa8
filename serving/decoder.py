"""The decode side of completions: the engine's model as a decoder's own, and the thread that
decodes every completion in flight together on one `attnlm.batching.DecodeBatch`.

    batcher = DecodeBatcher(DecodeBatch(model, slots=32, compile=True), lock)
    for step in batcher.stream(prompt_ids, SamplingParams(max_new_tokens=16)):  # GenerationSteps
        ...

`DecodeModel` wraps the shared model for `attnlm.generate.stream` (requests that want attention
maps, and LSTM models, decode alone): logits cut to the tokenizer's ids, KV caches of its own,
the engine's lock around each forward. `DecodedQK` is such a request's attention sink: the q and k
of the layers its maps need, from the prefill and every decode step (each layer through SDPA),
from which the maps asked for are computed once the row is done. `DecodeBatcher` schedules
requests onto the batch from one background thread; `serving.engine.Engine` owns all three.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator

import torch

from attnlm.batching import DecodeBatch, DecodeRequest
from attnlm.generate import GenerationStep, SamplingParams
from attnlm.lstm import LSTMLM
from attnlm.model import GPT, GPTOutput


class DecodeModel:
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
        **attention,
    ) -> GPTOutput:
        """The model's forward (`attention`: its return_attention, attention_layers and
        attention_sink, as `attnlm.generate.stream` passes them)."""
        with self._lock:
            if self._caches is not None:
                self.model.load_kv_cache_state(self._caches)
            try:
                out = self.model(idx, input_pos=input_pos, row_positions=row_positions, **attention)
            finally:
                self.model.clear_kv_cache()
        return out._replace(logits=out.logits[..., : self.vocab_size])  # (B, T, V_tokenizer)


class DecodedQK:
    """An `attention_sink` for `attnlm.generate.stream`: the q and k of one completion's
    `layers`, the prefill's and each fed token's. A row's maps are computed from them afterwards
    (`serving.attention_maps`: only the layers, heads and rows asked for), so the decode runs
    every layer through SDPA and never holds a (layers, rows, heads, T, T) map."""

    def __init__(self, layers: list[int]) -> None:
        self.layers = layers
        self._queries: dict[int, list[torch.Tensor]] = {i: [] for i in layers}  # (n, H, t, hs)
        self._keys: dict[int, torch.Tensor] = {}  # (n, H, T_k, hs): every position fed so far

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        self._queries[layer].append(q)
        self._keys[layer] = k  # a view of the request's own KV cache, which only grows

    @property
    def positions(self) -> int:
        """How many positions were fed so far (0: none, the prompt was never run)."""
        keys = self._keys.get(self.layers[0])
        return 0 if keys is None else keys.size(2)

    def row(self, index: int, length: int, n_layer: int) -> list[tuple | None]:
        """Row `index`'s (q, k), each (H, length, hs), over its first `length` positions, for
        each of `n_layer` layers: None for a layer not kept."""
        if length > self.positions:
            raise ValueError(f"{length} positions asked for; {self.positions} were fed")
        qk: list[tuple | None] = [None] * n_layer
        for layer in self.layers:
            q = torch.cat([part[index] for part in self._queries[layer]], dim=1)  # (H, T_k, hs)
            qk[layer] = (q[:, :length], self._keys[layer][index, :, :length])
        return qk


class _BatchRun:
    """One completion (n rows) handed to `DecodeBatcher`: waiting for slots, then decoding.
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


class DecodeBatcher:
    """Schedules concurrent completions onto one `attnlm.batching.DecodeBatch`, which decodes
    them together: each request is prefilled alone into its slots of one shared KV cache, then
    every decode step is one forward over the active rows of all requests, each row at its own
    position, each request sampling with its own parameters and seed (the same
    `GenerationStep`s as `attnlm.generate.stream` alone). A request waits for free slots when
    all are taken, first come first served. The work runs on one background thread, holding
    `lock` (the engine's, see DecodeModel) around the batch's forwards; a closed stream leaves
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
