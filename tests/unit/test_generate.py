"""Generation on the KV cache: greedy equals stepwise argmax, seeds reproduce, attention maps
(of every layer, of some layers only, or from the q and k an attention sink kept)."""

import contextlib
from collections.abc import Iterator

import pytest
import torch

from attnlm.config import GPTConfig
from attnlm.generate import (
    SamplingError,
    SamplingParams,
    SamplingState,
    filter_logits,
    generate,
    stream,
    token_budget,
)
from attnlm.model import GPT

CFG = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


@contextlib.contextmanager
def explicit_softmaxes(model: GPT) -> Iterator[list[tuple[int, tuple[int, ...]]]]:
    """(layer, shape) of every attention softmax the model's layers compute while inside: each
    explicit-path forward's, and each map computed later from kept q and k (SDPA's own, fused,
    is not one of them)."""
    calls: list[tuple[int, tuple[int, ...]]] = []
    for layer, block in enumerate(model.transformer.h):
        compute = block.attn.probabilities

        def record(q, k, allowed, heads=None, layer=layer, compute=compute):
            out = compute(q, k, allowed, heads)
            calls.append((layer, tuple(out.shape)))
            return out

        block.attn.probabilities = record
    try:
        yield calls
    finally:
        for block in model.transformer.h:
            del block.attn.probabilities


def test_greedy_equals_stepwise_argmax_of_full_forward(model):
    prompt = torch.randint(0, CFG.vocab_size, (2, 5))
    result = generate(model, prompt, SamplingParams(max_new_tokens=10, temperature=0))
    seq = prompt
    for _ in range(10):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert result.tokens == seq[:, 5:].tolist()
    assert result.finish_reasons == ["length", "length"]


def test_seed_makes_sampling_reproducible(model):
    prompt = torch.randint(0, CFG.vocab_size, (1, 4))
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = generate(model, prompt, params).tokens
    b = generate(model, prompt, params).tokens
    c = generate(model, prompt, SamplingParams(max_new_tokens=12, temperature=1.0, seed=8)).tokens
    assert a == b
    assert a != c


def test_stop_token_ends_row_and_is_excluded(model):
    prompt = torch.randint(0, CFG.vocab_size, (1, 4))
    greedy = generate(model, prompt, SamplingParams(max_new_tokens=6, temperature=0)).tokens[0]
    stop = greedy[2]
    first = greedy.index(stop)
    result = generate(
        model, prompt, SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[stop])
    )
    assert result.tokens[0] == greedy[:first]
    assert result.finish_reasons == ["stop"]


def test_context_window_bounds_generation(model):
    prompt = torch.randint(0, CFG.vocab_size, (1, 30))
    result = generate(model, prompt, SamplingParams(max_new_tokens=50, temperature=0))
    assert len(result.tokens[0]) == 3  # positions 30, 31 fed back; the last need not be
    with pytest.raises(ValueError, match="context window"):
        generate(model, torch.zeros(1, 33, dtype=torch.long), SamplingParams())


def test_completion_attention_assembled_from_cache_equals_full_map(model):
    prompt = torch.randint(0, CFG.vocab_size, (2, 6))
    result = generate(
        model, prompt, SamplingParams(max_new_tokens=7, temperature=0), return_attention=True
    )
    seq = torch.cat([prompt, torch.tensor(result.tokens)], 1)
    full = model(seq, return_attention=True).attention
    assert result.attention.shape == full.shape == (CFG.n_layer, 2, CFG.n_head, 13, 13)
    torch.testing.assert_close(result.attention, full, atol=1e-5, rtol=0)


def test_attention_layers_alone_take_the_explicit_path(model):
    prompt = torch.randint(0, CFG.vocab_size, (2, 6))
    params = SamplingParams(max_new_tokens=7, temperature=0)
    every = generate(model, prompt, params, return_attention=True)
    with explicit_softmaxes(model) as calls:
        one = generate(model, prompt, params, return_attention=True, attention_layers=[1])
    assert one.tokens == every.tokens
    assert one.attention.shape == (1, 2, CFG.n_head, 13, 13)
    torch.testing.assert_close(one.attention[0], every.attention[1], atol=1e-6, rtol=0)
    # the prefill and each of the 7 fed tokens, in layer 1 only; layer 0 ran SDPA
    assert calls == [(1, (2, CFG.n_head, 6, 6))] + [
        (1, (2, CFG.n_head, 1, 7 + i)) for i in range(7)
    ]


