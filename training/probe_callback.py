"""The agreement probe during training: when does the subject-finding head appear?

`ProbeOverTraining` runs `attnlm.probe` on the model being trained every `every_n_steps` optimizer
steps (and once at the end), on a fixed held-out probe set made at fit start with the run's own
tokenizer, and logs:

- `probe/accuracy`: agreement accuracy over the whole set;
- `probe/accuracy_far`: over the farthest distance bucket that has items;
- `probe/margin`: mean log P(agreeing verb) - log P(other form), nats;
- `probe/subject_attention`: for attention models, the best head's mean attention from the
  verb-predicting position to the subject (items where the subject is not the previous token),
  and `probe/best_layer`, `probe/best_head`: which head that is at this step.

The history is kept in the callback's state (so a resumed run continues it) and written at fit end
to `probe_history.json` in the run's log dir, which `scripts/probe_report.py` plots. In a config:

    trainer:
      callbacks:
        - class_path: training.probe_callback.ProbeOverTraining
          init_args: {every_n_steps: 100, per_cell: 10, hard: true}

The probe runs on global rank 0 only, in eval mode without gradients; training resumes in the mode
it was in. With `hard: true` the set is `hard_probe_set` (distances up to 200 tokens, 0-4
attractors; the distance buckets that fit the run's context), else `probe_set` (clause depth 0-5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from attnlm.atomic import atomic_write
from attnlm.probe import (
    DISTANCE_BUCKETS,
    PROBE_SEED,
    ProbeSummary,
    hard_buckets,
    hard_probe_set,
    probe_set,
    score_items,
    summarize,
)


def probe_metrics(summary: ProbeSummary) -> dict[str, float]:
    """The numbers logged for one probe run."""
    far = next(reversed(summary.by_distance.values()))  # the farthest bucket with items
    judged = [g for g in summary.by_distance.values() if g.n]
    margin = sum(g.margin for g in judged) / max(1, sum(g.n for g in judged))
    metrics = {"accuracy": summary.accuracy, "accuracy_far": far.accuracy, "margin": margin}
    if summary.best_head is not None:
        layer, head = summary.best_head
        metrics["subject_attention"] = float(summary.head_attention[layer, head])
        metrics.update(best_layer=float(layer), best_head=float(head))
    return metrics


class ProbeOverTraining(L.Callback):
    """Run the agreement probe every `every_n_steps` optimizer steps and log what it finds.

    Args:
        every_n_steps: how often, in optimizer steps (and once when the fit ends).
        per_cell: probe sentences per cell of the set.
        hard: the hard set (long distances, attractor counts) instead of the depth 0-5 set.
        seed: the probe set's seed (held apart from every training seed in configs/).
        batch_size: sentences per probe forward.
        filename: the history file written into the log dir at fit end.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        per_cell: int = 10,
        hard: bool = True,
        seed: int = PROBE_SEED,
        batch_size: int = 32,
        filename: str = "probe_history.json",
    ) -> None:
        if every_n_steps < 1 or per_cell < 1 or batch_size < 1:
            raise ValueError("every_n_steps, per_cell and batch_size must be >= 1")
        self.every_n_steps = every_n_steps
        self.per_cell = per_cell
        self.hard = hard
        self.seed = seed
        self.batch_size = batch_size
        self.filename = filename
        self.history: list[dict[str, float]] = []
        self._items: list | None = None
        self.buckets: tuple[tuple[int, int], ...] = DISTANCE_BUCKETS

    def _probe_items(self, trainer: L.Trainer) -> list:
        if self._items is None:
            data = trainer.datamodule
            tokenizer, block = data.tokenizer, data.block_size
            if self.hard:
                self.buckets = hard_buckets(block)
                if not self.buckets:
                    raise ValueError(f"the hard probe set needs a context of >= 26, not {block}")
                self._items = hard_probe_set(
                    tokenizer, self.per_cell, self.seed, block, self.buckets, strict=False
                )
            else:
                self._items = probe_set(
                    tokenizer, self.per_cell, self.seed, max_depth=5, block_size=block
                )
        return self._items

    def run(
        self, trainer: L.Trainer, pl_module: L.LightningModule, log: bool = True
    ) -> dict[str, float]:
        """Probe the model now and record the metrics; `log` them too (not allowed in every
        hook). Rank 0 only."""
        items = self._probe_items(trainer)
        tokenizer = trainer.datamodule.tokenizer
        was_training = pl_module.training
        pl_module.eval()
        try:
            scores = score_items(
                pl_module.model,
                items,
                tokenizer.eot_id,
                batch_size=self.batch_size,
                vocab_size=tokenizer.vocab_size,
            )
        finally:
            pl_module.train(was_training)
        metrics = probe_metrics(summarize(items, scores, self.buckets))
        step = trainer.global_step
        for name, value in metrics.items() if log else ():
            pl_module.log(f"probe/{name}", value, rank_zero_only=True)
        self.history.append({"step": step, **metrics})
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        last = self.history[-1]["step"] if self.history else -1
        if trainer.is_global_zero and step % self.every_n_steps == 0 and step != last:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        done = self.history and self.history[-1]["step"] == trainer.global_step
        if trainer.is_global_zero and not done:
            self.run(trainer, pl_module, log=False)  # Lightning takes no logs in this hook

    def on_fit_end(self, trainer, pl_module) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        if not trainer.is_global_zero or not self.history:
            return
        path = Path(log_dir or trainer.default_root_dir) / self.filename
        with atomic_write(path, "w", encoding="utf-8") as f:
            json.dump(self.history, f, indent=1)
        rank_zero_info(f"probe history: {path}")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
