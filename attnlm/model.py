"""The attnlm Transformer: a GPT-2 language model with its attention laid open.

One definition used by training, serving, export and tests. It reads bottom-up:
KVCache -> causal_mask -> CausalSelfAttention -> MLP -> Block -> GPT. Parameter names and
layouts follow GPT-2 (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...), so weights map key
by key onto Hugging Face's `GPT2LMHeadModel` (whose Conv1D weights are the transpose of ours).

    model = GPT(GPTConfig(vocab_size=512))
    out = model(idx)                                  # out.logits: (B, T, vocab_size)
    out = model(idx, return_attention=True)           # out.attention: (n_layer, B, n_head, T, T)
    out = model(idx, return_attention=True, attention_layers=[3])  # (1, B, n_head, T, T)
    model(idx, attention_sink=lambda layer, q, k: ...)  # every layer's q, k; all through SDPA

Attention is computed in one place, `CausalSelfAttention.attend`: through
`F.scaled_dot_product_attention` by default, through an explicit softmax(QK^T/sqrt(d)) that also
returns the probabilities with `return_attention=True` (and serves per-row decode on the CPU,
where it is faster); both give the same outputs. Which keys a query sees is one function,
`causal_mask`, for every layout: plain, cached, packed rows (`segments`), per-row decode
(`row_positions`). `GPTConfig(attention="additive")` scores with
Bahdanau's v^T tanh(W_q q + W_k k) per head instead (always the explicit path: no fused kernel).

Incremental decoding: `model.set_kv_cache(batch_size)`, then `model(idx, input_pos=p)` writes
the keys/values of positions p..p+T-1 and attends over 0..p+T-1, or `model(idx, row_positions=pos)`
feeds one token per row, row b at position pos[b] (rows decoded together: `attnlm.batching`;
with `key_length`, over a fixed span of keys: the compiled step of `attnlm.fastdecode`).
What the LSTM (`attnlm.lstm`) shares with it lives in `attnlm.lm` (GPTOutput, lm_loss, the
position and cache checks, optimizer_groups).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnlm.additive import additive_scores
from attnlm.config import GPTConfig
from attnlm.lm import GPTOutput, cache_length, check_positions, lm_loss, optimizer_groups

# receives a layer's queries (B, nh, T, hs) and keys (B, nh, T_k, hs); with the layer's index first
QKSink = Callable[[torch.Tensor, torch.Tensor], None]
AttentionSink = Callable[[int, torch.Tensor, torch.Tensor], None]


class KVCache(nn.Module):
    """Keys and values of the positions seen so far, for one attention layer. Only its own
    methods write them: a block of positions for all rows (`update`), one position per row
    (`update_rows`), or another cache's rows copied in (`copy_rows`)."""

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

    def update_rows(
        self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One new token per row at its own position: store k, v (B, nh, 1, hs) of row b at
        positions[b] (< length), and return the keys/values of positions 0..length-1,
        (B, nh, length, hs)."""
        B = k.size(0)
        self._check_room(B, length)
        rows = torch.arange(B, device=k.device)
        self.k[rows, :, positions] = k[:, :, 0].to(self.k.dtype)
        self.v[rows, :, positions] = v[:, :, 0].to(self.v.dtype)
        return self.k[:B, :, :length], self.v[:B, :, :length]

    def copy_rows(self, rows: torch.Tensor, source: KVCache) -> None:
        """Copy every position of `source`'s n rows into rows `rows` (n,) of this cache, from
        position 0: a prompt prefilled alone joins a shared cache."""
        n, _, length, _ = source.k.shape
        if rows.shape != (n,):
            raise ValueError(f"copy_rows: {n} source rows into {tuple(rows.shape)} rows")
        self._check_room(int(rows.max()) + 1, length)
        self.k[rows, :, :length] = source.k.to(self.k.dtype)
        self.v[rows, :, :length] = source.v.to(self.v.dtype)

    def _check_room(self, batch: int, end: int) -> None:
        if batch > self.k.size(0) or end > self.k.size(2):
            raise ValueError(
                f"KV cache holds batch {self.k.size(0)} x {self.k.size(2)} positions; "
                f"asked for batch {batch} up to position {end}"
            )


def causal_mask(
    t_query: int,
    t_key: int,
    device: torch.device | None = None,
    *,
    row_positions: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask, True where a query may see a key: the keys at or before its own position.
    The queries are the last t_query of t_key positions (plain: t_query == t_key; cached: after
    an offset): query i sits at t_key - t_query + i.

    Args:
        row_positions: (B,) per-row decode (t_query == 1): row b's query sits at row_positions[b].
        segments: (B, T) packed rows (t_query == t_key == T, see `segment_starts`): a query
            sees no key before the start of its own text.
    Returns:
        (t_query, t_key); (B, 1, t_query, t_key) with row_positions or segments.
    """
    keys = torch.arange(t_key, device=device)  # (T_k,)
    if row_positions is not None:
        queries = row_positions[:, None]  # (B, 1)
    else:
        queries = torch.arange(t_key - t_query, t_key, device=device)  # (T,)
    allowed = keys <= queries[..., None]  # (T, T_k) or (B, 1, T_k)
    if segments is not None:
        allowed = allowed & (keys >= segment_starts(segments)[..., None])  # (B, T, T)
    return allowed if allowed.dim() == 2 else allowed[:, None]


KEY_BLOCK = 128  # keys per partial sum of the batch-invariant path (see `blocked_values`)


def key_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q . k for every query/key pair, (B, nh, T, hs) x (B, nh, T_k, hs) -> (B, nh, T, T_k)
    float32, each score summed over the head alone: no GEMM whose kernel follows the key count
    (one query's q @ k^T does, for 16-wide heads on an AVX-512 CPU). For one query per row."""
    return (q.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1)  # (B, nh, T, T_k)


def blocked_values(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights (B, nh, T, T_k) @ v (B, nh, T_k, hs) as partial sums over blocks of `KEY_BLOCK`
    keys added in key order, so that a key's contribution does not depend on how many keys
    follow it (one fp32 GEMM over all the keys reblocks its sum past ~200 of them). One query
    per row (T == 1) sums weight x value per key in float32 instead of a matrix-vector product,
    whose kernel follows the key count; compiled, in one sum over every key (inductor's loop adds
    them in order; a loop over blocks would make the graph recompile for each key span)."""
    one_query = weights.size(-2) == 1
    if one_query and torch.compiler.is_compiling():  # inductor's own loop sums keys in order
        return (weights.float().unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2).to(v.dtype)
    weights = weights.float() if one_query else weights.to(v.dtype)
    y = None
    for start in range(0, v.size(-2), KEY_BLOCK):
        w = weights[..., start : start + KEY_BLOCK]  # (B, nh, T, K)
        values = v[..., start : start + KEY_BLOCK, :]  # (B, nh, K, hs)
        if one_query:
            part = (w.unsqueeze(-1) * values.float().unsqueeze(-3)).sum(-2)  # (B, nh, 1, hs)
        else:
            part = w @ values  # (B, nh, T, hs)
        y = part if y is None else y + part
    return y.to(v.dtype)


class CausalSelfAttention(nn.Module):
    batch_invariant = False  # `GPT.set_batch_invariant`: the explicit path, batch-invariant

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
        input_pos: int | None = None,
        row_positions: torch.Tensor | None = None,
        return_attention: bool = False,
        mask: torch.Tensor | None = None,
        qk_sink: QKSink | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C). Returns y (B, T, C) and, if asked, probabilities (B, nh, T, T_k).
        The cache takes positions input_pos.. or one position per row (row_positions (B,), with
        `mask` (B, 1, 1, T_k)); `mask` (B, 1, T, T) alone replaces the causal one (packed).
        `qk_sink(q, k)`, if given, receives this layer's queries (B, nh, T, hs) and keys
        (B, nh, T_k, hs) before attending."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        if input_pos is not None or row_positions is not None:
            if self.kv_cache is None:
                raise RuntimeError("a cached forward needs a KV cache: call set_kv_cache() first")
            if row_positions is not None:  # (B, nh, T_k, hs), T_k from the mask
                k, v = self.kv_cache.update_rows(row_positions, k, v, mask.size(-1))
            else:
                k, v = self.kv_cache.update(input_pos, k, v)  # (B, nh, T_k, hs)
        if qk_sink is not None:
            qk_sink(q, k)
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
        """Causal attention of q (B, nh, T, hs) over k, v (B, nh, T_k, hs), T <= T_k (the
        queries are the last T positions); or, with `mask` (B, 1, T, T_k) bool from
        `causal_mask`, attention where the mask is True.

        Returns:
            y (B, nh, T, hs) and, if return_attention, float32 probabilities (B, nh, T, T_k)
            with exact zeros on future positions (taken before dropout).
        """
        t_query, t_key = q.size(-2), k.size(-2)
        dropout_p = self.dropout if self.training else 0.0
        # one query per row over a masked cache (per-row decode) on the CPU: the explicit softmax
        # below beats SDPA's masked kernel (32 rows x 256 keys, small shape, bf16: 13 vs 33 ms
        # eager, 6 vs 32 ms compiled; fp32 eager 24 vs 26 ms) and gives the same outputs
        explicit = return_attention or (mask is not None and t_query == 1 and q.is_cpu)
        explicit = explicit or self.batch_invariant
        if not self.additive and not explicit:  # SDPA, its fast paths when no mask
            if mask is None and t_query == t_key:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            elif mask is None and t_query == 1:  # one new token sees every cached position
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:
                if mask is None:
                    mask = causal_mask(t_query, t_key, q.device)  # (T, T_k)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
            return y, None  # (B, nh, T, hs)
        allowed = causal_mask(t_query, t_key, q.device) if mask is None else mask
        att = self.probabilities(q, k, allowed)  # (B, nh, T, T_k)
        weights = F.dropout(att, p=dropout_p, training=self.training) if dropout_p else att
        if self.batch_invariant:
            y = blocked_values(weights, v)  # (B, nh, T, hs)
        else:
            y = weights.to(v.dtype) @ v  # (B, nh, T, hs)
        return y, att if return_attention else None

    def probabilities(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        allowed: torch.Tensor,
        heads: list[int] | None = None,
    ) -> torch.Tensor:
        """Attention probabilities of q (B, h, T, hs) over k (B, h, T_k, hs) where `allowed`
        (broadcast to (B, h, T, T_k), bool) is True: the explicit path's softmax, also used to
        compute maps from q and k kept after an SDPA forward (`attention_sink`). `heads`: which
        of this layer's heads q and k hold (default all; additive scoring has weights per head,
        and takes the queries as the last T of T_k positions).

        Returns:
            (B, h, T, T_k) float32, exact zeros where not allowed.
        """
        if self.additive:
            scores = self.additive_scores(q, k, heads)  # (B, h, T, T_k) float32
        elif self.batch_invariant and q.size(-2) == 1:  # one query: no GEMV (`key_scores`)
            scores = key_scores(q, k).mul_(1.0 / math.sqrt(q.size(-1)))  # (B, h, 1, T_k)
        else:  # in place on the fresh scores: a long text's maps are large
            scores = (q @ k.transpose(-2, -1)).float()  # (B, h, T, T_k)
            scores.mul_(1.0 / math.sqrt(q.size(-1)))
        return F.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)  # (B, h, T, T_k)

    def additive_scores(
        self, q: torch.Tensor, k: torch.Tensor, heads: list[int] | None = None
    ) -> torch.Tensor:
        """Bahdanau scores v^T tanh(W_q q + W_k k) for every query/key pair the causal mask lets
        through: (B, nh, T, T_k) float32, in blocks of queries (`attnlm.additive`); `heads`:
        which heads q and k hold (default all)."""
        add_q, add_k, add_v = self.add_q, self.add_k, self.add_v
        if heads is not None:
            add_q, add_k, add_v = add_q[heads], add_k[heads], add_v[heads]
        return additive_scores(q, k, add_q, add_k, add_v)


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
        input_pos: int | None = None,
        row_positions: torch.Tensor | None = None,
        return_attention: bool = False,
        mask: torch.Tensor | None = None,
        qk_sink: QKSink | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, att = self.attn(self.ln_1(x), input_pos, row_positions, return_attention, mask, qk_sink)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, att


def segment_starts(segments: torch.Tensor) -> torch.Tensor:
    """Index (B, T) in its row of the first token of each token's text, for packed rows
    `segments` (B, T): the id of each token's text, a text being a run of one id (ids need only
    differ between neighbours)."""
    B, T = segments.shape
    index = torch.arange(T, device=segments.device).expand(B, T)  # (B, T)
    starts = torch.ones_like(segments, dtype=torch.bool)  # (B, T)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values  # (B, T)


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
        input_pos: int | None = None,
        row_positions: torch.Tensor | None = None,
        key_length: int | None = None,
        return_attention: bool = False,
        segments: torch.Tensor | None = None,
        attention_layers: Collection[int] | None = None,
        attention_sink: AttentionSink | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> GPTOutput:
        """Next-token logits for every position (or for the positions in `logits_at`).

        Args:
            idx: token ids (B, T).
            targets: next-token ids (B, T); -1 is ignored. Gives `loss`.
            input_pos: absolute position of idx[:, 0] when decoding with the KV cache; None for
                a plain forward over positions 0..T-1 that leaves any cache untouched.
            row_positions: (B,) one position per row, for one token per row (idx (B, 1)) with
                the KV cache: rows of the cache at different lengths decoded together.
            key_length: with row_positions, attend over cache positions 0..key_length-1 (the
                keys past a row's position are masked out) instead of 0..max(row_positions):
                static shapes and no host sync, for a compiled decode step
                (`attnlm.fastdecode`). The caller keeps row_positions < key_length.
            return_attention: also return the attention probabilities of every layer and head.
            segments: (B, T) ids for packed rows (`segment_starts`): several texts per row, each
                with its own positions from 0 and attending only to itself, as if it were alone
                (batched serving without padding). Not with the cache.
            attention_layers: the layers (ascending indices) that take the explicit path with
                return_attention and whose q, k go to attention_sink; default all. The others
                run SDPA, so asking for one layer's map costs one layer's explicit attention.
            attention_sink: `sink(layer, q, k)` receives each of attention_layers' queries
                (B, nh, T, hs) and keys (B, nh, T_k, hs) (after projection, before attending):
                maps can be computed later, and in parts, with that layer's
                `CausalSelfAttention.probabilities` (serving's attention selections do).
            logits_at: (n, 2) long pairs (row, position): the output head runs on those n
                positions only and logits is (n, V). A text's next token needs one position's
                logits; a vocabulary of 50,257 over every position of a 1,024-token text is a
                third of the forward and 200 MB of float32. Not with targets.

        Returns:
            GPTOutput(logits (B, T, V) or (n, V), loss or None, attention (n_attention_layers,
            B, nh, T, T_k) or None), with T_k = input_pos + T, or key_length or
            max(row_positions) + 1, or T; n_attention_layers = n_layer, or
            len(attention_layers).
        """
        B, T = idx.shape
        mask = None  # plain or input_pos: causal over the last T keys (SDPA's fast paths)
        if isinstance(input_pos, torch.Tensor):
            raise TypeError("input_pos is an int; per-row positions go in row_positions")
        if segments is not None and (input_pos is not None or row_positions is not None):
            raise ValueError("segments (packed rows) cannot be combined with the KV cache")
        if key_length is not None and row_positions is None:
            raise ValueError("key_length goes with row_positions")
        if logits_at is not None and (targets is not None or logits_at.dim() != 2):
            raise ValueError("logits_at is (n, 2) pairs (row, position), without targets")
        if row_positions is not None:  # rows at different positions (batched decoding)
            if input_pos is not None or T != 1 or row_positions.shape != (B,):
                raise ValueError("row_positions needs idx (B, 1), row_positions (B,), no input_pos")
            t_key = int(row_positions.max()) + 1 if key_length is None else key_length
            check_positions(self.config, t_key - 1, 1)
            pos = row_positions[:, None]  # (B, 1)
            mask = causal_mask(1, t_key, idx.device, row_positions=row_positions)  # (B,1,1,T_k)
        elif segments is not None:
            check_positions(self.config, 0, T)
            pos = torch.arange(T, device=idx.device) - segment_starts(segments)  # (B, T)
            mask = causal_mask(T, T, idx.device, segments=segments)  # (B, 1, T, T)
        else:
            start = 0 if input_pos is None else input_pos
            check_positions(self.config, start, T)
            pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(
            self.transformer.wte(idx) + self.transformer.wpe(pos)
        )  # (B, T, C)
        chosen = range(len(self.transformer.h)) if attention_layers is None else attention_layers
        chosen = self._attention_layers(chosen)
        attentions = []
        for i, block in enumerate(self.transformer.h):
            explicit = return_attention and i in chosen
            sink = None
            if attention_sink is not None and i in chosen:
                sink = functools.partial(attention_sink, i)
            x, att = block(x, input_pos, row_positions, explicit, mask, sink)
            if explicit:
                attentions.append(att)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if logits_at is not None:
            x = x[logits_at[:, 0], logits_at[:, 1]]  # (n, C)
        logits = self.lm_head(x)  # (B, T, V) or (n, V)
        loss = lm_loss(logits, targets)
        attention = torch.stack(attentions) if attentions else None  # (L', B, nh, T, T_k)
        return GPTOutput(logits, loss, attention)

    def _attention_layers(self, layers: Collection[int]) -> frozenset[int]:
        n = len(self.transformer.h)
        layers = list(layers)
        if not all(isinstance(i, int) and 0 <= i < n for i in layers) or layers != sorted(
            set(layers)
        ):
            raise ValueError(f"attention_layers must be ascending indices in 0..{n - 1}: {layers}")
        return frozenset(layers)

    batch_invariant = False  # set_batch_invariant's: a plain attribute, read every decode step

    def set_batch_invariant(self, on: bool = True) -> None:
        """Batch-invariant attention (`attnlm.invariance`): every layer takes the explicit path,
        its values summed over fixed blocks of keys, one query's scores summed per key; a
        text's numbers then do not depend on how far its row is padded nor on how many rows
        share the forward, as long as each forward has >= 16 rows of tokens. Slower than SDPA."""
        for block in self.transformer.h:
            block.attn.batch_invariant = on
        self.batch_invariant = on

    # -- KV cache ------------------------------------------------------------------------------
    def set_kv_cache(
        self,
        batch_size: int,
        max_seq_length: int | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Give every attention layer a cache of `max_seq_length` (default: the context) positions."""
        length, ref = cache_length(self.config, max_seq_length), self.lm_head.weight
        shape = (batch_size, self.config.n_head, length, self.config.head_size)
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(*shape, device or ref.device, dtype or ref.dtype)

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
