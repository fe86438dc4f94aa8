"""Model configuration: the one source of truth for the Transformer's shape.

A `GPTConfig` validates itself at construction and collects every problem into one
`ConfigError`, so a bad config fails before any work starts, with the field named:

    >>> GPTConfig(n_embd=100, n_head=3)
    Traceback (most recent call last):
    ...
    attnlm.config.ConfigError: invalid model config: n_embd (100) must be divisible by n_head (3)

The default architecture maps one to one onto a Hugging Face GPT-2 `config.json`
(`to_hf_dict` / `from_hf_dict`). The two comparison architectures of the probe study, an LSTM
(`arch="lstm"`) and self-attention with Bahdanau's additive scoring (`attention="additive"`),
have no GPT-2 equivalent; their `config.json` has `model_type: "attnlm"` and our own fields.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

BYTE_ALPHABET = 256  # byte-level BPE needs every byte as a token
ARCHS = ("transformer", "lstm")
ATTENTIONS = ("dot_product", "additive")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


# GPT2Config options whose other values change the computation; attnlm implements these values
GPT2_FIXED = {
    "scale_attn_weights": True,  # scores / sqrt(head_size)
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,  # the output head is the token embedding
}


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 512  # rows of the token embedding and of the (tied) output head
    block_size: int = 128  # context length: the number of learned positions
    n_layer: int = 4  # Transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # residual stream width; n_embd / n_head is the head size
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches
    bias: bool = True  # biases in Linear layers (GPT-2 has them; LayerNorm always has one)
    layer_norm_epsilon: float = 1e-5
    # "transformer" (GPT-2) or "lstm" (n_layer LSTM layers of width n_embd; n_head unused)
    arch: str = "transformer"
    # "dot_product" (softmax(QK^T/sqrt(d)), SDPA kernels) or "additive" (v^T tanh(W_q q + W_k k))
    attention: str = "dot_product"

    def __post_init__(self) -> None:
        errors = []
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.vocab_size, int) and 1 <= self.vocab_size <= BYTE_ALPHABET:
            errors.append(
                f"vocab_size ({self.vocab_size}) must exceed the byte alphabet ({BYTE_ALPHABET}) "
                "plus the end-of-text token"
            )
        if self.arch not in ARCHS:
            errors.append(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.attention not in ATTENTIONS:
            errors.append(
                f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}"
            )
        elif self.arch == "lstm" and self.attention != "dot_product":
            errors.append("attention applies to arch 'transformer' only; an LSTM has none")
        if (
            self.arch != "lstm"
            and isinstance(self.n_embd, int)
            and isinstance(self.n_head, int)
            and self.n_head >= 1
            and self.n_embd >= 1
            and self.n_embd % self.n_head
        ):
            errors.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            errors.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not (
            self.layer_norm_epsilon > 0 and math.isfinite(self.layer_norm_epsilon)
        ):
            errors.append(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if errors:
            raise ConfigError("invalid model config: " + "; ".join(errors))

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"invalid model config: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    @property
    def is_gpt2(self) -> bool:
        """True when Hugging Face's GPT-2 computes exactly this model (export stays GPT-2)."""
        return self.arch == "transformer" and self.attention == "dot_product"

    @property
    def has_attention(self) -> bool:
        return self.arch == "transformer"

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json fields: Hugging Face `GPT2Config` ones for the default architecture;
        for the others model_type "attnlm" with this dataclass under "attnlm_config"."""
        if not self.is_gpt2:
            name = "AttnLMLSTM" if self.arch == "lstm" else "AttnLMAdditive"
            return {
                "architectures": [name],
                "model_type": "attnlm",
                "vocab_size": self.vocab_size,
                "n_positions": self.block_size,
                "attnlm_config": self.to_dict(),
            }
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_inner": None,  # 4 * n_embd
            "activation_function": "gelu_new",  # tanh approximation, as nn.GELU("tanh")
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "scale_attn_weights": True,
            "tie_word_embeddings": True,
            "use_cache": True,
            "attnlm": {"bias": self.bias},
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> GPTConfig:
        """Read a GPT-2 (or attnlm) `config.json` dict. Fails with ConfigError on what this model
        can't represent."""
        if hf.get("model_type") == "attnlm":
            values = hf.get("attnlm_config")
            if not isinstance(values, dict):
                raise ConfigError(
                    "config.json: model_type 'attnlm' needs an 'attnlm_config' object"
                )
            return cls.from_dict(values)
        if hf.get("model_type") != "gpt2":
            raise ConfigError(
                f"config.json: model_type {hf.get('model_type')!r} is not supported: attnlm loads "
                "GPT-2-family folders (model_type 'gpt2': gpt2, gpt2-medium/large/xl, distilgpt2 "
                "and fine-tunes of them) and its own exports (model_type 'attnlm')"
            )
        unsupported = [
            f"{key}={hf[key]!r} (attnlm computes {value!r})"
            for key, value in GPT2_FIXED.items()
            if key in hf and hf[key] != value
        ]
        if unsupported:
            raise ConfigError(
                f"config.json: this GPT-2 variant is not supported: {', '.join(unsupported)}"
            )
        missing = [
            k for k in ("vocab_size", "n_positions", "n_layer", "n_head", "n_embd") if k not in hf
        ]
        if missing:
            raise ConfigError(f"config.json: missing field(s) {', '.join(missing)}")
        n_inner = hf.get("n_inner")
        if n_inner not in (None, 4 * hf["n_embd"]):
            raise ConfigError(f"config.json: n_inner must be 4 * n_embd, got {n_inner}")
        if hf.get("activation_function", "gelu_new") != "gelu_new":
            raise ConfigError(
                f"config.json: activation_function must be 'gelu_new', got {hf['activation_function']!r}"
            )
        return cls(
            vocab_size=hf["vocab_size"],
            block_size=hf["n_positions"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=hf.get("resid_pdrop", 0.0),
            bias=hf.get("attnlm", {}).get("bias", True),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        )
