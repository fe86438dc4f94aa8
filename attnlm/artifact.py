"""The serving artifact: a Hugging Face GPT-2 model folder, written and read without pickle.

    artifacts/tiny/
        model.safetensors        weights, GPT-2 names and layouts (Conv1D: (in, out))
        config.json              GPT2Config fields (model_type "gpt2")
        tokenizer.json           the byte-level BPE tokenizer
        tokenizer_config.json    so that AutoTokenizer.from_pretrained(folder) picks GPT2TokenizerFast
        special_tokens_map.json
        generation_config.json
        attnlm.json              provenance: where the weights came from, training step, metrics

`transformers.GPT2LMHeadModel.from_pretrained(folder)` loads it unchanged in meaning; our own
`load_artifact(folder)` reads it with safetensors only. The probe study's variants (an LSTM,
additive attention) have no GPT-2 equivalent: their folders have the same files, with
`model_type: "attnlm"` in config.json and our own parameter names, and only attnlm loads them.

One vocabulary: the tokenizer's. A model may have more embedding rows than the tokenizer has
tokens (a tokenizer trained on a small corpus comes out smaller than asked, or rows padded for
speed); those ids decode to nothing. `save_artifact` crops them, so config.json's `vocab_size` is
the tokenizer's size and any GPT-2 tool gets exactly the served distribution; `load_artifact`
crops a padded folder (written before this rule) the same way, so no path that loads an artifact
can give a padded id probability mass.
Folders are written atomically (`attnlm.atomic.atomic_folder`): into a temporary sibling, then
renamed into place, with the permissions of a plain mkdir / open (0777 / 0666 less the umask), so
that the serving processes can read them whoever they run as (a container's other uid).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from attnlm.atomic import atomic_folder
from attnlm.config import ConfigError, GPTConfig
from attnlm.lstm import LSTMLM
from attnlm.model import GPT
from attnlm.networks import build_model
from attnlm.tokenizer import EOT_TOKEN, Tokenizer, TokenizerError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "attnlm.json"

# Our nn.Linear weights are (out, in); GPT-2's Conv1D stores (in, out).
_CONV1D_SUFFIXES = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)


class ArtifactError(ValueError):
    """The artifact folder is missing, corrupt, or does not match itself."""


@dataclass
class Artifact:
    model: GPT
    tokenizer: Tokenizer
    config: GPTConfig
    path: Path
    info: dict[str, Any]


def to_hf_state_dict(model: GPT | LSTMLM) -> dict[str, torch.Tensor]:
    """GPT-2 state dict: Conv1D weights transposed, the tied lm_head left out, zero biases where
    the model has none (GPT-2 always has them). Other architectures: our names, lm_head left out."""
    cfg = model.config
    if not cfg.is_gpt2:
        return {
            name: tensor.detach().to("cpu", torch.float32).contiguous()
            for name, tensor in model.state_dict().items()
            if name != "lm_head.weight"
        }
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().to("cpu", torch.float32)
        state[name] = (tensor.t() if name.endswith(_CONV1D_SUFFIXES) else tensor).contiguous()
    if not cfg.bias:
        for i in range(cfg.n_layer):
            prefix = f"transformer.h.{i}"
            state[f"{prefix}.attn.c_attn.bias"] = torch.zeros(3 * cfg.n_embd)
            state[f"{prefix}.attn.c_proj.bias"] = torch.zeros(cfg.n_embd)
            state[f"{prefix}.mlp.c_fc.bias"] = torch.zeros(4 * cfg.n_embd)
            state[f"{prefix}.mlp.c_proj.bias"] = torch.zeros(cfg.n_embd)
    return state


def from_hf_state_dict(
    state: dict[str, torch.Tensor], config: GPTConfig
) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict`: our names and layouts (also accepts the 'transformer.' prefix
    missing, as in the original GPT-2 checkpoints)."""
    if not config.is_gpt2:  # our own names; re-tie the output head to the token embedding
        ours = dict(state)
        embedding = "wte.weight" if config.arch == "lstm" else "transformer.wte.weight"
        if embedding in ours:
            ours.setdefault("lm_head.weight", ours[embedding])
        return ours
    ours = {}
    for name, tensor in state.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # GPT-2's causal-mask buffers
            continue
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        if name.endswith(_CONV1D_SUFFIXES):
            tensor = tensor.t()
        if not config.bias and name.endswith(".bias") and ".ln_" not in name:
            continue
        ours[name] = tensor.contiguous()
    ours.setdefault("lm_head.weight", ours.get("transformer.wte.weight"))
    return ours


