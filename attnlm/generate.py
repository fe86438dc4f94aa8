"""Text generation on top of the model's KV cache: prefill the prompt, then one token a step.

    params = SamplingParams(max_new_tokens=32, temperature=0.8, top_k=50, seed=0)
    result = generate(model, prompt_ids, params)               # prompt_ids: (B, T) LongTensor
    for step in stream(model, prompt_ids, params): ...         # one GenerationStep per new token

Temperature 0 is greedy. A seed makes sampling reproducible (a private torch.Generator, never
the global RNG). Before top-k / top-p / temperature, each row's logits are adjusted, in vLLM's
order: `logit_bias` is added (token id -> bias), `repetition_penalty` (vLLM's, over the prompt
and the row's tokens so far) divides positive logits and multiplies negative ones, then
`frequency_penalty` x (times the token was sampled in this row) and `presence_penalty` x (it was
sampled at all) are subtracted (OpenAI's definitions), and until `min_tokens` tokens were
sampled the stop tokens are ruled out. The logits a step reports (for logprobs) are the model's,
before these adjustments. With `return_attention=True` every step also carries the attention
row of the token just fed over all earlier positions, and `generate` assembles the full map of
prompt and completion from the prefill map plus those rows, without recomputing the prefix;
`attention_layers` keeps the explicit path to the layers named (the others run SDPA). With
`attention_sink` instead, every layer runs SDPA and the sink receives the chosen layers' q and k
of the prefill and of every fed token, from which a caller computes only the maps it wants
(serving's completions do).

What one decode step decides, whatever runs the forwards, is `SamplingState.choose`: sample each
row, mark the rows that hit a stop token, end at the budget (`token_budget`). `stream` drives it
for one batch of equal-length prompts; `attnlm.batching.DecodeBatch` for many requests at once,
each at its own positions in a shared KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from attnlm.model import GPT, AttentionSink


class SamplingError(ValueError):
    """A sampling parameter is out of range; the message names it."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64  # upper bound on generated tokens (the context window may stop sooner)
    temperature: float = 1.0  # 0 = greedy (argmax)
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches top_p
    stop_token_ids: Sequence[int] = field(default_factory=tuple)  # end a row on any of these
    seed: int | None = None  # reproducible sampling
    frequency_penalty: float = 0.0  # minus this x count of the token among the row's samples
    presence_penalty: float = 0.0  # minus this once the token is among the row's samples
    repetition_penalty: float = 1.0  # > 0 (used within 1e-30..1e30); vLLM's: prompt + samples
    logit_bias: Mapping[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # no stop token before this many tokens

    def __post_init__(self) -> None:
        errors = []
        if (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 0
        ):
            errors.append(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not (
            math.isfinite(self.temperature) and self.temperature >= 0
        ):
            errors.append(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            errors.append(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1
        ):
            errors.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _finite(value):
                errors.append(f"{name} must be a finite number, got {value!r}")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            errors.append(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not isinstance(self.logit_bias, Mapping) or not all(
            _is_int(k) and k >= 0 and _finite(v) for k, v in self.logit_bias.items()
        ):
            errors.append("logit_bias must map token ids (integers >= 0) to finite numbers")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            errors.append(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if errors:
            raise SamplingError("; ".join(errors))

    @property
    def adjusts_logits(self) -> bool:
        """Whether a row's logits are adjusted before sampling (bias, penalties, min_tokens)."""
        return bool(
            self.frequency_penalty
            or self.presence_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or (self.min_tokens and self.stop_token_ids)
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class GenerationStep:
    tokens: torch.Tensor  # (B,) the token chosen at this step
    logits: torch.Tensor  # (B, V) float32 raw next-token logits it was chosen from
    finished: (
        torch.Tensor
    )  # (B,) bool: the row has ended (this token is a stop token, or the row ended earlier)
    # (L, B, nh, 1, T_k) row of the token fed at this step; L: n_layer or the attention_layers
    attention: torch.Tensor | None


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row, stop token excluded
    finish_reasons: list[str]  # "stop" (a stop token), "length" (max_new_tokens or the context)
    attention: torch.Tensor | None  # (L, B, nh, T + n, T + n) over prompt and completion


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits (B, V) outside the top-k / nucleus (top-p) sets to -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already suffices
        drop[..., 0] = False  # the most likely token stays, even for a top_p float32 rounds to 0
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Choose the next token for each row of logits (B, V). Returns (B,) long."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    # shifted to <= 0, T at least the dtype's tiny: a tiny T gives no inf - inf, no 0 / 0
    logits = logits - logits.amax(dim=-1, keepdim=True)  # (B, V)
    temperature = max(params.temperature, torch.finfo(logits.dtype).tiny)
    logits = filter_logits(logits / temperature, params.top_k, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private generator seeded with params.seed, or None (the global RNG) without a seed."""
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def token_budget(
    params: SamplingParams, prompt_length: int, block_size: int, feed_last: bool = False
) -> int:
    """New tokens a prompt of `prompt_length` may get: params.max_new_tokens, or fewer when the
    context ends first. Every new token but the last is fed back; with `feed_last` (to get its
    attention row) the last one too, so the context holds one token fewer."""
    room = block_size - prompt_length if feed_last else block_size - prompt_length + 1
    return max(min(params.max_new_tokens, room), 0)


class SamplingState:
    """The sampling side of decoding one request's rows: their parameters, private generator,
    stop ids, budget, which rows have finished and how many steps were taken, and what the
    penalties count (each request's own: one request's penalties never touch another's rows).
    `choose` is the one decode step of `stream` and of `attnlm.batching.DecodeBatch`."""

    def __init__(
        self,
        params: SamplingParams,
        rows: int,
        budget: int,
        device: torch.device,
        prompt: torch.Tensor | None = None,
    ) -> None:
        """`prompt` (rows, T): the ids `repetition_penalty` counts besides the samples."""
        self.params = params
        self.budget = budget  # tokens to sample at most
        self.generator = generator_for(params, device)
        self.stop_ids = torch.tensor(list(params.stop_token_ids), dtype=torch.long, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)  # (rows,)
        self.steps = 0  # tokens sampled so far
        self._prompt = prompt
        # built at the first step, when the vocabulary is known (only those the params use):
        self._work: torch.Tensor | None = None  # (rows, V): the adjusted logits, reused
        self._penalty: torch.Tensor | None = None  # (rows, V): frequency x count + presence
        self._sampled: torch.Tensor | None = None  # (rows, V) bool: sampled in this row
        self._seen: torch.Tensor | None = None  # (rows, V) 1.0 / 0.0: in the prompt or sampled
        self._factor: torch.Tensor | None = None  # (rows, V): repetition factors, reused
        self._bias: torch.Tensor | None = None  # (V,): logit_bias as a vector

    def adjust(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (rows, V) sampling uses: bias, penalties and min_tokens applied (the
        module doc says in which order), in a buffer of this state's (`logits` is left as it
        is; the result is overwritten by the next call). SamplingError for a logit_bias id
        past V."""
        params = self.params
        if not params.adjusts_logits:
            return logits
        if self._work is None:
            self._start(*logits.shape, logits.device)
        work = self._work.copy_(logits)  # in place from here: no (rows, V) allocation a step
        if self._bias is not None:
            work.add_(self._bias)
        if self._seen is not None:  # x 1/p where positive, x p where not; seen tokens only
            p = min(max(params.repetition_penalty, 1e-30), 1e30)  # float32 keeps p and 1/p
            big = torch.finfo(work.dtype).max  # logits x 1e30 stay finite: no inf - inf later
            factor = self._factor.copy_(work > 0).mul_(1.0 / p - p).add_(p)
            factor.sub_(1.0).mul_(self._seen).add_(1.0)
            work.mul_(factor).clamp_(-big, big)
        if self._penalty is not None:
            work.sub_(self._penalty)
        if self.steps < params.min_tokens and len(self.stop_ids):
            work.index_fill_(-1, self.stop_ids, float("-inf"))
        return work

    def _start(self, rows: int, vocab: int, device: torch.device) -> None:
        params = self.params
        self._work = torch.empty(rows, vocab, device=device)
        if params.frequency_penalty or params.presence_penalty:
            self._penalty = torch.zeros(rows, vocab, device=device)
            self._sampled = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        if params.repetition_penalty != 1.0:
            self._seen = torch.zeros(rows, vocab, device=device)
            self._factor = torch.empty(rows, vocab, device=device)
            if self._prompt is not None:
                self._seen.scatter_(1, self._prompt.to(device), 1.0)
        if params.logit_bias:
            ids = list(params.logit_bias)
            if max(ids) >= vocab:
                raise SamplingError(f"logit_bias: token id {max(ids)} is not below {vocab}")
            values = [float(v) for v in params.logit_bias.values()]
            self._bias = torch.zeros(vocab, device=device)
            self._bias[torch.tensor(ids, device=device)] = torch.tensor(values, device=device)

    def _count(self, tokens: torch.Tensor) -> None:
        """Record the sampled tokens (rows,) for the penalties of the next steps."""
        index = tokens[:, None]  # (rows, 1)
        if self._penalty is not None:
            first = ~self._sampled.gather(1, index)  # (rows, 1): not sampled before
            params = self.params
            add = params.frequency_penalty + params.presence_penalty * first.float()
            self._penalty.scatter_add_(1, index, add)
            self._sampled.scatter_(1, index, True)
        if self._seen is not None:
            self._seen.scatter_(1, index, 1.0)

    def choose(self, logits: torch.Tensor) -> tuple[GenerationStep, bool]:
        """Sample the next token of every row from logits (rows, V) float32.

        Returns:
            the GenerationStep (no attention attached; its logits the ones given), and whether
            it is the last: every row has finished or the budget is spent (then the chosen
            tokens need not be fed back).
        """
        tokens = sample(self.adjust(logits), self.params, self.generator)  # (rows,)
        self.steps += 1
        if self._work is not None:
            self._count(tokens)
        last = self.steps == self.budget
        if len(self.stop_ids):  # (finished is replaced, never written: steps may keep it)
            self.finished = self.finished | torch.isin(tokens, self.stop_ids)
            last = last or bool(self.finished.all())  # the one host sync, for the stop
        return GenerationStep(tokens, logits, self.finished, None), last


@torch.inference_mode()
def stream(
    model: GPT,
    prompt: torch.Tensor,
    params: SamplingParams,
    return_attention: bool = False,
    prefill_attention: list[torch.Tensor] | None = None,
    *,
    attention_layers: Collection[int] | None = None,
    attention_sink: AttentionSink | None = None,
) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per new token until every row stops or the budget/context ends.

    Args:
        model: a GPT, an LSTMLM, or anything with their call and KV-cache methods.
        prompt: (B, T) token ids, T >= 1, all rows the same length.
        return_attention: attach to each step the attention row of its token over all positions
            up to and including it (the token is fed once more for that, also the last one, so
            with attention the context holds one token fewer).
        prefill_attention: if a list is given, the prefill's attention map (n_layer, B, nh, T, T)
            is appended to it (only with return_attention).
        attention_layers: the layers (ascending) that take the explicit path with
            return_attention, and whose q, k go to attention_sink; default all. The others run
            SDPA: the maps and rows then hold these layers only, (n_attention_layers, ...).
        attention_sink: `sink(layer, q, k)` receives attention_layers' queries (B, nh, t, hs)
            and keys (B, nh, T_k, hs, every position so far) in the prefill (t = T) and in each
            step (t = 1), every layer through SDPA unless return_attention: a caller computes
            the maps it wants later (`CausalSelfAttention.probabilities`). The last token is fed
            too, as with return_attention.
    """
    if prompt.dim() != 2 or prompt.size(1) == 0:
        raise ValueError(f"prompt must be (B, T) with T >= 1, got shape {tuple(prompt.shape)}")
    B, T = prompt.shape
    block_size = model.config.block_size
    if T > block_size:
        raise ValueError(f"prompt has {T} tokens; the context window is {block_size}")
    feed_last = return_attention or attention_sink is not None
    budget = token_budget(params, T, block_size, feed_last=feed_last)
    if budget == 0:
        return
    state = SamplingState(params, B, budget, prompt.device, prompt)
    attention = {"return_attention": return_attention}  # an LSTM takes no more than this
    if attention_layers is not None:
        attention["attention_layers"] = attention_layers
    if attention_sink is not None:
        attention["attention_sink"] = attention_sink
    model.set_kv_cache(B, max_seq_length=min(block_size, T + budget))
    try:
        out = model(prompt, input_pos=0, **attention)
        if return_attention and prefill_attention is not None:
            prefill_attention.append(out.attention)
        logits = out.logits[:, -1].float()  # (B, V)
        while True:
            step, last = state.choose(logits)
            if not last or feed_last:  # feed the token at position T + steps - 1
                position = T + state.steps - 1
                out = model(step.tokens[:, None], input_pos=position, **attention)
                step.attention = out.attention  # (L', B, nh, 1, position + 1) or None
            yield step
            if last:
                return
            logits = out.logits[:, -1].float()  # (B, V)
    finally:
        model.clear_kv_cache()


def generate(
    model: GPT,
    prompt: torch.Tensor,
    params: SamplingParams,
    return_attention: bool = False,
    attention_layers: Collection[int] | None = None,
) -> GenerationResult:
    """Run `stream` to the end. Rows that stop early keep their tokens up to (not including) the
    stop token. With return_attention, `attention` covers the prompt and every generated token
    (a stop token included), assembled from the prefill map and the per-step rows, of
    `attention_layers` only when given (the others run SDPA).
    """
    B, _ = prompt.shape
    prefill: list[torch.Tensor] = []
    steps = list(
        stream(model, prompt, params, return_attention, prefill, attention_layers=attention_layers)
    )
    tokens: list[list[int]] = [[] for _ in range(B)]
    reasons = ["length"] * B
    done = [False] * B
    stop_set = set(params.stop_token_ids)
    for step in steps:
        for b, tok in enumerate(step.tokens.tolist()):
            if done[b]:
                continue
            if tok in stop_set:
                done[b], reasons[b] = True, "stop"
            else:
                tokens[b].append(tok)
    attention = None
    if return_attention and prefill:
        attention = assemble_attention(prefill[0], [step.attention for step in steps])
    return GenerationResult(tokens, reasons, attention)


def assemble_attention(prefill: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
    """Join the prefill map (L, B, nh, T, T) and decode rows (L, B, nh, 1, T + i) into one
    lower-triangular map (L, B, nh, T + n, T + n)."""
    L, B, H, T, _ = prefill.shape
    size = T + len(rows)
    full = prefill.new_zeros(L, B, H, size, size)
    full[..., :T, :T] = prefill
    for i, row in enumerate(rows):
        full[..., T + i, : row.size(-1)] = row[..., 0, :]
    return full
