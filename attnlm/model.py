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

Two variants for comparison, both built by `build_model(config)` and trained, exported and
served by the same code:
- `GPTConfig(attention="additive")`: Bahdanau-style additive scoring inside the same causal
  self-attention, score(q, k) = v^T tanh(W_q q + W_k k) per head (Bahdanau et al. 2014), masked
  and softmaxed. No fused kernel exists for it: it always takes the explicit path.
- `GPTConfig(arch="lstm")`: `LSTMLM`, an LSTM language model, the recurrent bottleneck that
  attention removed. Same forward signature and "KV cache" interface (a cache of the recurrent
  state), no attention (`return_attention=True` raises).
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
        self._check_room(B, end)
        self.k[:B, :, input_pos:end] = k.to(self.k.dtype)
        self.v[:B, :, input_pos:end] = v.to(self.v.dtype)
        return self.k[:B, :, :end], self.v[:B, :, :end]

    def _check_room(self, batch: int, end: int) -> None:
        if batch > self.k.size(0) or end > self.k.size(2):
            raise ValueError(
                f"KV cache holds batch {self.k.size(0)} x {self.k.size(2)} positions; "
                f"asked for batch {batch} up to position {end}"
            )

    def update_rows(
        self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per row at its own position: store k, v (B, nh, 1, hs) of row b at
        positions[b], and return the keys/values up to the furthest row, (B, nh, max + 1, hs)."""
        B = k.size(0)
        end = int(positions.max()) + 1
        self._check_room(B, end)
        rows = torch.arange(B, device=k.device)
        self.k[rows, :, positions] = k[:, :, 0].to(self.k.dtype)
        self.v[rows, :, positions] = v[:, :, 0].to(self.v.dtype)
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
        self.additive = config.attention == "additive"
        if self.additive:  # per head: W_q, W_k (hs -> hs) and v (hs)
            hs = config.head_size
            self.add_q = nn.Parameter(torch.randn(config.n_head, hs, hs) / math.sqrt(hs))
            self.add_k = nn.Parameter(torch.randn(config.n_head, hs, hs) / math.sqrt(hs))
            self.add_v = nn.Parameter(torch.randn(config.n_head, hs) / math.sqrt(hs))

    def forward(
        self,
        x: torch.Tensor,
        input_pos: int | torch.Tensor | None = None,
        return_attention: bool = False,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C). Returns y (B, T, C) and, if asked, probabilities (B, nh, T, T_k).
        `mask` (B, 1, T, T) bool replaces the causal mask (packed sequences, no cache)."""
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
            if isinstance(input_pos, torch.Tensor):  # one token per row, each at its own position
                k, v = self.kv_cache.update_rows(input_pos, k, v)  # (B, nh, T_k, hs)
                keys = torch.arange(k.size(2), device=k.device)
                mask = (keys[None, :] <= input_pos[:, None])[:, None, None, :]  # (B, 1, 1, T_k)
            else:
                k, v = self.kv_cache.update(input_pos, k, v)  # (B, nh, T_k, hs)
        y, att = self.attend(q, k, v, return_attention, mask)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), att

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        return_attention: bool,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Causal attention of q (B, nh, T, hs) over k, v (B, nh, T_k, hs), T <= T_k; or, with
        `mask` (B, 1, T, T_k) bool, attention where the mask is True.

        Returns:
            y (B, nh, T, hs) and, if return_attention, float32 probabilities (B, nh, T, T_k)
            with exact zeros on future positions (taken before dropout).
        """
        t_query, t_key = q.size(-2), k.size(-2)
        dropout_p = self.dropout if self.training else 0.0
        if self.additive:
            scores = self.additive_scores(q, k)  # (B, nh, T, T_k) float32
        elif not return_attention:
            if mask is not None:
                return F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p
                ), None
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
        else:
            scores = (q @ k.transpose(-2, -1)).float() * (
                1.0 / math.sqrt(q.size(-1))
            )  # (B, nh, T, T_k)
        allowed = causal_mask(t_query, t_key, q.device) if mask is None else mask
        scores = scores.masked_fill(~allowed, float("-inf"))
        att = F.softmax(scores, dim=-1)  # (B, nh, T, T_k)
        weights = F.dropout(att, p=dropout_p, training=self.training) if dropout_p else att
        y = weights.to(v.dtype) @ v  # (B, nh, T, hs)
        return y, att if return_attention else None

    def additive_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Bahdanau scores v^T tanh(W_q q + W_k k) for every query/key pair: (B, nh, T, T_k) float32.

        Materialises (B, nh, T, T_k, hs): memory and time grow with T^2 * hs, which is why this
        variant is for the small configs.
        """
        qa = torch.einsum("bhtd,hde->bhte", q, self.add_q.to(q.dtype))  # (B, nh, T, hs)
        ka = torch.einsum("bhtd,hde->bhte", k, self.add_k.to(k.dtype))  # (B, nh, T_k, hs)
        hidden = torch.tanh(qa.unsqueeze(3) + ka.unsqueeze(2))  # (B, nh, T, T_k, hs)
        return torch.einsum("bhtke,he->bhtk", hidden, self.add_v.to(hidden.dtype)).float()


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
        self,
        x: torch.Tensor,
        input_pos: int | torch.Tensor | None = None,
        return_attention: bool = False,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, att = self.attn(self.ln_1(x), input_pos, return_attention, mask)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, att


