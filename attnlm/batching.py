"""Continuous batched decoding: many requests share the rows (slots) of one KV cache and every
decode step is one forward over all of them, each row at its own position.

    batch = DecodeBatch(model, slots=32)
    a = batch.add(prompt_a, SamplingParams(max_new_tokens=16, temperature=0))   # (n, T) ids
    b = batch.add(prompt_b, SamplingParams(max_new_tokens=8, seed=3))           # any T, any time
    while batch.requests:
        for request, step in batch.step():     # one GenerationStep per request still decoding
            ...                                # request.done: that was its last step

A request is prefilled alone (one forward of its prompt, writing its keys and values straight
into its slots of the shared cache: `StaticDecoder.prefill`); then each `step` samples every active
row with its request's own parameters, generator, stop ids and budget (`SamplingState.choose`,
the step `attnlm.generate.stream` takes too) and feeds the rows that go on in one decode step of
`attnlm.fastdecode.StaticDecoder`: its preallocated cache and token/position buffers, rows 0 ..
the highest active slot, keys 0 .. the furthest row's position, eager or compiled
(`compile=True`). Each request sees the same GenerationSteps as `stream` would give it alone.
Requests may join between any two steps and leave when they finish or are removed; their slots
are freed at once.

Synchronous and framework-free: one caller drives it (serving's engine schedules requests onto
it from one thread and holds its lock around `add` and `step`, the calls that run forwards).
Requests wanting attention rows, and models without attention (the LSTM: no per-row positions),
decode through `stream` instead.
"""

from __future__ import annotations

import torch

from attnlm.fastdecode import StaticDecoder
from attnlm.generate import GenerationStep, SamplingParams, SamplingState, token_budget
from attnlm.invariance import decode_shape
from attnlm.model import GPT


class DecodeRequest:
    """One request's rows in a DecodeBatch: its slots, sampling state and next logits."""

    def __init__(
        self, slots: list[int], sampling: SamplingState, prompt_length: int, device: torch.device
    ) -> None:
        self.slots = slots  # rows of the shared cache, ascending
        self.slot_index = torch.tensor(slots, device=device)  # (n,)
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        # what indexes its rows: a slice where it can (a view, not a gather), else slot_index
        self.rows = slice(slots[0], slots[-1] + 1) if contiguous else self.slot_index
        self.sampling = sampling
        self.position = prompt_length  # where the next fed token goes
        self.logits: torch.Tensor | None = None  # (n, V) float32: what the next token comes from
        self.done = False  # finished or removed: it holds no slots any more


class DecodeBatch:
    """Requests decoded together on `slots` rows of one shared KV cache (see the module doc).

    Args:
        model: a GPT with attention.
        slots: rows of the shared cache; a request of n rows needs n free slots.
        compile: compile the decode step now (`attnlm.fastdecode.StaticDecoder`).
        vocab_size: sample only ids below this (a model vocabulary padded past the tokenizer's);
            the logits handed out are cut to it. Default: the model's.
    """

    def __init__(
        self, model: GPT, slots: int, compile: bool = False, vocab_size: int | None = None
    ) -> None:
        if not model.config.has_attention:
            raise ValueError("batched decoding needs per-row positions: a model with attention")
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.model = model
        self.n_slots = slots
        self.vocab_size = model.config.vocab_size if vocab_size is None else vocab_size
        self._full_vocab = self.vocab_size >= model.config.vocab_size  # nothing to cut
        self.requests: list[DecodeRequest] = []  # decoding now, in the order they joined
        self._free = list(range(slots))
        # the shared cache (per layer, `slots` rows) and, per slot, the last token and where it
        # is fed (idle: token 0 at position 0)
        self.decoder = StaticDecoder(model, slots, compile=compile)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @torch.inference_mode()
    def add(self, prompt: torch.Tensor, params: SamplingParams) -> DecodeRequest | None:
        """Prefill `prompt` (n, T) into n free slots; its first step comes with the next `step`.

        Returns:
            the request, or None when its budget is 0 (nothing to decode; no slots taken).
        Raises:
            ValueError for a bad prompt or fewer than n free slots.
        """
        if prompt.dim() != 2 or prompt.size(1) == 0:
            raise ValueError(f"prompt must be (n, T) with T >= 1, got shape {tuple(prompt.shape)}")
        n, T = prompt.shape
        block_size = self.model.config.block_size
        if T > block_size:
            raise ValueError(f"prompt has {T} tokens; the context window is {block_size}")
        budget = token_budget(params, T, block_size)
        if budget == 0:
            return None
        if n > len(self._free):
            raise ValueError(f"{n} rows; the batch has {len(self._free)} free slots")
        self._free.sort()  # lowest slots first: the decoded rows stay few
        sampling = SamplingState(params, n, budget, prompt.device, prompt)
        request = DecodeRequest(self._free[:n], sampling, T, prompt.device)
        request.logits = self._cut(self.decoder.prefill(prompt, request.slot_index))  # (n, V)
        del self._free[:n]
        self.requests.append(request)
        return request

    @torch.inference_mode()
    def remove(self, request: DecodeRequest) -> None:
        """Take `request` out of the batch (cancelled, or failed) and free its slots."""
        if request.done:
            return
        request.done = True
        self.requests.remove(request)
        self.decoder.tokens[request.rows] = 0  # idle slots feed token 0 at position 0,
        self.decoder.positions[request.rows] = 0  # which the next prefill overwrites
        self._free += request.slots
        request.slots = []

    @torch.inference_mode()
    def step(self) -> list[tuple[DecodeRequest, GenerationStep]]:
        """Sample one token for every row of every request; feed the rows that go on in one
        forward. A request whose step was its last (`request.done`) has left the batch.

        Returns:
            (request, its GenerationStep) for every request that was in the batch.
        """
        results, feeding = [], []
        for request in list(self.requests):
            step, last = request.sampling.choose(request.logits)
            results.append((request, step))
            if last:
                self.remove(request)
            else:
                feeding.append(request)
                self.decoder.tokens[request.rows] = step.tokens
                self.decoder.positions[request.rows] = request.position
        if feeding:
            width = max(request.slots[-1] for request in feeding) + 1
            key_length = max(request.position for request in feeding) + 1
            if self.model.batch_invariant:  # rows and keys the others change nothing in
                width, key_length = decode_shape(
                    width, key_length, self.n_slots, self.decoder.length
                )
            logits = self._cut(self.decoder.step(width, key_length))  # (width, V)
            for request in feeding:
                request.logits = logits[request.rows]  # (n, V)
                request.position += 1
        return results

    def _cut(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) of the tokenizer's ids only, for a vocabulary padded past them."""
        return logits if self._full_vocab else logits[:, : self.vocab_size]