def test_attention_sink_keeps_q_and_k_of_every_fed_token(model):
    """With a sink, no layer takes the explicit path; the q and k it kept give the maps."""
    prompt = torch.randint(0, CFG.vocab_size, (2, 6))
    params = SamplingParams(max_new_tokens=5, temperature=0)
    every = generate(model, prompt, params, return_attention=True)
    kept = []
    with explicit_softmaxes(model) as calls:
        steps = list(
            stream(
                model,
                prompt,
                params,
                attention_layers=[0],
                attention_sink=lambda layer, q, k: kept.append((layer, q, k)),
            )
        )
    assert calls == [] and all(step.attention is None for step in steps)
    assert [t.tolist() for t in torch.stack([s.tokens for s in steps], 1)] == every.tokens
    assert [layer for layer, _, _ in kept] == [0] * 6  # the prefill, then each of 5 tokens
    assert [tuple(q.shape) for _, q, _ in kept] == [(2, 2, 6, 16)] + [(2, 2, 1, 16)] * 5
    assert [k.size(2) for _, _, k in kept] == [6, 7, 8, 9, 10, 11]
    q = torch.cat([q for _, q, _ in kept], dim=2)  # (2, H, 11, hs)
    k = kept[-1][2]  # (2, H, 11, hs): every position
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    maps = model.transformer.h[0].attn.probabilities(q, k, causal)  # (2, H, 11, 11)
    torch.testing.assert_close(maps, every.attention[0], atol=1e-6, rtol=0)


def test_stream_yields_raw_logits_and_finished_flags(model):
    prompt = torch.randint(0, CFG.vocab_size, (1, 3))
    steps = list(stream(model, prompt, SamplingParams(max_new_tokens=4, temperature=0)))
    assert len(steps) == 4
    assert all(
        s.logits.shape == (1, CFG.vocab_size) and s.logits.dtype == torch.float32 for s in steps
    )
    assert all(int(s.tokens[0]) == int(s.logits[0].argmax()) for s in steps)
    assert not any(bool(s.finished[0]) for s in steps)
    assert all(b.attn.kv_cache is None for b in model.transformer.h)  # cache released


def test_token_budget_is_max_new_tokens_or_the_room_left():
    params = SamplingParams(max_new_tokens=10)
    assert token_budget(params, prompt_length=5, block_size=32) == 10
    assert token_budget(params, prompt_length=30, block_size=32) == 3  # the last is not fed
    assert token_budget(params, prompt_length=30, block_size=32, feed_last=True) == 2
    assert token_budget(params, prompt_length=32, block_size=32, feed_last=True) == 0
    assert token_budget(SamplingParams(max_new_tokens=0), 5, 32) == 0


def test_sampling_state_stops_rows_and_ends_at_budget():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0]])  # greedy: tokens 1 and 0
    state = SamplingState(SamplingParams(temperature=0, stop_token_ids=[1]), 2, 3, logits.device)
    step, last = state.choose(logits)
    assert step.tokens.tolist() == [1, 0] and step.finished.tolist() == [True, False]
    assert not last and step.logits is logits and step.attention is None
    step, last = state.choose(logits.flip(0))  # row 1 hits the stop token too
    assert step.finished.tolist() == [True, True] and last and state.steps == 2
    state = SamplingState(SamplingParams(temperature=0), 2, 2, logits.device)
    assert [state.choose(logits)[1] for _ in range(2)] == [False, True]  # the budget


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, 2, None)[0, 2:]).all()
    probs = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, 0.03]
    kept = ~torch.isinf(filter_logits(logits, None, 0.8)[0])
    assert kept.tolist() == [True, True, False, False]
    assert probs[:1].sum() < 0.8 <= probs[:2].sum()
    kept = ~torch.isinf(filter_logits(logits, None, 0.5)[0])
    assert kept.tolist() == [True, False, False, False]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": 0}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_bad_sampling_params(kwargs, field):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**kwargs)
