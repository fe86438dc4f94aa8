"""The networks a `GPTConfig` describes, whatever its architecture: `build_model` and the FLOPs
per token (for MFU) of either.

    model = build_model(config)          # GPT (dot-product or additive attention) or LSTMLM
    flops_per_token(config)              # training FLOPs per token; training=False: forward only

It sits above `attnlm.model` (the Transformer and the helpers both networks share) and
`attnlm.lstm` (which imports those helpers), so that no module imports one that imports it back.
"""

from __future__ import annotations

from attnlm.config import GPTConfig
from attnlm.lstm import LSTMLM
from attnlm.model import GPT


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
