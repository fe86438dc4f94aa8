"""The LightningModule that trains attnlm's GPT for next-token prediction.

Its typed `__init__` arguments are the `model:` section of a LightningCLI config
(`configs/tiny.yaml`); `vocab_size` is linked from the data module's tokenizer by the CLI.

    attnlm fit --config configs/tiny.yaml --model.n_layer 6 --model.learning_rate 3e-4
"""

from __future__ import annotations

import math

import lightning as L
import torch

from attnlm.artifact import load_artifact
from attnlm.config import ConfigError, GPTConfig
from attnlm.networks import build_model

# the model's shape: what `init_from` takes from its folder (block_size may be shorter)
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "bias", "arch", "attention")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or inf; training stops and the last good checkpoint stays."""


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        vocab_size: int = 512,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        learning_rate: float = 1e-3,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 100,
        lr_decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        compile: bool = False,
        arch: str = "transformer",
        attention: str = "dot_product",
        init_from: str | None = None,
    ) -> None:
        """
        Args:
            vocab_size: token embedding rows; linked from `data.vocab_size` by the CLI.
            block_size: context length (learned positions). Under `attnlm fit` it is one setting
                with `data.block_size`: give either, the other follows.
            n_layer: Transformer blocks.
            n_head: attention heads per block.
            n_embd: residual width (divisible by n_head).
            dropout: dropout probability (0 for small data).
            bias: biases in Linear layers, as GPT-2.
            learning_rate: peak AdamW learning rate, reached after warmup.
            min_lr_ratio: the cosine decay ends at learning_rate * min_lr_ratio.
            warmup_steps: optimizer steps of linear warmup from 0.
            lr_decay_steps: step at which the cosine reaches its minimum; None = the run's total
                (trainer.max_steps, or the epochs' steps). Fix it when a run will be resumed with a
                longer max_steps, so the schedule does not change under it.
            weight_decay: AdamW decoupled weight decay on matrices only (not biases, LayerNorm).
            betas: AdamW betas.
            compile: run the training/validation forward through `torch.compile`.
            arch: "transformer" (GPT-2) or "lstm" (n_layer LSTM layers of width n_embd, for
                comparison; n_head is unused).
            attention: "dot_product" (default, SDPA kernels) or "additive" (Bahdanau scoring,
                explicit path, slower; for comparison).
            init_from: a model folder to start from (nanoGPT's `init_from`): a GPT-2-family
                folder (transformers' `save_pretrained` plus a tokenizer.json: gpt2, distilgpt2,
                a fine-tune) or an `attnlm export`. Its weights are loaded; the shape must be the
                folder's (`attnlm fit` takes it, and the tokenizer, from the folder); a shorter
                block_size keeps the first positions (as nanoGPT's crop_block_size).
        """
        super().__init__()
        errors = []
        if not learning_rate > 0:
            errors.append(f"model.learning_rate must be > 0, got {learning_rate}")
        if not 0 <= min_lr_ratio <= 1:
            errors.append(f"model.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if warmup_steps < 0:
            errors.append(f"model.warmup_steps must be >= 0, got {warmup_steps}")
        if lr_decay_steps is not None and lr_decay_steps < 1:
            errors.append(f"model.lr_decay_steps must be >= 1, got {lr_decay_steps}")
        if weight_decay < 0:
            errors.append(f"model.weight_decay must be >= 0, got {weight_decay}")
        if errors:
            raise ValueError("; ".join(errors))
        self.save_hyperparameters()
        self.config = GPTConfig(
            vocab_size=vocab_size,
            block_size=block_size,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            dropout=dropout,
            bias=bias,
            arch=arch,
            attention=attention,
        )
        self.model = build_model(self.config)
        if init_from is not None:
            self.model.load_state_dict(initial_weights(init_from, self.config))
        # kept outside the module tree so that state_dict keys stay the plain GPT ones
        object.__setattr__(self, "_forward", torch.compile(self.model) if compile else self.model)
        self._first_bad_step: torch.Tensor | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx).logits

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, y = batch  # (B, T), (B, T)
        loss = self._forward(x, y).loss
        self._track_non_finite(loss)
        # self.log costs ~0.5 ms a call on the CPU: call it only on steps whose values are written
        if self.trainer._logger_connector.should_update_logs:
            self._raise_if_non_finite()
            self.log("train_loss", loss, prog_bar=True)
            self.log("lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def _track_non_finite(self, loss: torch.Tensor) -> None:
        """Remember the first step whose loss is NaN/inf, on the device (no host sync per step)."""
        if self._first_bad_step is None:
            self._first_bad_step = torch.full((), -1, dtype=torch.long, device=loss.device)
        bad = ~torch.isfinite(loss.detach()) & (self._first_bad_step < 0)
        self._first_bad_step = torch.where(bad, self.global_step, self._first_bad_step)

    def _raise_if_non_finite(self) -> None:
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            raise NonFiniteLossError(
                f"training loss became NaN/inf at step {int(self._first_bad_step)}; stopped, "
                "the checkpoints written before that step are kept"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._raise_if_non_finite()  # never write weights trained through a NaN/inf loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        loss = self._forward(x, y).loss
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=x.size(0))

    def on_validation_epoch_end(self) -> None:
        metrics = self.trainer.callback_metrics
        if "val_loss" not in metrics:
            return
        val_loss = metrics["val_loss"].float()
        self.log("val_ppl", torch.exp(val_loss), sync_dist=True)  # val_loss is already reduced
        chars_per_token = getattr(self.trainer.datamodule, "val_chars_per_token", None)
        if chars_per_token:
            self.log(
                "val_bpc", val_loss / chars_per_token / math.log(2), prog_bar=True, sync_dist=True
            )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if not gradient_clip_val or not optimizer.defaults.get("fused"):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        # a fused optimizer under bf16-mixed (never 16-mixed: configure_optimizers): no loss
        # scale, so the gradients are clipped as they are, as Lightning would without fusing
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_optimizers(self):
        hp = self.hparams
        # A fused AdamW is one kernel for all parameters. It unscales fp16 gradients inside its
        # step, so 16-mixed cannot clip them before (Lightning refuses); bf16-mixed has no loss
        # scale, and `configure_gradient_clipping` clips its gradients as they are.
        fp16 = str(self.trainer.precision).startswith("16")
        fused = self.device.type in ("cuda", "cpu") and not (
            fp16 and self.trainer.gradient_clip_val
        )
        optimizer = torch.optim.AdamW(
            self.model.optimizer_groups(hp.weight_decay),
            lr=hp.learning_rate,
            betas=tuple(hp.betas),
            fused=fused,
        )
        total = hp.lr_decay_steps or max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(step, hp.warmup_steps, total, hp.min_lr_ratio)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def initial_weights(folder: str, config: GPTConfig) -> dict[str, torch.Tensor]:
    """The state dict of the model in `folder`, for a model of `config`'s shape.

    Raises:
        ArtifactError: the folder is not a model folder attnlm reads.
        ConfigError: `config` is not the folder's shape (or has a longer context).
    """
    artifact = load_artifact(folder)
    theirs = artifact.config
    wrong = [
        f"{name} {getattr(config, name)!r} (the folder's: {getattr(theirs, name)!r})"
        for name in (*SHAPE_FIELDS, "vocab_size")
        if getattr(config, name) != getattr(theirs, name)
    ]
    if config.block_size > theirs.block_size:
        wrong.append(f"block_size {config.block_size} (the folder's model has {theirs.block_size})")
    if theirs.layer_norm_epsilon != config.layer_norm_epsilon:
        wrong.append(f"layer_norm_epsilon {theirs.layer_norm_epsilon} (attnlm trains with 1e-5)")
    if wrong:
        raise ConfigError(
            f"model.init_from {folder}: the model does not fit it: {'; '.join(wrong)}"
        )
    state = artifact.model.state_dict()
    positions = "transformer.wpe.weight"  # learned positions: the Transformer's, not the LSTM's
    if config.block_size < theirs.block_size and positions in state:
        state[positions] = state[positions][
            : config.block_size
        ].clone()  # nanoGPT's crop_block_size
    return state


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate: linear warmup to 1, then cosine down to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + 0.5 * (1 - min_ratio) * (1 + math.cos(math.pi * progress))
