"""`attnlm export`: turn a Lightning checkpoint into the serving artifact (a GPT-2 folder).

    attnlm export --checkpoint runs/tiny/checkpoints/best.ckpt --out artifacts/tiny

The checkpoint is read with `torch.load(weights_only=True)` (`training.checkpoint_file`: a file
that is not a checkpoint is named for what it is); the tokenizer travels inside it
(the data module's state), so the artifact needs nothing but the checkpoint file.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

import tokenizers

from attnlm.artifact import ArtifactError, save_artifact
from attnlm.config import GPTConfig
from attnlm.lstm import LSTMLM
from attnlm.model import GPT
from attnlm.networks import build_model
from attnlm.tokenizer import Tokenizer
from training.checkpoint_file import read_checkpoint

DATAMODULE_STATE_KEY = (
    "TextDataModule"  # Lightning stores datamodule.state_dict() under its class name
)


def model_from_checkpoint(checkpoint: dict[str, Any]) -> GPT | LSTMLM:
    """Rebuild the GPT from a LanguageModel checkpoint's hyperparameters and state dict."""
    try:
        hparams = checkpoint["hyper_parameters"]
        raw_state = checkpoint["state_dict"]
    except KeyError as err:
        raise ArtifactError(
            f"checkpoint has no {err.args[0]!r}: not written by `attnlm fit`"
        ) from err
    names = {f.name for f in fields(GPTConfig)}
    config = GPTConfig(**{k: v for k, v in hparams.items() if k in names})
    state = {k.removeprefix("model."): v for k, v in raw_state.items() if k.startswith("model.")}
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ArtifactError(f"checkpoint weights do not match its hyperparameters: {err}") from err
    return model.eval()


def tokenizer_from_checkpoint(checkpoint: dict[str, Any]) -> Tokenizer:
    state = checkpoint.get(DATAMODULE_STATE_KEY) or {}
    if "tokenizer_json" not in state:
        raise ArtifactError("checkpoint holds no tokenizer (data module state missing)")
    return Tokenizer(tokenizers.Tokenizer.from_str(state["tokenizer_json"]))


def export_checkpoint(checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    checkpoint = read_checkpoint(checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    tokenizer = tokenizer_from_checkpoint(checkpoint)
    info: dict[str, Any] = {
        "source_checkpoint": str(Path(checkpoint_path).resolve()),
        "global_step": checkpoint.get("global_step"),
        "epoch": checkpoint.get("epoch"),
    }
    for key, value in checkpoint.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and value.get("best_model_score") is not None:
            info["best_val_loss"] = float(value["best_model_score"])
    data_state = checkpoint.get(DATAMODULE_STATE_KEY) or {}
    info["data"] = {k: v for k, v in data_state.items() if k != "tokenizer_json"}
    return save_artifact(model, tokenizer, out_dir, info=info)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="attnlm export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a .ckpt written by `attnlm fit`")
    parser.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    args = parser.parse_args(argv)
    out = export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} -> {out}")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<26} {path.stat().st_size:>12,d} bytes")
    return 0
