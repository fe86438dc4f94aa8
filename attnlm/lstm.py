"""An LSTM language model with GPT's interface, the probe study's recurrent baseline.

`GPTConfig(arch="lstm")` builds `LSTMLM` (through `attnlm.networks.build_model`), trained,
exported and served by the same code as `GPT`: same forward signature and "KV cache" interface
(here a cache of the recurrent state, `LSTMState`), no attention (`return_attention=True`
raises), no per-row decode positions (it decodes alone, through `attnlm.generate.stream`).

    model = LSTMLM(GPTConfig(vocab_size=512, arch="lstm", n_layer=2, n_embd=208))
    out = model(idx)                                  # out.logits: (B, T, vocab_size)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnlm.config import GPTConfig
from attnlm.lm import GPTOutput, cache_length, check_positions, lm_loss, optimizer_groups


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
        input_pos: int | None = None,
        row_positions: torch.Tensor | None = None,
        return_attention: bool = False,
    ) -> GPTOutput:
        """As `GPT.forward`. With input_pos the recurrent state continues from the tokens fed
        before (input_pos must equal their count; 0 starts afresh)."""
        if return_attention:
            raise ValueError("an LSTM has no attention to return")
        if row_positions is not None or isinstance(input_pos, torch.Tensor):
            raise ValueError("the LSTM decodes all rows at one position: input_pos, an int")
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
