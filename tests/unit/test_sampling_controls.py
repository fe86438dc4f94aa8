"""Logit adjustments of `attnlm.generate.SamplingState` (logit_bias, repetition, frequency and
presence penalties, min_tokens) against a reference written from their definitions, per request
in `stream` and in a shared `DecodeBatch`."""

import pytest
import torch

from attnlm.batching import DecodeBatch
from attnlm.config import GPTConfig
from attnlm.generate import SamplingError, SamplingParams, SamplingState, generate, stream
from attnlm.model import GPT

CFG = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)
PENALTIES = SamplingParams(
    max_new_tokens=10,
    temperature=0,
    frequency_penalty=0.7,
    presence_penalty=0.4,
    repetition_penalty=1.3,
    logit_bias={5: 3.0, 7: -1.5},
)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def reference(logits: list[float], prompt: list[int], sampled: list[int], p: SamplingParams):
    """One row's adjusted logits, token by token from the definitions (vLLM's order)."""
    out = []
    for token, value in enumerate(logits):
        value += p.logit_bias.get(token, 0.0)
        if token in prompt or token in sampled:
            r = p.repetition_penalty
            value = value / r if value > 0 else value * r
        count = sampled.count(token)
        value -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
        if len(sampled) < p.min_tokens and token in p.stop_token_ids:
            value = float("-inf")
        out.append(value)
    return torch.tensor(out)


def test_adjusted_logits_follow_the_definitions():
    torch.manual_seed(1)
    params = SamplingParams(**{**PENALTIES.__dict__, "stop_token_ids": (3,), "min_tokens": 2})
    prompt = torch.tensor([[1, 2, 5], [4, 4, 9]])  # (2, 3)
    state = SamplingState(params, 2, budget=6, device=torch.device("cpu"), prompt=prompt)
    sampled: list[list[int]] = [[], []]
    for _ in range(5):
        logits = torch.randn(2, 12) * 3  # (2, V)
        adjusted = state.adjust(logits)
        for b in range(2):
            want = reference(logits[b].tolist(), prompt[b].tolist(), sampled[b], params)
            torch.testing.assert_close(adjusted[b], want, rtol=1e-6, atol=1e-6)
        step, _ = state.choose(logits)
        torch.testing.assert_close(step.logits, logits)  # the step reports the model's logits
        assert torch.equal(step.tokens, adjusted.argmax(-1))
        for b, token in enumerate(step.tokens.tolist()):
            sampled[b].append(token)


def test_no_adjustment_leaves_the_logits_alone():
    state = SamplingState(SamplingParams(temperature=0), 1, 4, torch.device("cpu"))
    logits = torch.randn(1, 10)
    assert state.adjust(logits) is logits


def test_greedy_with_penalties_equals_stepwise_reference(model):
    prompt = torch.randint(0, CFG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2))
    result = generate(model, prompt, PENALTIES)
    for b in range(2):
        seq = prompt[b].tolist()
        for token in result.tokens[b]:
            logits = model(torch.tensor([seq])).logits[0, -1].tolist()
            want = reference(logits, prompt[b].tolist(), seq[5:], PENALTIES).argmax().item()
            assert token == want
            seq.append(token)
    assert result.tokens != generate(model, prompt, SamplingParams(10, temperature=0)).tokens


def test_logit_bias_forces_and_min_tokens_holds_back_the_stop(model):
    prompt = torch.tensor([[1, 2, 3]])
    forced = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0, logit_bias={42: 100})
    assert generate(model, prompt, forced).tokens == [[42] * 6]
    stopping = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=(9,))
    eager = SamplingParams(**{**stopping.__dict__, "logit_bias": {9: 100}})
    assert generate(model, prompt, eager).tokens == [[]]
    held = SamplingParams(**{**eager.__dict__, "min_tokens": 3})
    result = generate(model, prompt, held)
    assert len(result.tokens[0]) == 3 and 9 not in result.tokens[0]
    assert result.finish_reasons == ["stop"]


def test_a_batch_keeps_each_requests_controls_to_its_own_rows(model):
    """Requests with and without penalties in one DecodeBatch each get what `stream` gives them
    alone: one request's penalties never touch another's rows."""
    gen = torch.Generator().manual_seed(3)
    requests = [
        (torch.randint(0, 300, (1, 4), generator=gen), SamplingParams(8, temperature=0)),
        (torch.randint(0, 300, (2, 6), generator=gen), PENALTIES),
        (torch.randint(0, 300, (1, 3), generator=gen), SamplingParams(8, seed=4)),
        (
            torch.randint(0, 300, (2, 5), generator=gen),
            SamplingParams(8, seed=5, presence_penalty=-2.0, logit_bias={11: 2.0}),
        ),
    ]
    batch = DecodeBatch(model, slots=8)
    handles = [batch.add(p, params) for p, params in requests]
    got: dict = {h: [] for h in handles}
    while batch.requests:
        for request, step in batch.step():
            got[request].append(step.tokens)
    for handle, (p, params) in zip(handles, requests, strict=True):
        want = [step.tokens for step in stream(model, p, params)]
        assert len(got[handle]) == len(want)
        for g, w in zip(got[handle], want, strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: float("inf")}}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
    ],
)
def test_bad_controls(kwargs, field):
    with pytest.raises(SamplingError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("penalty", [5e-324, 1e300])
def test_extreme_repetition_penalties_still_sample(penalty):
    params = SamplingParams(repetition_penalty=penalty, seed=0)
    prompt = torch.tensor([[0, 1, 2, 3]])
    state = SamplingState(params, 1, 4, torch.device("cpu"), prompt=prompt)
    for _ in range(3):
        logits = torch.randn(1, 10)
        assert torch.isfinite(state.adjust(logits)).all()
        state.choose(logits)


def test_logit_bias_past_the_vocabulary_is_a_sampling_error():
    state = SamplingState(SamplingParams(logit_bias={50: 1.0}), 1, 4, torch.device("cpu"))
    with pytest.raises(SamplingError, match="50"):
        state.choose(torch.randn(1, 10))
