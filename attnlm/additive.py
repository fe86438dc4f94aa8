"""Bahdanau's additive attention scores, v^T tanh(W_q q + W_k k), in blocks of queries.

The direct form builds the (B, nh, T, T_k, hs) tensor of tanh arguments at once and autograd keeps
it (and its tanh) for the backward pass: at a 256-token context that is hundreds of MB per layer.
`additive_scores` computes the same scores a block of queries at a time, only over the keys a
block can see (a query at position p never sees keys past p: under a causal mask the upper
triangle costs nothing), and its backward pass recomputes each block's tanh instead of keeping it.
Peak memory is one block's (B, nh, block, T_k, hs), whatever T; the arithmetic is about half of
the direct form's at T = T_k.

    scores = additive_scores(q, k, w_q, w_k, v)   # (B, nh, T, T_k) float32

Scores of keys a query cannot see under the causal mask are 0 here (the caller masks them to
-inf before the softmax). The queries are the last T of T_k positions, or any positions whose
keys lie within that causal bound (a preallocated cache whose later slots are masked).
"""

from __future__ import annotations

import torch

BLOCK_ELEMENTS = 1 << 21  # one block's (B, nh, block, T_k, hs) tanh at most: 8 MB in float32


def _key_span(i1: int, t_query: int, t_key: int) -> int:
    """How many keys queries up to block end i1 can see: the queries are the last t_query of
    t_key positions."""
    return min(t_key, t_key - t_query + i1)


def _blocks(qa: torch.Tensor, t_key: int) -> list[tuple[int, int]]:
    b, h, t, e = qa.shape
    size = max(1, BLOCK_ELEMENTS // max(1, b * h * t_key * e))
    return [(i0, min(t, i0 + size)) for i0 in range(0, t, size)]


class _AdditiveScores(torch.autograd.Function):
    """scores[b, h, i, j] = sum_e v[h, e] tanh(qa[b, h, i, e] + ka[b, h, j, e]), blockwise."""

    @staticmethod
    def forward(ctx, qa: torch.Tensor, ka: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(qa, ka, v)
        b, h, t, _ = qa.shape
        t_key = ka.size(2)
        scores = qa.new_zeros(b, h, t, t_key, dtype=torch.float32)
        vv = v.view(1, h, 1, -1, 1)  # (1, nh, 1, hs, 1)
        for i0, i1 in _blocks(qa, t_key):
            span = _key_span(i1, t, t_key)
            hidden = torch.tanh(qa[:, :, i0:i1, None, :] + ka[:, :, None, :span, :])
            # (B, nh, c, span, hs) @ (hs, 1) -> (B, nh, c, span)
            scores[:, :, i0:i1, :span] = (hidden @ vv).squeeze(-1).float()
        return scores

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qa, ka, v = ctx.saved_tensors
        t, t_key = qa.size(2), ka.size(2)
        grad = grad.to(qa.dtype)
        grad_qa, grad_ka = torch.zeros_like(qa), torch.zeros_like(ka)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for i0, i1 in _blocks(qa, t_key):
            span = _key_span(i1, t, t_key)
            hidden = torch.tanh(qa[:, :, i0:i1, None, :] + ka[:, :, None, :span, :])
            g = grad[:, :, i0:i1, :span, None]  # (B, nh, c, span, 1)
            # d scores / d v: sum over b, i, j of g * hidden
            grad_v += (hidden * g).sum(dim=(0, 2, 3)).float()
            pre = g * v.view(1, v.size(0), 1, 1, -1) * (1 - hidden * hidden)  # d tanh argument
            grad_qa[:, :, i0:i1] = pre.sum(dim=3)
            grad_ka[:, :, :span] += pre.sum(dim=2)
        return grad_qa, grad_ka, grad_v.to(v.dtype)


def additive_scores(
    q: torch.Tensor, k: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Scores of q (B, nh, T, hs) against k (B, nh, T_k, hs), T <= T_k, with per-head W_q, W_k
    (nh, hs, hs) and v (nh, hs): (B, nh, T, T_k) float32, 0 above the causal diagonal."""
    qa = torch.einsum("bhtd,hde->bhte", q, w_q.to(q.dtype))  # (B, nh, T, hs)
    ka = torch.einsum("bhtd,hde->bhte", k, w_k.to(k.dtype))  # (B, nh, T_k, hs)
    return _AdditiveScores.apply(qa, ka, v.to(qa.dtype))
