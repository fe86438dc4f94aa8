"""`serve run` with a bad artifact or bad args: one clear line and a non-zero exit, not replicas
that Ray retries forever.

`make serve` checks the config's args before `serve run` (`python -m serving.app_args`): one
line, exit code 1, Ray never started. `serve run IMPORT_PATH args...` calls the builder in its
own process, before Ray starts: it exits non-zero, our line last (after the traceback that
Ray's CLI prints for any builder error). `serve run CONFIG` builds the application inside Ray:
the builder fails there before any replica starts, but by Ray's design `serve run` keeps running
(marked slow: it starts Ray).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.helpers import REPO, clean_env

pytest.importorskip("ray")
SERVE = str(Path(sys.executable).with_name("serve"))
TIMEOUT_S = 60


def ray_env() -> dict[str, str]:
    env = clean_env()
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"),  # unix socket paths are short
        PYTHONPATH=str(REPO),  # the worktree's serving package, in Ray's workers too
    )
    return env


def bad_config(tmp_path: Path, **args) -> Path:
    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = 18000 + os.getpid() % 1000
    config["applications"][0]["args"] = args
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_make_serve_with_a_missing_artifact_is_one_line(tmp_path):
    config = bad_config(tmp_path, artifact=str(tmp_path / "nowhere"), model_name="tiny")
    start = time.perf_counter()
    proc = subprocess.run(  # the recipe of `make serve`
        ["bash", "-c", f"{sys.executable} -m serving.app_args {config} && {SERVE} run {config}"],
        cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 1 and time.perf_counter() - start < TIMEOUT_S
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"serve: error: {config}: application 'attnlm': artifact folder not found: "
        f"{tmp_path / 'nowhere'}"
    ]


def test_serve_run_of_the_builder_with_bad_args_exits_with_our_line_last(tmp_path):
    proc = subprocess.run(
        [SERVE, "run", "serving.app:build_app", f"artifact={tmp_path / 'nowhere'}", "dtyp=float32"],
        cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.endswith(
        "bad application args: unknown arg 'dtyp' (known: artifact, device, dtype, compile, batch_invariant, model_name, api_keys, metrics_require_key)"
    )
    assert "ray.init" not in proc.stderr and "Started a local Ray instance" not in proc.stderr


@pytest.mark.slow
def test_serve_run_of_a_config_fails_in_the_builder_before_any_replica(tmp_path):
    config = bad_config(tmp_path, artifact=str(tmp_path / "nowhere"))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [SERVE, "run", str(config)], cwd=REPO, env=ray_env(), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    line = f"attnlm.artifact.ArtifactError: artifact folder not found: {tmp_path / 'nowhere'}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and line not in log.read_text():
            time.sleep(0.5)
        time.sleep(5)  # room for a replica to start, were one started
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # serve run blocks by design: stop it
        proc.wait(timeout=30)
    text = log.read_text()
    assert line in text, text[-4000:]
    assert "ServeReplica" not in text  # the builder failed: no replica was ever started