def packed_layout(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention mask of packed rows: several texts side by side in one row.

    Args:
        segments: (B, T) integer id of the text each token belongs to; a text's tokens are
            contiguous (ids need only differ between neighbours).
    Returns:
        positions (B, T): each token's index within its text (0 at each text's start);
        mask (B, 1, T, T) bool: a token attends to the earlier tokens of its own text only.
    """
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    mask = same & causal_mask(T, T, segments.device)
    return index - first, mask[:, None]


def check_positions(config: GPTConfig, start: int, length: int) -> None:
    """ValueError unless positions start..start+length-1 fit the context window."""
    if start < 0 or start + length > config.block_size:
        raise ValueError(
            f"positions {start}..{start + length - 1} exceed the context window of "
            f"{config.block_size} tokens"
        )


def cache_length(config: GPTConfig, max_seq_length: int | None) -> int:
    """The positions a decoding cache holds (default: the whole context), checked."""
    max_seq_length = config.block_size if max_seq_length is None else max_seq_length
    if not 1 <= max_seq_length <= config.block_size:
        raise ValueError(f"max_seq_length must be in 1..{config.block_size}, got {max_seq_length}")
    return max_seq_length


def lm_loss(logits: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor | None:
    """Mean next-token cross-entropy in nats (targets -1 ignored), or None without targets."""
    if targets is None:
        return None
    return F.cross_entropy(
        logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1
    )


class GPT(nn.Module):
    has_attention = True

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.arch != "transformer":
            raise ValueError(f"GPT builds arch 'transformer', got {config.arch!r}: use build_model")
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
        input_pos: int | torch.Tensor | None = None,
        return_attention: bool = False,
        segments: torch.Tensor | None = None,
    ) -> GPTOutput:
        """Next-token logits for every position.

        Args:
            idx: token ids (B, T).
            targets: next-token ids (B, T); -1 is ignored. Gives `loss`.
            input_pos: absolute position of idx[:, 0] when decoding with the KV cache; None for
                a plain forward over positions 0..T-1 that leaves any cache untouched; or a
                (B,) tensor with one position per row, for one token per row (idx (B, 1)): rows
                of the cache at different lengths decoded together.
            return_attention: also return the attention probabilities of every layer and head.
            segments: (B, T) ids for packed rows (`packed_layout`): several texts per row, each
                with its own positions from 0 and attending only to itself, as if it were alone
                (batched serving without padding). Not with input_pos.

        Returns:
            GPTOutput(logits (B, T, V), loss or None, attention (n_layer, B, nh, T, T_k) or None),
            where T_k = input_pos + T with the cache and T without.
        """
        B, T = idx.shape
        mask = None
        if segments is not None and input_pos is not None:
            raise ValueError("segments (packed rows) cannot be combined with the KV cache")
        if isinstance(input_pos, torch.Tensor):  # rows at different positions (batched decoding)
            if T != 1 or input_pos.shape != (B,):
                raise ValueError("per-row input_pos needs idx (B, 1) and input_pos (B,)")
            check_positions(self.config, int(input_pos.max()), 1)
            pos = input_pos[:, None]  # (B, 1)
        elif segments is not None:
            check_positions(self.config, 0, T)
            pos, mask = packed_layout(segments)  # (B, T), (B, 1, T, T)
        else:
            start = 0 if input_pos is None else input_pos
            check_positions(self.config, start, T)
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(
            self.transformer.wte(idx) + self.transformer.wpe(pos)
        )  # (B, T, C)
        attentions = []
        for block in self.transformer.h:
            x, att = block(x, input_pos, return_attention, mask)
            attentions.append(att)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        loss = lm_loss(logits, targets)
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
        max_seq_length = cache_length(self.config, max_seq_length)
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

    def kv_cache_state(self) -> list[KVCache | None]:
        """The caches now installed (to park them and `load_kv_cache_state` them later)."""
        return [block.attn.kv_cache for block in self.transformer.h]

    def load_kv_cache_state(self, state: list[KVCache | None]) -> None:
        for block, cache in zip(self.transformer.h, state, strict=True):
            block.attn.kv_cache = cache

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
        return optimizer_groups(self, weight_decay)


def optimizer_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class LSTMState(nn.Module):
    """The LSTM's "KV cache": hidden and cell state after the tokens fed so far."""

    def __init__(self, n_layer: int, batch_size: int, width: int, device=None, dtype=None) -> None:
        super().__init__()
        shape = (n_layer, batch_size, width)
        self.register_buffer("h", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("c", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.max_seq_length = 0
        self.pos = 0  # tokens fed so far


class LSTMLM(nn.Module):
    """An LSTM language model with GPT's interface: tokens -> embedding -> n_layer LSTM layers of
    width n_embd -> LayerNorm -> tied output head. Everything it knows about the past is in one
    state vector per layer: the bottleneck that attention removed."""

    has_attention = False

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.arch != "lstm":
            raise ValueError(f"LSTMLM builds arch 'lstm', got {config.arch!r}: use build_model")
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.drop = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(
            C, C, num_layers=config.n_layer, batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0, bias=True,
        )  # fmt: skip
        self.ln_f = nn.LayerNorm(C, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)
        for name, p in self.lstm.named_parameters():
            if name.startswith("bias_ih"):  # forget-gate bias 1 (Jozefowicz et al. 2015)
                with torch.no_grad():
                    p.zero_()
                    p[C : 2 * C] = 1.0
            elif name.startswith("bias_hh"):
                nn.init.zeros_(p)
        self.state: LSTMState | None = None

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        input_pos: int | torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> GPTOutput:
        """As `GPT.forward`. With input_pos the recurrent state continues from the tokens fed
        before (input_pos must equal their count; 0 starts afresh)."""
        if return_attention:
            raise ValueError("an LSTM has no attention to return")
        if isinstance(input_pos, torch.Tensor):
            raise ValueError("the LSTM decodes all rows at one position: input_pos must be an int")
        B, T = idx.shape
        start = 0 if input_pos is None else input_pos
        check_positions(self.config, start, T)
        x = self.drop(self.wte(idx))  # (B, T, C)
        if input_pos is None:
            x, _ = self.lstm(x)
        else:
            state = self.state
            if state is None:
                raise RuntimeError("input_pos given but no state cache: call set_kv_cache() first")
            if B > state.h.size(1) or start + T > state.max_seq_length:
                raise ValueError(
                    f"state cache holds batch {state.h.size(1)} x {state.max_seq_length} "
                    f"positions; asked for batch {B} up to position {start + T}"
                )
            if start not in (0, state.pos):
                raise ValueError(f"input_pos {start} does not continue the {state.pos} tokens fed")
            if start == 0:
                x, (h, c) = self.lstm(x)
            else:
                x, (h, c) = self.lstm(x, (state.h[:, :B].contiguous(), state.c[:, :B].contiguous()))
            state.h[:, :B] = h.to(state.h.dtype)
            state.c[:, :B] = c.to(state.c.dtype)
            state.pos = start + T
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = lm_loss(logits, targets)
        return GPTOutput(logits, loss, None)

    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        max_seq_length = cache_length(self.config, max_seq_length)
        ref = self.lm_head.weight
        self.state = LSTMState(
            self.config.n_layer, batch_size, self.config.n_embd,
            device=device or ref.device, dtype=dtype or ref.dtype,
        )  # fmt: skip
        self.state.max_seq_length = max_seq_length

    def clear_kv_cache(self) -> None:
        self.state = None

    def kv_cache_state(self) -> LSTMState | None:
        return self.state

    def load_kv_cache_state(self, state: LSTMState | None) -> None:
        self.state = state

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        return optimizer_groups(self, weight_decay)


LanguageModelNet = GPT | LSTMLM


def build_model(config: GPTConfig) -> GPT | LSTMLM:
    """The network `config` describes: `GPT` (either attention) or `LSTMLM`."""
    return LSTMLM(config) if config.arch == "lstm" else GPT(config)


def flops_per_token(config: GPTConfig, seq_len: int | None = None, training: bool = True) -> float:
    """Model FLOPs per token (matmuls only, 2 FLOPs per multiply-add), for MFU.

    Forward per layer: QKV 6C², output projection 2C², MLP 16C², attention scores and
    weighted sum 4·T·C (counted over the full T×T square, as in PaLM's MFU); plus the output
    head 2·C·V. Training (forward + backward) is 3× the forward. With T = block_size this equals
    nanoGPT's 6N + 12·L·C·T.
    """
    T = config.block_size if seq_len is None else seq_len
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    if config.arch == "lstm":  # 4 gates, each (C + C) -> C
        forward = L * 16 * C * C + 2 * C * V
    else:
        forward = L * (24 * C * C + 4 * T * C) + 2 * C * V
        if config.attention == "additive":  # W_q q, W_k k (2·C·hs each), v^T tanh (2·T·C)
            forward += L * (4 * C * config.head_size + 2 * T * C)
    return float(3 * forward if training else forward)
