"""Ray Train as the launcher of `attnlm fit`: 2 CPU workers on a local Ray instance (127.0.0.1).

`attnlm fit --launcher ray --ray.num_workers 2 --ray.use_gpu false` runs in a subprocess (Ray, and
DDP inside its workers, must not touch this pytest process), trains the tiny config for a few
steps, and leaves the checkpoint that Ray Train reported; that checkpoint exports, loads and
generates. Bad launcher options end the command with one line before Ray starts.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

from attnlm.artifact import load_artifact
from tests.integration.helpers import REPO, attnlm_command, clean_env, run_bounded, tiny_args
from training.cli import main

pytest.importorskip("ray.train")

STEPS = 6
TIMEOUT_S = 180
REPORTED = re.compile(r"Ray Train reported checkpoint: (\S+)")


def ray_env(tmp: Path) -> dict[str, str]:
    """A child environment whose Ray starts its own local instance, on 127.0.0.1, without auth,
    with its sockets under a short /tmp path and its other temporary files under `tmp`."""
    env = clean_env()
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        TMPDIR=str(tmp),
    )
    return env


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, data_cache) -> tuple[Path, Path, str]:
    """One `attnlm fit --launcher ray` run: (default_root_dir, reported checkpoint, output)."""
    root = tmp_path_factory.mktemp("ray_train")
    tmp = tmp_path_factory.mktemp("ray_tmp")
    env = ray_env(tmp)
    command = attnlm_command(
        *tiny_args(root, data_cache, STEPS),
        "--launcher", "ray", "--ray.num_workers", "2", "--ray.use_gpu", "false",
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        code, output = run_bounded(command, env, TIMEOUT_S)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    print(
        f"attnlm fit --launcher ray, 2 CPU workers, {STEPS} steps: {time.perf_counter() - t0:.1f}s"
    )
    assert code == 0, output[-4000:]
    reported = REPORTED.findall(output)
    assert len(reported) == 1, output[-4000:]
    return root, Path(reported[0]), output


def test_two_ray_workers_train_and_report_a_checkpoint(ray_run):
    root, checkpoint, output = ray_run
    assert "world_rank=0" in output and "world_rank=1" in output  # two Ray Train workers
    assert "world_size=2" in output  # one DDP process group over both
    assert checkpoint.name == "checkpoint.ckpt" and checkpoint.is_file()
    assert checkpoint.is_relative_to(root / "ray")
    reported = torch.load(checkpoint, weights_only=True)
    assert reported["global_step"] == STEPS
    # the project's own checkpoints are written as without Ray, by rank 0
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS and (root / "checkpoints" / "best.ckpt").is_file()
    assert reported["state_dict"].keys() == last["state_dict"].keys()
    for name, tensor in reported["state_dict"].items():
        assert torch.equal(tensor, last["state_dict"][name]), name
    # one log folder (rank 0 alone writes logs), with the resolved config of the run
    assert [p.name for p in (root / "logs").iterdir()] == ["version_0"]
    assert (root / "logs" / "version_0" / "config.yaml").is_file()


def test_reported_checkpoint_exports_loads_and_generates(ray_run, tmp_path, capsys):
    _, checkpoint, _ = ray_run
    out = tmp_path / "artifact"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    artifact = load_artifact(out, device="cpu")
    assert (artifact.config.n_layer, artifact.config.n_embd) == (2, 32)
    capsys.readouterr()
    prompt = "The cat that"
    args = ["--artifact", str(out), "--prompt", prompt, "--max_new_tokens", "5", "--seed", "0"]
    assert main(["generate", *args, "--device", "cpu", "--no_stop"]) == 0
    text = capsys.readouterr().out
    assert prompt in text and len(text.strip()) > len(prompt)


@pytest.mark.parametrize(
    "options, message",
    [
        (["--launcher", "slurm"], "--launcher must be one of lightning, ray, got 'slurm'"),
        (["--launcher", "ray", "--ray.num_workers", "0"], "--ray.num_workers must be a positive"),
        (["--launcher", "ray", "--ray.num_workers", "two"], "--ray.num_workers must be a positive"),
        (["--launcher", "ray", "--ray.use_gpu", "maybe"], "--ray.use_gpu must be true or false"),
        (["--launcher", "ray", "--ray.num_gpus", "1"], "unknown option(s) --ray.num_gpus"),
        (["--ray.num_workers", "2"], "--ray.num_workers needs --launcher ray"),
        (["--launcher"], "--launcher needs a value"),
    ],
)
def test_bad_launcher_options_end_with_one_line(options, message, capsys):
    code = main(["fit", "--config", str(REPO / "configs" / "tiny.yaml"), *options])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("attnlm fit: error: ") and message in err and "\n" not in err, err


def test_ray_launcher_is_for_fit_only(capsys):
    assert main(["validate", "--launcher", "ray"]) == 1
    assert capsys.readouterr().err.strip() == (
        "attnlm validate: error: --launcher ray runs `attnlm fit` only"
    )


def test_config_error_ends_before_ray_starts(tmp_path, data_cache, capsys):
    root = tmp_path / "run"
    args = tiny_args(root, data_cache, STEPS, "--model.n_head", "3")  # 32 wide: not divisible
    assert main([*args, "--launcher", "ray", "--ray.num_workers", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("attnlm fit: error: ") and "n_head" in err[-1], err
    assert not (root / "ray").exists()


def test_a_user_error_in_a_worker_is_raised_as_itself():
    """A worker's ConfigError (etc.) ends the command through the CLI's one-line path; anything
    else stays Ray's error, traceback and all. (Observed once end to end: a missing data file
    raised in the workers' prepare_data gives `attnlm fit: error: Couldn't find any data file`.)"""
    from ray.train import WorkerGroupError

    from attnlm.config import ConfigError
    from training.ray_launcher import _user_error

    config_error = ConfigError("n_embd (32) must be divisible by n_head (3)")
    failed = WorkerGroupError("rank 0 failed", {0: config_error, 1: config_error})
    assert _user_error(failed) is config_error
    assert _user_error(WorkerGroupError("rank 1 failed", {1: RuntimeError("NCCL")})) is None
