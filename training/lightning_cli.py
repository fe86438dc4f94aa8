"""`AttnLMCLI`: LightningCLI wired for this project, and the errors that are the user's to fix.

`run_lightning(args)` runs one LightningCLI command line (`fit ...` or `validate ...`) with the
project's LightningModule and DataModule; `training.cli` (the `attnlm` command) calls it for
`attnlm fit` / `attnlm validate`, and `training.ray_launcher` inside each Ray Train worker.

The context length is one setting: `model.block_size` or `data.block_size`, whichever is given,
sets both (`resolve_block_size`); two different values are a config error.

Mistakes end the command with one line, never a traceback (ATTNLM_DEBUG=1 shows it):
`USER_ERRORS` are the exceptions that `attnlm` reports as `attnlm fit: error: ...` with exit
code 1 (the project's own checks, Lightning's MisconfigurationException, a checkpoint or config
file that is not one); the argument parser's own errors (an unknown key, a value of the wrong
type, a missing config file) are one such line too, with exit code 2 (`AttnLMParser.error`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from attnlm.artifact import ArtifactError, read_model_folder
from attnlm.config import ConfigError
from attnlm.tokenizer import Tokenizer, TokenizerError
from training.callbacks import (
    AtomicCheckpointIO,
    GlobalBatch,
    LossCurvePlot,
    SpeedMonitor,
    TrainProgressBar,
)
from training.checkpoint_file import check_lightning_checkpoint
from training.data import TextDataModule
from training.module import SHAPE_FIELDS, LanguageModel, NonFiniteLossError

DEFAULT_ROOT = "runs/default"
# the context length when neither model.block_size nor data.block_size is given: the model's default
DEFAULT_BLOCK_SIZE = inspect.signature(LanguageModel.__init__).parameters["block_size"].default
# what the model and data take when the config leaves them out (and no init_from folder decides)
_MODEL_DEFAULTS = {
    name: inspect.signature(LanguageModel.__init__).parameters[name].default
    for name in SHAPE_FIELDS
}
DEFAULT_VOCAB_SIZE = inspect.signature(TextDataModule.__init__).parameters["vocab_size"].default
# --ckpt_path values that Lightning resolves itself (not files to check)
CKPT_PATH_NAMES = ("last", "best", "hpc", "registry")


def resolve_block_size(config: Namespace) -> None:
    """Set `model.block_size` and `data.block_size` (None: not given) to the one given.

    Raises:
        ConfigError: both are given, with different values.
    """
    model, data = config["model"], config["data"]
    model_block, data_block = model["block_size"], data["block_size"]
    if model_block is not None and data_block is not None and model_block != data_block:
        relation = "exceeds" if data_block > model_block else "differs from"
        raise ConfigError(
            f"data.block_size ({data_block}) {relation} the model's context model.block_size "
            f"({model_block}); the context length is one setting: give model.block_size alone "
            "(data.block_size follows it)"
        )
    given = model_block if model_block is not None else data_block
    model["block_size"] = data["block_size"] = DEFAULT_BLOCK_SIZE if given is None else given


def resolve_model_shape(config: Namespace) -> None:
    """Fill the model's shape and the vocabulary (None: not given) from `model.init_from`'s folder,
    or with the defaults when there is none. Runs before `resolve_block_size`.

    With a folder, the shape (n_layer, n_head, n_embd, bias, arch, attention), the context
    (block_size: the folder's, or a shorter one given) and the tokenizer (data.tokenizer_path,
    data.vocab_size) are the folder's.

    Raises:
        ConfigError: a value given contradicts the folder (every one named, in one message), or
            the folder is not a model folder attnlm reads.
    """
    model, data = config["model"], config["data"]
    folder = model.get("init_from")
    if folder is None:
        for name, default in _MODEL_DEFAULTS.items():
            if model[name] is None:
                model[name] = default
        if data["vocab_size"] is None:
            data["vocab_size"] = DEFAULT_VOCAB_SIZE
        return
    try:
        theirs, tokenizer_file, vocab_size = read_model_folder(folder)
    except ArtifactError as err:
        raise ConfigError(f"model.init_from: {err}") from err
    wrong = []
    for name in SHAPE_FIELDS:
        given, value = model[name], getattr(theirs, name)
        if given is not None and given != value:
            wrong.append(f"model.{name}={given!r} (the folder's: {value!r})")
        model[name] = value
    given = model["block_size"] if model["block_size"] is not None else data["block_size"]
    if given is None:
        model["block_size"] = theirs.block_size
    elif given > theirs.block_size:
        wrong.append(f"block_size={given} (longer than the folder's context {theirs.block_size})")
    if data["tokenizer_path"] is not None and Path(data["tokenizer_path"]).resolve() != (
        tokenizer_file.resolve()
    ):
        wrong.append(
            f"data.tokenizer_path={data['tokenizer_path']} (the data is tokenized with the "
            f"folder's {tokenizer_file})"
        )
    if data["vocab_size"] is not None and data["vocab_size"] != vocab_size:
        wrong.append(f"data.vocab_size={data['vocab_size']} (the folder's tokenizer: {vocab_size})")
    if wrong:
        raise ConfigError(
            f"model.init_from {folder}: the shape and tokenizer come from the folder, but the "
            f"config gives {', '.join(wrong)}; leave them out or give the folder's values"
        )
    data["tokenizer_path"] = str(tokenizer_file)
    data["vocab_size"] = vocab_size


def one_line(message: str) -> str:
    """The argument parser's (jsonargparse's) error message on one line, types named plainly.

    `Parser key "model.n_layer":` and `  Expected a <class 'int'>. Got value: two` (two lines)
    become `model.n_layer: expected int. Got value: two`.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    given = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")]
    expected = [line[len("- Expected a ") :] for line in lines if line.startswith("- Expected a ")]
    if given and expected:  # a value that matches none of a Union's types
        lines = lines[:1] + [f"got {given[0]}; expected {' or '.join(expected)}"]
    text = " ".join(line for line in lines if not line.startswith("Given value type:"))
    text = re.sub(r"<class '(?:[\w.]+\.)?(\w+)'>", r"\1", text).replace("NoneType", "null")
    text = re.sub(r"typing\.Literal\[(.*?)\]", r"one of [\1]", text).replace(
        "Expected a ", "expected "
    )
    return re.sub(r'^Parser key "([^"]+)":\s*', r"\1: ", text)


