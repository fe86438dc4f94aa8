"""Ray Train as a launcher for `attnlm fit`: the same LightningModule, DataModule and config, with
the training processes started by `ray.train.torch.TorchTrainer` on the workers of a Ray cluster.

    attnlm fit --launcher ray --ray.num_workers 2 --ray.use_gpu false --config configs/tiny.yaml
    attnlm fit --launcher ray --ray.num_workers 16 --ray.use_gpu true --config configs/small.yaml

`--launcher` (lightning, the default: Lightning's own launcher, or torchrun/SLURM when they started
the process; or ray) and the `--ray.*` options are taken off the command line; the rest is the
usual LightningCLI command line, which each Ray worker runs as `AttnLMCLI` with Lightning's Ray
integration (RayDDPStrategy, RayLightningEnvironment, RayTrainReportCallback, prepare_trainer):
one process per worker, DDP over gloo (CPU) or NCCL (GPU). The project's checkpoints stay where
they are (`<default_root_dir>/checkpoints/{last,best}.ckpt`, written by rank 0, atomically). A
checkpoint is also reported to Ray Train at the end of every training epoch (and when max_steps
ends the run); Ray Train keeps the latest, under
`<default_root_dir>/ray/<run name>/checkpoint_<time>/checkpoint.ckpt`, and its path is printed.

Options:
    --ray.num_workers N   training processes (Ray Train workers), one CPU (and one GPU) each
    --ray.use_gpu BOOL    true: each worker takes a GPU and trains on it (NCCL); default false

Ray joins the cluster in RAY_ADDRESS, else one that `ray start` started on this machine, else it
starts a local instance. The workers change into the directory the command was started in, so
relative paths (--config, data.cache_dir, default_root_dir) mean the same on every worker: on a
multi-node cluster, start it from a directory that every node sees (a shared filesystem).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnlm.config import ConfigError
from training.lightning_cli import USER_ERRORS, AttnLMCLI, run_lightning

LAUNCHERS = ("lightning", "ray")
TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


@dataclass
class RayOptions:
    """The `--ray.*` options.

    Args:
        num_workers: Ray Train workers, i.e. training processes (DDP ranks).
        use_gpu: give each worker one GPU and train on it.
    """

    num_workers: int = 1
    use_gpu: bool = False


def split_launcher_args(args: list[str]) -> tuple[str, RayOptions, list[str]]:
    """Take `--launcher NAME` and `--ray.KEY VALUE` (or `--flag=value`) off a command line.

    Returns:
        The launcher name, the Ray options, and the remaining (LightningCLI) arguments.
    Raises:
        ConfigError: an unknown launcher or option, a missing or bad value.
    """
    launcher, raw, rest = "lightning", {}, []
    i = 0
    while i < len(args):
        arg = args[i]
        name, has_value, value = arg.partition("=")
        if name == "--launcher" or name.startswith("--ray."):
            if not has_value:
                if i + 1 >= len(args) or args[i + 1].startswith("--"):
                    raise ConfigError(f"{name} needs a value")
                value = args[i + 1]
                i += 1
            if name == "--launcher":
                launcher = value
            else:
                raw[name.removeprefix("--ray.")] = value
        else:
            rest.append(arg)
        i += 1
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}")
    if raw and launcher != "ray":
        raise ConfigError(f"--ray.{next(iter(raw))} needs --launcher ray")
    if launcher == "ray" and rest[:1] != ["fit"]:
        raise ConfigError("--launcher ray runs `attnlm fit` only")
    return launcher, _ray_options(raw), rest


def _ray_options(raw: dict[str, str]) -> RayOptions:
    unknown = set(raw) - {"num_workers", "use_gpu"}
    if unknown:
        names = ", ".join(f"--ray.{k}" for k in sorted(unknown))
        raise ConfigError(f"unknown option(s) {names}; known: --ray.num_workers, --ray.use_gpu")
    options = RayOptions()
    if "num_workers" in raw:
        value = raw["num_workers"]
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"--ray.num_workers must be a positive integer, got {value!r}")
        options.num_workers = int(value)
    if "use_gpu" in raw:
        value = raw["use_gpu"].lower()
        if value not in TRUE + FALSE:
            raise ConfigError(f"--ray.use_gpu must be true or false, got {raw['use_gpu']!r}")
        options.use_gpu = value in TRUE
    return options


class RayAttnLMCLI(AttnLMCLI):
    """AttnLMCLI inside a Ray Train worker: the trainer gets Ray's DDP strategy and cluster
    environment, reports a checkpoint to Ray Train at the end of every training epoch, and uses
    the worker's device (one per worker)."""

    def __init__(self, *args: Any, use_gpu: bool = False, **kwargs: Any) -> None:
        self.use_gpu = use_gpu
        super().__init__(*args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any):
        from ray.train.lightning import (
            RayDDPStrategy,
            RayLightningEnvironment,
            RayTrainReportCallback,
            prepare_trainer,
        )

        given = self.config_init[self.subcommand]["trainer"].get("callbacks") or []
        callbacks = list(given) if isinstance(given, list) else [given]
        kwargs.update(
            strategy=RayDDPStrategy(),
            plugins=[RayLightningEnvironment()],
            accelerator="gpu" if self.use_gpu else "cpu",
            devices="auto",  # one device per worker: Ray assigns it
            callbacks=[*callbacks, RayTrainReportCallback()],
        )
        return prepare_trainer(super().instantiate_trainer(**kwargs))


