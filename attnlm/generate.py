"""Text generation on top of the model's KV cache: prefill the prompt, then one token a step.

    params = SamplingParams(max_new_tokens=32, temperature=0.8, top_k=50, seed=0)
    result = generate(model, prompt_ids, params)               # prompt_ids: (B, T) LongTensor
    for step in stream(model, prompt_ids, params): ...         # one GenerationStep per new token

Temperature 0 is greedy. A seed makes sampling reproducible (a private torch.Generator, never
the global RNG). With `return_attention=True` every step also carries the attention row of the
token just fed over all earlier positions, and `generate` assembles the full map of prompt and
completion from the prefill map plus those rows, without recomputing the prefix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from attnlm.model import GPT


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
        if errors:
            raise SamplingError("; ".join(errors))


@dataclass
class GenerationStep:
    tokens: torch.Tensor  # (B,) the token chosen at this step
    logits: torch.Tensor  # (B, V) float32 raw next-token logits it was chosen from
    finished: (
        torch.Tensor
    )  # (B,) bool: the row has ended (this token is a stop token, or the row ended earlier)
    attention: torch.Tensor | None  # (n_layer, B, nh, 1, T_k) row of the token fed at this step


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row, stop token excluded
    finish_reasons: list[str]  # "stop" (a stop token), "length" (max_new_tokens or the context)
    attention: torch.Tensor | None  # (n_layer, B, nh, T + n, T + n) over prompt and completion


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits (B, V) outside the top-k / nucleus (top-p) sets to -inf."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already suffices
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """Choose the next token for each row of logits (B, V). Returns (B,) long."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generator_for(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private generator seeded with params.seed, or None (the global RNG) without a seed."""
    if params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


@torch.inference_mode()
def stream(
    model: GPT,
    prompt: torch.Tensor,
    params: SamplingParams,
    return_attention: bool = False,
    prefill_attention: list[torch.Tensor] | None = None,
) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per new token until every row stops or the budget/context ends.

    Args:
        prompt: (B, T) token ids, T >= 1, all rows the same length.
        return_attention: attach to each step the attention row of its token over all positions
            up to and including it (the token is fed once more for that, also the last one, so
            with attention the context holds one token fewer).
        prefill_attention: if a list is given, the prefill's attention map (n_layer, B, nh, T, T)
            is appended to it (only with return_attention).
    """
    if prompt.dim() != 2 or prompt.size(1) == 0:
        raise ValueError(f"prompt must be (B, T) with T >= 1, got shape {tuple(prompt.shape)}")
    B, T = prompt.shape
    block_size = model.config.block_size
    if T > block_size:
        raise ValueError(f"prompt has {T} tokens; the context window is {block_size}")
    # Every new token but the last is fed back; with attention the last is fed too.
    room = block_size - T if return_attention else block_size - T + 1
    budget = min(params.max_new_tokens, room)
    if budget <= 0:
        return
    device = prompt.device
    generator = generator_for(params, device)
    stop_ids = torch.tensor(list(params.stop_token_ids), dtype=torch.long, device=device)
    model.set_kv_cache(B, max_seq_length=min(block_size, T + budget))
    try:
        out = model(prompt, input_pos=0, return_attention=return_attention)
        if return_attention and prefill_attention is not None:
            prefill_attention.append(out.attention)
        logits = out.logits[:, -1].float()  # (B, V)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(budget):
            tokens = sample(logits, params, generator)  # (B,)
            finished = finished | torch.isin(tokens, stop_ids)
            last = bool(finished.all()) or i == budget - 1
            attention_row = None
            if not last or return_attention:
                out = model(tokens[:, None], input_pos=T + i, return_attention=return_attention)
                attention_row = out.attention  # (L, B, nh, 1, T + i + 1) or None
            yield GenerationStep(tokens, logits, finished.clone(), attention_row)
            if last:
                return
            logits = out.logits[:, -1].float()
    finally:
        model.clear_kv_cache()


def generate(
    model: GPT, prompt: torch.Tensor, params: SamplingParams, return_attention: bool = False
) -> GenerationResult:
    """Run `stream` to the end. Rows that stop early keep their tokens up to (not including) the
    stop token. With return_attention, `attention` covers the prompt and every generated token
    (a stop token included), assembled from the prefill map and the per-step rows.
    """
    B, _ = prompt.shape
    prefill: list[torch.Tensor] = []
    steps = list(stream(model, prompt, params, return_attention, prefill))
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
