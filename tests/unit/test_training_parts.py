"""Pieces of the training app that need no Trainer: schedule, atomic checkpoint writes, NaN guard."""

from __future__ import annotations

import math

import pytest
import torch

from training.callbacks import AtomicCheckpointIO, plot_loss_curve
from training.module import LanguageModel, NonFiniteLossError, lr_factor


def test_lr_schedule_warms_up_linearly_then_cosine_to_the_floor():
    factors = [lr_factor(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(120)]
    assert factors[0] == pytest.approx(1 / 11)
    assert all(a < b for a, b in zip(factors[:10], factors[1:11], strict=True))
    assert factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(factors[10:110], factors[11:111], strict=True))
    assert factors[110] == factors[119] == pytest.approx(0.1)


def test_atomic_checkpoint_write_keeps_the_old_file_when_a_save_fails(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    assert io.load_checkpoint(path)["step"] == 1

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


def test_checkpoint_loading_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.ckpt"
    torch.save({"payload": Evil()}, path)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_non_finite_loss_is_tracked_without_sync_and_blocks_checkpoints():
    module = LanguageModel(vocab_size=300, block_size=16, n_layer=1, n_head=1, n_embd=8)
    module._track_non_finite(torch.tensor(2.0))
    module._raise_if_non_finite()  # finite: nothing
    module._track_non_finite(torch.tensor(float("nan")))
    module._track_non_finite(torch.tensor(float("inf")))
    with pytest.raises(NonFiniteLossError, match="at step 0"):
        module.on_save_checkpoint({})


def test_bad_optimizer_settings_are_named():
    with pytest.raises(ValueError, match="model.warmup_steps"):
        LanguageModel(warmup_steps=-1)
    with pytest.raises(ValueError, match="model.min_lr_ratio"):
        LanguageModel(min_lr_ratio=2)


def test_loss_curve_plot_is_a_png(tmp_path):
    path = plot_loss_curve([(0, 5.0), (10, 3.0)], [(10, 3.2)], tmp_path / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
