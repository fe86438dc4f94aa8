"""Batch invariance: a text's numbers do not depend on what else shares its forward.

With `GPT.set_batch_invariant(True)` every attention layer takes the explicit path, its values
summed over fixed blocks of keys and one query's scores summed per key (`attnlm.model.key_scores`,
`blocked_values`). What the callers add, from what was measured on an AVX-512 CPU (fp32 and bf16):

- every forward holds >= `MIN_TOKENS` rows of tokens: a linear layer's GEMM gives a row other
  bits when it multiplies fewer rows (fp32: below 12, bf16: one), and an attention over fewer
  than 16 keys other bits than over 16 or more. A text forward pads each text to the next
  multiple of `MIN_TOKENS` positions (`padded_length`) and runs the texts of one padded length
  together (`serving.forwards`, no packing): a text's shapes are its own, only the number of
  rows beside it changes (the explicit path gives the same bits however far a text is padded,
  too: tested);
- the decode step runs >= `MIN_TOKENS` rows and a multiple of `KEY_ALIGN` keys
  (`decode_shape`): the rows and keys of the other requests in flight change nothing else.

`check(model, batch)` runs the model's own weights through both, alone and among others, and
says what differs: the serving engine logs it at start-up (another CPU, another torch may pick
other kernels). The compiled decode step sums one query's values inside its graph instead of in
blocks (`blocked_values`): it is invariant too (tested), but its bits are not the eager step's.
Nothing here holds across hardware, between fp32 and bf16, eager and compiled, CPU and GPU: the
promise is the same bits for the same request on the same kind of machine and software
(docs/serving.md).

    model.set_batch_invariant(True)
    problem = check(model, DecodeBatch(model, slots=32))    # None: invariant here
"""

from __future__ import annotations

import math

import torch

from attnlm.generate import SamplingParams
from attnlm.model import GPT

MIN_TOKENS = 16  # rows of tokens every batch-invariant forward holds, at least
KEY_ALIGN = 16  # a batch-invariant decode step attends over a multiple of this many keys


def padded_length(length: int, max_context: int) -> int:
    """Positions a text of `length` tokens is padded to in a batch-invariant text forward: the
    next multiple of `MIN_TOKENS`, within the context. Texts of one padded length share a
    forward (fewer forwards than length buckets, the same shapes alone and together)."""
    return min(math.ceil(length / MIN_TOKENS) * MIN_TOKENS, max_context)


def decode_shape(width: int, key_length: int, slots: int, positions: int) -> tuple[int, int]:
    """The rows and keys a batch-invariant decode step runs, for `width` rows in use and keys
    0..key_length-1 needed, on a decoder of `slots` rows of `positions` positions: >=
    `MIN_TOKENS` rows and a multiple of `KEY_ALIGN` keys, as far as the decoder holds them."""
    width = min(max(width, MIN_TOKENS), slots)
    key_length = min(math.ceil(key_length / KEY_ALIGN) * KEY_ALIGN, positions)
    return width, key_length


def _texts(vocab_size: int, lengths: list[int], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=generator) for n in lengths]


@torch.inference_mode()
def _text_logits(model: GPT, texts: list[torch.Tensor], pad_to: int) -> torch.Tensor:
    """Last-position logits (B, V) float32 of texts right-padded to `pad_to` in one forward."""
    device = model.lm_head.weight.device
    idx = torch.zeros(len(texts), pad_to, dtype=torch.long)  # (B, T)
    for b, ids in enumerate(texts):
        idx[b, : len(ids)] = ids
    logits = model(idx.to(device)).logits.float()  # (B, T, V)
    ends = torch.tensor([len(ids) - 1 for ids in texts], device=device)
    return logits[torch.arange(len(texts), device=device), ends]


def _decoded(batch, prompts: list[torch.Tensor], steps: int) -> list[torch.Tensor]:
    """Logits (steps, V) of the last prompt, greedy, decoded while the others are in flight."""
    device = batch.model.lm_head.weight.device
    requests = []
    for i, ids in enumerate(prompts):  # the others outlast the last one
        budget = steps if i == len(prompts) - 1 else steps + 3 * i + 2
        params = SamplingParams(max_new_tokens=budget, temperature=0)
        requests.append(batch.add(ids[None].to(device), params))
    checked, rows = requests[-1], []
    try:
        while not checked.done:
            rows += [step.logits[0].clone() for request, step in batch.step() if request is checked]
    finally:
        for request in requests:
            batch.remove(request)
    return rows


def check(model: GPT, batch=None) -> str | None:
    """None when the model's forwards and the decode steps of `batch` (an
    `attnlm.batching.DecodeBatch` of the model, or None) give a text the same bits alone and
    among others on this machine; else a line saying where they differ. The model is in
    batch-invariant mode (`GPT.set_batch_invariant`); the batch is empty, and left empty."""
    if not model.batch_invariant:
        return "the model is not in batch-invariant mode (GPT.set_batch_invariant)"
    config = model.config
    context = config.block_size
    vocab = config.vocab_size
    lengths = sorted({min(n, context) for n in (3, 11, 29, context)})
    texts = _texts(vocab, lengths, seed=0)
    others = _texts(vocab, [max(1, n // 2) for n in lengths] * 3, seed=1)
    for ids in texts:
        alone = _text_logits(model, [ids], padded_length(len(ids), context))
        among = _text_logits(model, [*others, ids], context)[-1:]
        if not torch.equal(alone, among):
            return f"a text of {len(ids)} tokens: other logits alone than among {len(others)}"
    if batch is None:
        return None
    steps = min(6, context - lengths[-2])
    prompt = _texts(vocab, [lengths[-2]], seed=2)
    crowd = _texts(vocab, [min(n, context - steps - 8) for n in (1, 7, 21, 40)], seed=3)
    alone = _decoded(batch, prompt, steps)
    among = _decoded(batch, crowd + prompt, steps)
    for i, (a, b) in enumerate(zip(alone, among, strict=True)):
        if not torch.equal(a, b):
            return f"decode step {i}: other logits alone than among {len(crowd)} requests"
    return None
