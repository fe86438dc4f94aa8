"""End-to-end training through the `attnlm` CLI: files written, exact resume, DDP, bad configs."""

from __future__ import annotations

import csv
import subprocess

import pytest
import torch

from tests.integration.helpers import REPO, attnlm_command, clean_env, tiny_args
from training.cli import main


def read_metrics(root) -> list[dict[str, str]]:
    (metrics,) = root.glob("logs/version_*/metrics.csv")
    with metrics.open() as f:
        return list(csv.DictReader(f))


def test_fit_writes_checkpoints_logs_plot_and_config(trained_run):
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    assert (trained_run / "checkpoints" / "best.ckpt").is_file()
    (log_dir,) = trained_run.glob("logs/version_*")
    assert (log_dir / "config.yaml").is_file()
    assert list(log_dir.glob("events.out.tfevents.*")), "TensorBoard events missing"
    assert (log_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_metrics(trained_run)
    logged = {k for row in rows for k, v in row.items() if v}
    for key in ("train_loss", "val_loss", "val_ppl", "val_bpc", "tokens_per_sec", "lr"):
        assert key in logged, key
    train = [float(r["train_loss"]) for r in rows if r["train_loss"]]
    assert train[-1] < train[0]
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 12
    assert "tokenizer_json" in ckpt["TextDataModule"]


def test_resume_continues_exactly_where_the_run_stopped(tmp_path, data_cache, trained_run):
    """6 steps, then resume to 12 from last.ckpt == 12 uninterrupted steps."""
    fixed = ["--model.lr_decay_steps", "12"]
    uninterrupted = tmp_path / "straight"
    assert main(tiny_args(uninterrupted, data_cache, 12, *fixed)) == 0
    resumed = tmp_path / "resumed"
    assert main(tiny_args(resumed, data_cache, 6, *fixed)) == 0
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert main(tiny_args(resumed, data_cache, 12, *fixed, "--ckpt_path", "last")) == 0

    a = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert b["global_step"] == 12
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][name], tensor, rtol=0, atol=1e-6, msg=name)
    sa, sb = a["lr_schedulers"][0], b["lr_schedulers"][0]
    assert sa["last_epoch"] == sb["last_epoch"] == 12
    assert (
        a["optimizer_states"][0]["state"][0]["step"] == b["optimizer_states"][0]["state"][0]["step"]
    )


def test_validate_subcommand_reports_bpc(trained_run, data_cache, capsys):
    args = tiny_args(trained_run, data_cache)
    args[0] = "validate"
    args += ["--ckpt_path", str(trained_run / "checkpoints" / "best.ckpt")]
    assert main(args) == 0
    assert "val_bpc" in capsys.readouterr().out


def test_ddp_two_cpu_processes_bf16_mixed(tmp_path, data_cache):
    root = tmp_path / "ddp"
    args = tiny_args(root, data_cache, 4) + [
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--trainer.precision", "bf16-mixed", "--trainer.val_check_interval", "4",
    ]  # fmt: skip
    proc = subprocess.run(
        attnlm_command(*args),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            ["--model.n_embd", "30", "--model.n_head", "4"],
            "n_embd (30) must be divisible by n_head (4)",
        ),
        (["--model.n_layer", "0"], "n_layer must be a positive integer"),
        (["--data.vocab_size", "200"], "data.vocab_size"),
        (
            ["--data.block_size", "64"],
            "data.block_size (64) exceeds the model's context model.block_size (32)",
        ),
        (
            ["--data.dataset", "text", "--data.data_files", "/nonexistent/corpus.txt"],
            "no such file",
        ),
        (["--data.batch_size", "0"], "data.batch_size"),
        (["--model.learning_rate", "-1"], "model.learning_rate"),
    ],
)
def test_bad_config_fails_before_training_naming_the_field(
    tmp_path, data_cache, capsys, override, message
):
    root = tmp_path / "bad"
    assert main(tiny_args(root, data_cache, 2, *override)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not (root / "checkpoints").exists()


def test_unknown_config_key_is_rejected(tmp_path, data_cache, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tmp_path, data_cache, 2, "--model.n_experts", "4"))
    assert exit_info.value.code == 2
    assert "n_experts" in capsys.readouterr().err


def test_non_finite_loss_stops_naming_the_step(tmp_path, data_cache, capsys):
    root = tmp_path / "nan"
    code = main(
        tiny_args(
            root,
            data_cache,
            12,
            "--model.learning_rate",
            "1e30",
            "--model.warmup_steps",
            "0",
            "--trainer.gradient_clip_val",
            "null",
        )
    )
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "training loss became NaN/inf at step" in err
    for ckpt_path in (root / "checkpoints").glob("*.ckpt"):  # whatever was kept is finite
        state = torch.load(ckpt_path, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values())
