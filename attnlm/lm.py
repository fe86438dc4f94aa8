"""What every language model here shares, the Transformer (`attnlm.model`) and the LSTM
(`attnlm.lstm`) alike: the forward's output, the loss, the position and cache-length checks, the
AdamW parameter groups."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnlm.config import GPTConfig


class GPTOutput(NamedTuple):
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None  # scalar mean cross-entropy in nats, when targets are given
    attention: torch.Tensor | None  # (n_layer, B, n_head, T, T_k) float32, when asked for


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


def optimizer_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    params = [p for p in module.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
