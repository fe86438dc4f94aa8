"""Training callbacks: throughput and MFU, the global batch in tokens, the loss-curve plot, atomic
checkpoint writes, the progress bar.

`SpeedMonitor` logs `tokens_per_sec` (all ranks together) and `mfu` (model FLOPs utilisation:
achieved model FLOP/s over the device's peak). The peak comes from Lightning's table for known
GPUs; on the CPU it is measured at fit start with a large matmul in the training dtype.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from attnlm.atomic import atomic_write
from attnlm.config import ConfigError
from attnlm.networks import flops_per_token


def measure_matmul_peak(
    dtype: torch.dtype, device: torch.device, size: int = 2048, seconds: float = 0.5
) -> float:
    """Sustained FLOP/s of a square matmul on `device` in `dtype` (the ceiling for MFU on CPUs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    iterations, start = 0, time.perf_counter()
    while True:
        a @ b
        iterations += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and iterations >= 2:
            return 2 * size**3 * iterations / elapsed


def precision_dtype(precision: str | int | None) -> torch.dtype:
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


class SpeedMonitor(L.Callback):
    """Log tokens/s and MFU every `log_every_n_steps` optimizer steps.

    Args:
        peak_flops: the device's peak FLOP/s per process; None = look it up (GPU) or measure a
            matmul (CPU) at fit start.
        measure_cpu_peak: on the CPU, measure the matmul peak when peak_flops is None (else no MFU).
    """

    def __init__(self, peak_flops: float | None = None, measure_cpu_peak: bool = True) -> None:
        self.peak_flops = peak_flops
        self.measure_cpu_peak = measure_cpu_peak
        self._flops_per_token = 0.0
        self._window_start: float | None = None
        self._window_tokens = 0
        self._last_logged_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flops_per_token = flops_per_token(pl_module.config, trainer.datamodule.block_size)
        if self.peak_flops is None:
            dtype = precision_dtype(trainer.precision)
            device = pl_module.device
            if (
                device.type == "cuda"
            ):  # the spec sheet, else (a chip Lightning does not know) a matmul
                self.peak_flops = get_available_flops(device, dtype) or measure_matmul_peak(
                    dtype,
                    device,
                    size=8192,  # a GPU needs large matmuls to reach its peak
                )
            elif self.measure_cpu_peak:
                self.peak_flops = measure_matmul_peak(dtype, device)
            if self.peak_flops:
                rank_zero_info(
                    f"MFU peak: {self.peak_flops / 1e9:.0f} GFLOP/s per process ({dtype})"
                )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._window_start is None:
            self._window_start = time.perf_counter()
            self._window_tokens = 0

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        x = batch[0]
        self._window_tokens += x.numel() * trainer.world_size
        step = trainer.global_step
        # global_step counts optimizer steps: with gradient accumulation several batches share one
        if step == 0 or step == self._last_logged_step or step % max(1, trainer.log_every_n_steps):
            return
        self._last_logged_step = step
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._window_start
        tokens_per_sec = self._window_tokens / elapsed
        pl_module.log("tokens_per_sec", tokens_per_sec, prog_bar=True, rank_zero_only=True)
        if self.peak_flops:
            mfu = tokens_per_sec * self._flops_per_token / (self.peak_flops * trainer.world_size)
            pl_module.log("mfu", mfu, prog_bar=False, rank_zero_only=True)
        self._window_start = None

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._window_start = None  # validation time is not training throughput


class GlobalBatch(L.Callback):
    """Gradient accumulation set from a global batch in tokens, whatever the number of devices.

    At fit start, accumulation = round(tokens / (data.batch_size x block_size x devices));
    GPT-2 124M's 524,288 tokens (2**19) with batch 16 x 1,024 is 32 steps on one GPU, 4 on eight.
    `val_every_steps` puts validation every that many optimizer steps (Lightning's
    `val_check_interval` counts batches, so it would change with the accumulation).

    Args:
        tokens: tokens per optimizer step over all devices; None: off (trainer's own settings).
        val_every_steps: validate every this many optimizer steps; None: the trainer's setting.
    """

    def __init__(self, tokens: int | None = None, val_every_steps: int | None = None) -> None:
        for name, value in (("tokens", tokens), ("val_every_steps", val_every_steps)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"global_batch.{name}: must be an int >= 1, got {value!r}")
        self.tokens = tokens
        self.val_every_steps = val_every_steps
        self.accumulate: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or self.tokens is None:
            return
        if trainer.accumulate_grad_batches != 1:
            raise ConfigError(
                f"global_batch.tokens ({self.tokens:,}) sets the gradient accumulation; "
                f"trainer.accumulate_grad_batches ({trainer.accumulate_grad_batches}) too: "
                "give one of them"
            )
        data = trainer.datamodule
        per_step = data.settings.batch_size * data.block_size * trainer.world_size
        self.accumulate = max(1, round(self.tokens / per_step))
        trainer.accumulate_grad_batches = self.accumulate
        if self.val_every_steps is not None:
            # read by the fit loop when it sets up its data, after this hook
            trainer.val_check_interval = self.val_every_steps * self.accumulate
        rank_zero_info(
            f"global batch: {self.accumulate} x {per_step:,} tokens = "
            f"{self.accumulate * per_step:,} tokens per optimizer step "
            f"(global_batch.tokens {self.tokens:,}; {trainer.world_size} device(s))"
        )


class LossCurvePlot(L.Callback):
    """Write `loss_curve.png` (train and validation loss against step) into the run's log dir."""

    def __init__(self, filename: str = "loss_curve.png") -> None:
        self.filename = filename
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None and trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self.train.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer, pl_module) -> None:
        loss = trainer.callback_metrics.get("val_loss")
        if loss is not None and not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(loss)))

    def state_dict(self) -> dict[str, Any]:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train = [tuple(p) for p in state_dict.get("train", [])]
        self.val = [tuple(p) for p in state_dict.get("val", [])]

    def on_fit_end(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or (not self.train and not self.val):
            return
        path = Path(log_dir or trainer.default_root_dir) / self.filename
        plot_loss_curve(self.train, self.val, path)
        rank_zero_info(f"loss curve: {path}")


def plot_loss_curve(
    train: list[tuple[int, float]], val: list[tuple[int, float]], path: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train", linewidth=1.2)
    if val:
        ax.plot(*zip(*val, strict=True), label="validation", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("attnlm training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save with `atomic_write`: a temporary file beside the target, fsync, rename: a crash
    mid-write never leaves a truncated checkpoint (Lightning's own path stages in /tmp and may
    copy across file systems)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path, storage_options: Any | None = None
    ) -> None:
        with atomic_write(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(
        self, path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class TrainProgressBar(RichProgressBar):
    """Lightning's rich progress bar, labelled "Epoch 3" rather than "Epoch 3/-2" when no epoch
    limit ends the run (max_steps does; Lightning then sets max_epochs to -1)."""

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs < 1:
            # as wide as the "Validation" label, as Lightning pads it, so the bars line up
            return f"Epoch {current_epoch}".ljust(len(self.validation_description))
        return super()._get_train_description(current_epoch)