def train_worker(config: dict[str, Any]) -> None:
    """The `train_loop_per_worker` of the TorchTrainer: run the fit command line in this worker."""
    os.chdir(config["cwd"])
    run_lightning(config["args"], cli_class=RayAttnLMCLI, use_gpu=config["use_gpu"])


class _Checked(Exception):
    """Raised by `_CheckOnly` once the command line has parsed and the classes have been built."""

    def __init__(self, root: Path) -> None:
        self.root = root


class _CheckOnly(AttnLMCLI):
    """Parse the command line and build the model and data module (their arguments are validated
    there), but neither the trainer nor a run: config errors end the command before Ray starts."""

    def instantiate_classes(self) -> None:
        self.parser.instantiate_classes(self.config)
        raise _Checked(Path(self.config[self.subcommand]["trainer"]["default_root_dir"]))


def fit_on_ray(args: list[str], options: RayOptions) -> Path:
    """Run `attnlm fit` (args: the LightningCLI command line, "fit" first) on Ray Train workers.

    Returns:
        The path of the Lightning checkpoint that Ray Train kept (the last one reported).
    """
    try:
        run_lightning(args, cli_class=_CheckOnly)
    except _Checked as checked:
        root = checked.root.resolve()
    else:  # pragma: no cover - _CheckOnly always raises unless the parser exited
        raise RuntimeError("the command line was not checked")

    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"args": args, "cwd": os.getcwd(), "use_gpu": options.use_gpu},
        scaling_config=ray.train.ScalingConfig(
            num_workers=options.num_workers, use_gpu=options.use_gpu
        ),
        run_config=ray.train.RunConfig(
            storage_path=str(root / "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        user_error = _user_error(err)
        if user_error is None:
            raise
        raise user_error from None
    if result.checkpoint is None:
        raise RuntimeError(f"the Ray Train run in {result.path} reported no checkpoint")
    checkpoint = Path(result.checkpoint.path) / "checkpoint.ckpt"
    print(f"attnlm fit: Ray Train reported checkpoint: {checkpoint}", flush=True)
    print(
        f"attnlm fit: export it with: attnlm export --checkpoint {checkpoint} --out ARTIFACT_DIR",
        flush=True,
    )
    return checkpoint


def _user_error(err: Exception) -> Exception | None:
    """A worker's configuration or data error (one of the CLI's USER_ERRORS), so that it ends the
    command with one line as it does without Ray; None for anything else."""
    for failure in getattr(err, "worker_failures", {}).values():  # rank -> the worker's exception
        if isinstance(failure, USER_ERRORS):
            return failure
    return None
