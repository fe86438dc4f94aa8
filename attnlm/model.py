"""The attnlm Transformer: a GPT-2 language model with its attention laid open.

One definition used by training, serving, export and tests. It reads bottom-up:
KVCache -> CausalSelfAttention -> MLP -> Block -> GPT. Parameter names and layouts follow
GPT-2 (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...), so weights map key by key onto
Hugging Face's `GPT2LMHeadModel` (whose Conv1D weights are the transpose of our Linear ones).

Attention is computed in one place, `CausalSelfAttention.attend`:
- by default through `F.scaled_dot_product_attention` (flash / memory-efficient kernels);
- with `return_attention=True` through an explicit softmax(QK^T/sqrt(d)) that also returns
  the probabilities, shape (n_layer, B, n_head, T, T_k). Both give the same outputs.

Incremental decoding: `model.set_kv_cache(batch_size)` then `model(idx, input_pos=p)` writes the
keys/values of positions p..p+T-1 into the cache and attends over positions 0..p+T-1.

    model = GPT(GPTConfig(vocab_size=512))
    out = model(idx)                                  # out.logits: (B, T, vocab_size)
    out = model(idx, return_attention=True)           # out.attention: (n_layer, B, n_head, T, T)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnlm.config import GPTConfig


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None  # scalar mean cross-entropy in nats, when targets are given
    attention: torch.Tensor | None  # (n_layer, B, n_head, T, T_k) float32, when asked for


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, for one attention layer."""

    def __init__(
        self,
        batch_size: int,
        n_head: int,
        max_seq_length: int,
        head_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        shape = (batch_size, n_head, max_seq_length, head_size)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(
        self, input_pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hs) at positions input_pos.. and return all keys/values so far.

        Returns:
            k, v of shape (B, nh, input_pos + T, hs).
        """
        B, _, T, _ = k.shape
        end = input_pos + T
        if B > self.k.size(0) or end > self.k.size(2):
            raise ValueError(
                f"KV cache holds batch {self.k.size(0)} x {self.k.size(2)} positions; "
                f"asked for batch {B} up to position {end}"
            )
        self.k[:B, :, input_pos:end] = k.to(self.k.dtype)
        self.v[:B, :, input_pos:end] = v.to(self.v.dtype)
        return self.k[:B, :, :end], self.v[:B, :, :end]


def causal_mask(t_query: int, t_key: int, device: torch.device | None = None) -> torch.Tensor:
    """Boolean mask (t_query, t_key), True where attention is allowed.

    The queries are the last t_query of t_key positions: query i sits at absolute position
    t_key - t_query + i and sees keys 0..t_key - t_query + i.
    """
    offset = t_key - t_query
    return torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril(diagonal=offset)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_size = config.head_size
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(
        self, x: torch.Tensor, input_pos: int | None = None, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C). Returns y (B, T, C) and, if asked, probabilities (B, nh, T, T_k)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError(
                    "input_pos given but no KV cache: call model.set_kv_cache() first"
                )
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nh, T_k, hs)
        y, att = self.attend(q, k, v, return_attention)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), att

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal attention of q (B, nh, T, hs) over k, v (B, nh, T_k, hs), T <= T_k.

        Returns:
            y (B, nh, T, hs) and, if return_attention, float32 probabilities (B, nh, T, T_k)
            with exact zeros on future positions (taken before dropout).
        """
        t_query, t_key = q.size(-2), k.size(-2)
        dropout_p = self.dropout if self.training else 0.0
        if not return_attention:
            if t_query == t_key:
                return F.scaled_dot_product_attention(
                    q, k, v, dropout_p=dropout_p, is_causal=True
                ), None
            if t_query == 1:  # one new token sees every cached position
                return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p), None
            mask = causal_mask(t_query, t_key, q.device)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout_p
            ), None

        scores = (q @ k.transpose(-2, -1)).float() * (
            1.0 / math.sqrt(q.size(-1))
        )  # (B, nh, T, T_k)
        scores = scores.masked_fill(~causal_mask(t_query, t_key, q.device), float("-inf"))
        att = F.softmax(scores, dim=-1)  # (B, nh, T, T_k)
        weights = F.dropout(att, p=dropout_p, training=self.training) if dropout_p else att
        y = weights.to(v.dtype) @ v  # (B, nh, T, hs)
        return y, att


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, input_pos: int | None = None, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, att = self.attn(self.ln_1(x), input_pos, return_attention)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, att


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        input_pos: int | None = None,
        return_attention: bool = False,
    ) -> GPTOutput:
        """Next-token logits for every position.

        Args:
            idx: token ids (B, T).
            targets: next-token ids (B, T); -1 is ignored. Gives `loss`.
            input_pos: absolute position of idx[:, 0] when decoding with the KV cache; None for
                a plain forward over positions 0..T-1 that leaves any cache untouched.
            return_attention: also return the attention probabilities of every layer and head.

        Returns:
            GPTOutput(logits (B, T, V), loss or None, attention (n_layer, B, nh, T, T_k) or None),
            where T_k = input_pos + T with the cache and T without.
        """
        B, T = idx.shape
        start = 0 if input_pos is None else input_pos
        if start < 0 or start + T > self.config.block_size:
            raise ValueError(
                f"positions {start}..{start + T - 1} exceed the context window of "
                f"{self.config.block_size} tokens"
            )
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(
            self.transformer.wte(idx) + self.transformer.wpe(pos)
        )  # (B, T, C)
        attentions = []
        for block in self.transformer.h:
            x, att = block(x, input_pos, return_attention)
            attentions.append(att)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(
                logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
            )
        attention = torch.stack(attentions) if return_attention else None  # (L, B, nh, T, T_k)
        return GPTOutput(logits, loss, attention)

    # -- KV cache ------------------------------------------------------------------------------
    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Give every attention layer a cache of `max_seq_length` (default: the context) positions."""
        max_seq_length = self.config.block_size if max_seq_length is None else max_seq_length
        if not 1 <= max_seq_length <= self.config.block_size:
            raise ValueError(
                f"max_seq_length must be in 1..{self.config.block_size}, got {max_seq_length}"
            )
        ref = self.lm_head.weight
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(
                batch_size,
                self.config.n_head,
                max_seq_length,
                self.config.head_size,
                device=device or ref.device,
                dtype=dtype or ref.dtype,
            )

    def clear_kv_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None

    # -- bookkeeping -----------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default (the token one is
        tied to the output head, whose matmul is real compute)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay on matrices (Linear weights, embeddings), none on
        biases and LayerNorm parameters."""
        params = {name: p for name, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def flops_per_token(config: GPTConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Model FLOPs per token (matmuls only, 2 FLOPs per multiply-add), for MFU.

    Forward per layer: QKV 6C², output projection 2C², MLP 16C², attention scores and
    weighted sum 4·T·C (counted over the full T×T square, as in PaLM's MFU); plus the output
    head 2·C·V. Training (forward + backward) is 3× the forward. With T = block_size this equals
    nanoGPT's 6N + 12·L·C·T.
    """
    T = config.block_size if seq_len is None else seq_len
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    forward = L * (24 * C * C + 4 * T * C) + 2 * C * V
    return float(3 * forward if training else forward)
