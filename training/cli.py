"""The `attnlm` command line: train with LightningCLI, export the serving artifact, generate text.

    attnlm fit --config configs/tiny.yaml                      # train (full config saved with the run)
    attnlm fit --config configs/tiny.yaml --ckpt_path last     # resume where the run stopped
    attnlm fit --launcher ray --ray.num_workers 2 --config configs/tiny.yaml  # on Ray Train workers
    attnlm validate --config configs/tiny.yaml --ckpt_path runs/tiny/checkpoints/best.ckpt
    attnlm export --checkpoint runs/tiny/checkpoints/best.ckpt --out artifacts/tiny
    attnlm generate --artifact artifacts/tiny --prompt "The cat that" --temperature 0.8
    attnlm probe artifacts/tiny artifacts/tiny-lstm --plot runs/probe.png

Configuration errors (an unknown key, a non-positive size, n_embd not divisible by n_head, a
missing data file, ...) end the command before any training with one line naming the field.
Set ATTNLM_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from attnlm.artifact import ArtifactError
from attnlm.config import ConfigError
from attnlm.tokenizer import TokenizerError
from training.callbacks import AtomicCheckpointIO, LossCurvePlot, SpeedMonitor
from training.data import TextDataModule
from training.module import LanguageModel, NonFiniteLossError

DEFAULT_ROOT = "runs/default"
USAGE = """usage: attnlm {fit,validate,export,generate,probe} ...

  fit        train a model (LightningCLI: attnlm fit --config configs/tiny.yaml);
             on Ray Train workers: attnlm fit --launcher ray --ray.num_workers N [--ray.use_gpu true] ...
  validate   evaluate a checkpoint on the validation split
  export     write a checkpoint as a Hugging Face GPT-2 folder (safetensors, config.json, tokenizer.json)
  generate   sample text from an exported artifact
  probe      long-range agreement accuracy and attention-to-subject of exported models

Run `attnlm COMMAND --help` for the options of each.
"""


class AttnLMCLI(LightningCLI):
    """LightningCLI with the project's wiring: vocab size linked from the tokenizer, last/best
    checkpoints in <default_root_dir>/checkpoints, CSV + TensorBoard logs, throughput/MFU and
    the loss-curve plot, atomic checkpoint writes."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.monitor": "val_loss",
                "checkpoint.mode": "min",
                "checkpoint.filename": "best",
                "checkpoint.save_top_k": 1,
                "checkpoint.save_last": True,
                "checkpoint.auto_insert_metric_name": False,
            }
        )
        parser.add_lightning_class_args(SpeedMonitor, "speed")
        parser.add_lightning_class_args(LossCurvePlot, "loss_plot")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        data_block, model_block = config["data"]["block_size"], config["model"]["block_size"]
        if data_block > model_block:
            raise ConfigError(
                f"data.block_size ({data_block}) exceeds the model's context model.block_size ({model_block})"
            )
        if config["trainer"]["default_root_dir"] is None:
            config["trainer"]["default_root_dir"] = DEFAULT_ROOT

    def instantiate_trainer(self, **kwargs):
        trainer_config = self.config_init[self.subcommand]["trainer"]
        root = Path(trainer_config["default_root_dir"])
        if trainer_config.get("logger") in (None, True):
            csv = CSVLogger(root, name="logs")
            # one version number for both, so that a run's files share logs/version_N
            kwargs["logger"] = [csv, TensorBoardLogger(root, name="logs", version=csv.version)]
        if trainer_config.get("enable_progress_bar") is not False:
            given = kwargs.get("callbacks", trainer_config.get("callbacks")) or []
            callbacks = list(given) if isinstance(given, list) else [given]
            if not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [*callbacks, RichProgressBar()]
        trainer = super().instantiate_trainer(**kwargs)
        for callback in trainer.checkpoint_callbacks:
            if callback.dirpath is None:  # a fixed place, so that --ckpt_path last finds it
                callback.dirpath = str(root / "checkpoints")
        if type(trainer.strategy.checkpoint_io) is not AtomicCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer


def run_lightning(
    args: list[str], cli_class: type[AttnLMCLI] = AttnLMCLI, **cli_kwargs: Any
) -> AttnLMCLI:
    with warnings.catch_warnings():
        # The command line is passed as `args` while sys.argv still holds it (Lightning's DDP
        # launcher re-runs sys.argv in its child processes): LightningCLI's warning about having
        # both is expected here, not a mistake.
        warnings.filterwarnings("ignore", "LightningCLI's args parameter", UserWarning)
        return cli_class(
            LanguageModel,
            TextDataModule,
            args=args,
            subclass_mode_model=False,
            subclass_mode_data=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"parser_mode": "yaml"},
            auto_configure_optimizers=False,
            **cli_kwargs,
        )


USER_ERRORS = (
    ConfigError,
    TokenizerError,
    ArtifactError,
    NonFiniteLossError,
    ValueError,
    FileNotFoundError,
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    command = args[0]
    try:
        if command == "export":
            from training.export import main as export_main

            return export_main(args[1:])
        if command == "generate":
            from training.generate import main as generate_main

            return generate_main(args[1:])
        if command == "probe":
            from training.probe import main as probe_main

            return probe_main(args[1:])
        if command not in ("fit", "validate"):
            print(f"attnlm: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
            return 2
        from training.ray_launcher import fit_on_ray, split_launcher_args

        launcher, ray_options, args = split_launcher_args(args)
        if launcher == "ray":
            fit_on_ray(args, ray_options)
        else:
            run_lightning(args)
        return 0
    except USER_ERRORS as err:
        if os.environ.get("ATTNLM_DEBUG"):
            raise
        print(f"attnlm {command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
