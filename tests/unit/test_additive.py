"""attnlm.additive: blockwise Bahdanau scores equal the direct form, values and gradients."""

import pytest
import torch

from attnlm import additive
from attnlm.model import causal_mask


def direct(q, k, w_q, w_k, v):
    """The form the blockwise one replaces: every (query, key, hs) tanh at once."""
    qa = torch.einsum("bhtd,hde->bhte", q, w_q)  # (B, nh, T, hs)
    ka = torch.einsum("bhtd,hde->bhte", k, w_k)  # (B, nh, T_k, hs)
    hidden = torch.tanh(qa.unsqueeze(3) + ka.unsqueeze(2))  # (B, nh, T, T_k, hs)
    return torch.einsum("bhtke,he->bhtk", hidden, v).float()


def attention_and_grads(fn, leaves, upstream, mask):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    att = fn(*leaves).masked_fill(~mask, float("-inf")).softmax(-1)
    (att * upstream).sum().backward()
    return [att.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize(
    "shape, block_elements, blocks",
    [
        ((2, 4, 64, 64, 32), additive.BLOCK_ELEMENTS, 1),  # the tiny config's shape
        ((2, 2, 40, 40, 8), 2 * 2 * 40 * 8 * 3, 14),  # blocks of 3 queries, spans growing
        ((1, 3, 5, 9, 8), 3 * 9 * 8 * 2, 3),  # queries are the last 5 of 9 positions (a cache)
    ],
)
def test_blockwise_equals_direct(monkeypatch, shape, block_elements, blocks):
    monkeypatch.setattr(additive, "BLOCK_ELEMENTS", block_elements)
    B, H, T, Tk, hs = shape
    assert len(additive._blocks(torch.empty(B, H, T, hs), Tk)) == blocks
    g = torch.Generator().manual_seed(0)
    leaves = [
        torch.randn(B, H, T, hs, generator=g),
        torch.randn(B, H, Tk, hs, generator=g),
        torch.randn(H, hs, hs, generator=g) / hs**0.5,
        torch.randn(H, hs, hs, generator=g) / hs**0.5,
        torch.randn(H, hs, generator=g),
    ]
    upstream = torch.randn(B, H, T, Tk, generator=g)
    mask = causal_mask(T, Tk, torch.device("cpu"))
    want = attention_and_grads(direct, leaves, upstream, mask)
    got = attention_and_grads(additive.additive_scores, leaves, upstream, mask)
    for name, w, o in zip(["attention", "q", "k", "W_q", "W_k", "v"], want, got, strict=True):
        torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5, msg=name)


def test_keys_past_the_causal_bound_of_a_block_cost_nothing(monkeypatch):
    """With one query per block, query i's scores past key i are never computed (0)."""
    monkeypatch.setattr(additive, "BLOCK_ELEMENTS", 1)
    q, k = torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    w, v = torch.randn(1, 4, 4), torch.randn(1, 4)
    scores = additive.additive_scores(q, k, w, w, v)
    assert torch.all(scores.triu(diagonal=1) == 0)
    lower = causal_mask(6, 6, torch.device("cpu"))
    torch.testing.assert_close(scores[..., lower], direct(q, k, w, w, v)[..., lower])