def crop_vocab(
    state: dict[str, torch.Tensor], config: GPTConfig, vocab_size: int
) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """Keep the first `vocab_size` rows of the token embedding (and the tied output head) of a
    state dict in our names; the config says the new size. No-op when there is nothing to crop."""
    if vocab_size > config.vocab_size:
        raise ArtifactError(f"cannot crop {config.vocab_size} embedding rows to {vocab_size}")
    if vocab_size == config.vocab_size:
        return state, config
    rows = {"wte.weight", "transformer.wte.weight", "lm_head.weight"}
    cropped = {
        name: tensor[:vocab_size].contiguous() if name in rows else tensor
        for name, tensor in state.items()
    }
    return cropped, replace(config, vocab_size=vocab_size)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_artifact(
    model: GPT | LSTMLM,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write the model and tokenizer as a GPT-2 folder at out_dir (replacing it atomically)."""
    cfg = model.config
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ArtifactError(
            f"tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}"
        )
    state, cfg = crop_vocab(to_hf_state_dict(model), cfg, tokenizer.vocab_size)
    info = {**(info or {}), "model_vocab_rows": model.config.vocab_size}
    out = Path(out_dir)
    with atomic_folder(out) as tmp:
        save_file(state, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        eot = tokenizer.eot_id
        _write_json(
            tmp / CONFIG_FILE,
            {
                **cfg.to_hf_dict(),
                "bos_token_id": eot,
                "eos_token_id": eot,
                "torch_dtype": "float32",
            },
        )
        tokenizer.save(tmp / TOKENIZER_FILE)
        _write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "GPT2TokenizerFast",
                "bos_token": EOT_TOKEN,
                "eos_token": EOT_TOKEN,
                "unk_token": EOT_TOKEN,
                "add_prefix_space": False,
                "model_max_length": cfg.block_size,
                "clean_up_tokenization_spaces": False,
            },
        )
        _write_json(
            tmp / "special_tokens_map.json",
            {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN},
        )
        _write_json(tmp / "generation_config.json", {"bos_token_id": eot, "eos_token_id": eot})
        _write_json(tmp / INFO_FILE, {"format": "attnlm-gpt2", "version": 1, **info})
    return out


def _read_folder(folder: Path) -> tuple[GPTConfig, Tokenizer]:
    """The config.json (as written: not cropped) and tokenizer of a model folder, checked."""
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder not found: {folder}")
    for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE):
        if not (folder / name).is_file():
            raise ArtifactError(f"artifact {folder} has no {name}")
    try:
        hf_config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        config = GPTConfig.from_hf_dict(hf_config)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{folder / CONFIG_FILE} is not valid JSON: {err}") from err
    except (ConfigError, TypeError) as err:
        raise ArtifactError(f"{folder / CONFIG_FILE}: {err}") from err
    try:
        tokenizer = Tokenizer.from_file(folder / TOKENIZER_FILE)
    except TokenizerError as err:
        raise ArtifactError(str(err)) from err
    if tokenizer.vocab_size > config.vocab_size:
        raise ArtifactError(
            f"artifact {folder}: tokenizer has {tokenizer.vocab_size} tokens but config.json "
            f"vocab_size is {config.vocab_size}"
        )
    return config, tokenizer


def read_model_folder(path: str | os.PathLike) -> tuple[GPTConfig, Path, int]:
    """(the model's config, its tokenizer.json, the tokenizer's vocabulary size) of a model
    folder, without reading the weights; the config's vocab_size is the tokenizer's, as
    `load_artifact` crops it. Raises ArtifactError as `load_artifact` does."""
    folder = Path(path)
    config, tokenizer = _read_folder(folder)
    return (
        replace(config, vocab_size=tokenizer.vocab_size),
        folder / TOKENIZER_FILE,
        tokenizer.vocab_size,
    )


def load_artifact(
    path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Artifact:
    """Load a GPT-2 folder written by `save_artifact` (or any GPT-2 folder of this shape) with
    safetensors only. Raises ArtifactError with a clear message on anything amiss."""
    folder = Path(path)
    config, tokenizer = _read_folder(folder)
    try:
        hf_state = load_file(folder / WEIGHTS_FILE)
    except (SafetensorError, OSError, ValueError) as err:
        raise ArtifactError(
            f"{folder / WEIGHTS_FILE} is not a readable safetensors file: {err}"
        ) from err
    state = from_hf_state_dict(hf_state, config)
    state, config = crop_vocab(state, config, tokenizer.vocab_size)  # a padded folder: cropped
    model = build_model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(
            f"{folder / WEIGHTS_FILE} does not match config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ArtifactError(
                f"{folder / WEIGHTS_FILE}: {name} has shape {tuple(tensor.shape)}, config.json "
                f"implies {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype).eval()
    info = {}
    if (folder / INFO_FILE).is_file():
        try:
            info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{folder / INFO_FILE} is not valid JSON: {err}") from err
    return Artifact(model=model, tokenizer=tokenizer, config=config, path=folder, info=info)
