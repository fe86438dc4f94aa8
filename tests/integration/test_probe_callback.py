"""ProbeOverTraining: the agreement probe runs during a real fit, logs, and keeps its history."""

from __future__ import annotations

import csv
import json

import pytest

from tests.integration.helpers import tiny_args
from training.probe_callback import ProbeOverTraining

CALLBACK = "training.probe_callback.ProbeOverTraining"


def test_probe_runs_every_n_steps_logs_and_writes_its_history(tmp_path, data_cache):
    from training.cli import main

    extra = [
        "--trainer.callbacks+", CALLBACK,
        "--trainer.callbacks.every_n_steps", "4",
        "--trainer.callbacks.per_cell", "3",
    ]  # fmt: skip
    assert main(tiny_args(tmp_path, data_cache, 10, *extra)) == 0
    [history_file] = tmp_path.rglob("probe_history.json")
    history = json.loads(history_file.read_text())
    assert [h["step"] for h in history] == [4, 8, 10]  # every 4 steps, then the end
    for h in history:
        assert 0.0 <= h["accuracy"] <= 1.0 and 0.0 <= h["accuracy_far"] <= 1.0
        assert 0.0 <= h["subject_attention"] <= 1.0
        assert h["best_layer"] in (0.0, 1.0) and h["best_head"] in (0.0, 1.0)
    [metrics] = history_file.parent.glob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    logged = [float(r["probe/margin"]) for r in rows if r.get("probe/margin")]
    distinct = [m for i, m in enumerate(logged) if i == 0 or m != logged[i - 1]]
    # logged as float32 at the steps' flushes; the end's run is recorded, not logged
    assert distinct == pytest.approx([h["margin"] for h in history[:2]], rel=1e-6)


def test_probe_callback_rejects_bad_settings():
    with pytest.raises(ValueError, match="every_n_steps"):
        ProbeOverTraining(every_n_steps=0)
