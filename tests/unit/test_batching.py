"""attnlm.batching: requests decoded together equal each alone through `generate.stream`, with
the same budget and stop behaviour; slots are taken and freed; the model keeps no cache."""

import pytest
import torch

from attnlm.batching import DecodeBatch
from attnlm.config import GPTConfig
from attnlm.generate import SamplingParams, stream
from attnlm.model import GPT

CFG = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def prompt(n: int, t: int, seed: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


def alone(model: GPT, prompt: torch.Tensor, params: SamplingParams) -> list:
    return list(stream(model, prompt, params))


def run_to_end(batch: DecodeBatch, joins: dict | None = None) -> dict:
    """Step until the batch is empty; `joins` maps a step number to (key, prompt, params) added
    before that step. Returns key -> the GenerationSteps its request got."""
    joins = dict(joins or {})
    steps, keys, i = {}, {}, 0
    while batch.requests or joins:
        for key, p, params in joins.pop(i, []):
            request = batch.add(p, params)
            keys[request], steps[key] = key, []
        for request, step in batch.step():
            steps[keys[request]].append(step)
        i += 1
    return steps


def assert_same_steps(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.tokens, w.tokens)
        assert torch.equal(g.finished, w.finished)
        torch.testing.assert_close(g.logits, w.logits, atol=1e-5, rtol=0)
        assert g.attention is None


def test_requests_of_different_lengths_decoded_together_equal_each_alone(model):
    requests = {
        "greedy": (prompt(1, 5, 1), SamplingParams(max_new_tokens=12, temperature=0)),
        "seeded": (prompt(3, 11, 2), SamplingParams(max_new_tokens=9, temperature=0.9, seed=7)),
        "top": (prompt(2, 3, 3), SamplingParams(max_new_tokens=15, top_k=20, top_p=0.9, seed=1)),
    }
    batch = DecodeBatch(model, slots=8)
    got = run_to_end(batch, {0: [(k, p, s) for k, (p, s) in requests.items()]})
    for key, (p, params) in requests.items():
        assert_same_steps(got[key], alone(model, p, params))
    assert batch.free_slots == 8 and not batch.requests
    assert all(b.attn.kv_cache is None for b in model.transformer.h)  # nothing left installed


def test_requests_joining_between_steps_equal_each_alone(model):
    first = (prompt(2, 4, 4), SamplingParams(max_new_tokens=10, temperature=1.0, seed=3))
    later = (prompt(1, 9, 5), SamplingParams(max_new_tokens=6, temperature=0))
    batch = DecodeBatch(model, slots=4)
    got = run_to_end(batch, {0: [("first", *first)], 3: [("later", *later)]})
    assert_same_steps(got["first"], alone(model, *first))
    assert_same_steps(got["later"], alone(model, *later))


def test_budget_and_stop_tokens_as_in_stream(model):
    p = prompt(2, 6, 6)
    greedy = alone(model, p, SamplingParams(max_new_tokens=8, temperature=0))
    stops = [int(greedy[2].tokens[0]), int(greedy[4].tokens[1])]  # each row stops at its own
    cases = [
        (p, SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=stops)),
        (prompt(1, 30, 7), SamplingParams(max_new_tokens=50, temperature=0)),  # context ends
        (prompt(1, 32, 8), SamplingParams(max_new_tokens=5, temperature=0)),  # context full
    ]
    for p, params in cases:
        want = alone(model, p, params)
        assert_same_steps(
            run_to_end(DecodeBatch(model, slots=4), {0: [("r", p, params)]})["r"], want
        )
    assert len(alone(model, *cases[1])) == 3 and len(alone(model, *cases[2])) == 1


def test_slots_are_taken_lowest_first_and_freed(model):
    batch = DecodeBatch(model, slots=4)
    a = batch.add(prompt(2, 3, 9), SamplingParams(max_new_tokens=2, temperature=0))
    b = batch.add(prompt(1, 5, 10), SamplingParams(max_new_tokens=20, temperature=0))
    assert (a.slots, b.slots, batch.free_slots) == ([0, 1], [2], 1)
    with pytest.raises(ValueError, match="free slots"):
        batch.add(prompt(2, 3, 11), SamplingParams())
    batch.step()
    assert not a.done
    assert [r for r, _ in batch.step()] == [a, b]  # a's budget of 2 is spent
    assert a.done and a.slots == [] and not b.done and batch.free_slots == 3
    c = batch.add(prompt(3, 4, 12), SamplingParams(max_new_tokens=3, temperature=0))
    assert c.slots == [0, 1, 3]
    batch.remove(b)
    assert b.done and batch.requests == [c] and batch.free_slots == 1
    batch.remove(b)  # removing twice is a no-op
    assert batch.free_slots == 1


def test_nothing_to_decode_takes_no_slot(model):
    batch = DecodeBatch(model, slots=1)
    assert batch.add(prompt(1, 4, 13), SamplingParams(max_new_tokens=0)) is None
    assert batch.free_slots == 1 and batch.step() == []


def test_bad_arguments(model):
    from attnlm.lstm import LSTMLM

    with pytest.raises(ValueError, match="attention"):
        DecodeBatch(LSTMLM(GPTConfig(**{**CFG.to_dict(), "arch": "lstm"})), slots=2)
    with pytest.raises(ValueError, match="slots"):
        DecodeBatch(model, slots=0)
    batch = DecodeBatch(model, slots=2)
    with pytest.raises(ValueError, match="context window"):
        batch.add(torch.zeros(1, 33, dtype=torch.long), SamplingParams())
    with pytest.raises(ValueError, match="prompt must be"):
        batch.add(torch.zeros(1, 0, dtype=torch.long), SamplingParams())