class AttnLMParser(LightningArgumentParser):
    """LightningCLI's parser, with an error as one line (not the usage of every option) and a
    printed or saved config that shows the context length resolved (`resolve_block_size`)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("ATTNLM_DEBUG"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(
            f"{prog}: error: {one_line(message)} (`{prog} --help` lists the options)\n"
        )
        self.exit(2)

    def dump(self, cfg: Namespace, *args: Any, **kwargs: Any) -> str:
        if isinstance(cfg, Namespace) and "model" in cfg and "data" in cfg:
            cfg = cfg.clone()
            try:
                resolve_model_shape(cfg)
                resolve_block_size(cfg)
            except (ConfigError, ArtifactError):
                pass  # printed as given; running this config reports the conflict
        return super().dump(cfg, *args, **kwargs)


def check_config_files(args: list[str]) -> None:
    """Raise ConfigError naming the file, line and column for a `--config` file that is not YAML
    (the parser's own message names neither the file nor a useful place)."""
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            name = args[i + 1]
        elif arg.startswith("--config="):
            name = arg.split("=", 1)[1]
        else:
            continue
        path = Path(name)
        if not path.is_file():
            continue  # the parser says "File does not exist"
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {name} is not UTF-8 text: {err.reason}") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigError(f"config file {name} is not valid YAML: {problem}{where}") from err


class AttnLMCLI(LightningCLI):
    """LightningCLI with the project's wiring: vocab size linked from the tokenizer, one context
    length, last/best checkpoints in <default_root_dir>/checkpoints, CSV + TensorBoard logs,
    throughput/MFU and the loss-curve plot, atomic checkpoint writes; config files and
    `--ckpt_path` checked before Lightning reads them, parser errors on one line."""

    def __init__(self, *args: Any, parser_class: type = AttnLMParser, **kwargs: Any) -> None:
        super().__init__(*args, parser_class=parser_class, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        # None: not given; before_instantiate_classes sets both to the one given
        parser.set_defaults({"model.block_size": None, "data.block_size": None})
        # None: not given; the init_from folder or the defaults fill them (resolve_model_shape)
        parser.set_defaults({f"model.{name}": None for name in SHAPE_FIELDS})
        parser.set_defaults({"data.vocab_size": None})
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
        parser.add_lightning_class_args(GlobalBatch, "global_batch")
        parser.add_lightning_class_args(LossCurvePlot, "loss_plot")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, list):
            check_config_files(args)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and ckpt_path not in CKPT_PATH_NAMES:
            # before LightningCLI reads its hyperparameters with a bare torch.load
            check_lightning_checkpoint(ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        resolve_model_shape(config)
        resolve_block_size(config)
        data = config["data"]
        if data["tokenizer_path"] is not None:
            # The given tokenizer decides the vocabulary (TextDataModule.vocab_size, linked to the
            # model's): the config says so too, since hyperparameters of the model and the data
            # that disagree stop Lightning. A bad file is reported by the data module.
            with contextlib.suppress(TokenizerError):
                data["vocab_size"] = Tokenizer.from_file(data["tokenizer_path"]).vocab_size
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
                kwargs["callbacks"] = [*callbacks, TrainProgressBar()]
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
            parser_kwargs={"parser_mode": "yaml", "prog": "attnlm"},
            auto_configure_optimizers=False,
            **cli_kwargs,
        )


def error_line(err: BaseException) -> str:
    """A user error as `attnlm` prints it: Lightning's message on one line (some break lines),
    the project's as they are (several problems in one config: one line each)."""
    if isinstance(err, MisconfigurationException):
        return " ".join(str(err).split())
    return str(err)


USER_ERRORS = (
    ConfigError,
    TokenizerError,
    ArtifactError,
    NonFiniteLossError,
    MisconfigurationException,  # Lightning's: a Trainer setting it cannot run with
    ValueError,
    FileNotFoundError,
)
