"""`AttnLMCLI`: LightningCLI wired for this project, and the errors that are the user's to fix.

`run_lightning(args)` runs one LightningCLI command line (`fit ...` or `validate ...`) with the
project's LightningModule and DataModule; `training.cli` (the `attnlm` command) calls it for
`attnlm fit` / `attnlm validate`, and `training.ray_launcher` inside each Ray Train worker.
`USER_ERRORS` are the exceptions that end a command with one line instead of a traceback.
"""

from __future__ import annotations

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
    """Run a LightningCLI command line ("fit ..." or "validate ...") as `cli_class`."""
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
