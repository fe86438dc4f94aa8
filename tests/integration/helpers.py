"""Helpers for integration tests: tiny `attnlm fit` arguments, a clean child environment, a tiny
served folder, Ray Serve on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def tiny_args(root: Path, cache: Path, max_steps: int = 12, *extra: str) -> list[str]:
    """`attnlm fit` arguments for a model small enough to train in seconds on 2 CPU cores."""
    return [
        "fit",
        "--config", str(REPO / "configs" / "tiny.yaml"),
        "--trainer.default_root_dir", str(root),
        "--trainer.max_steps", str(max_steps),
        "--trainer.val_check_interval", "6",
        "--trainer.limit_val_batches", "2",
        "--trainer.log_every_n_steps", "2",
        "--trainer.enable_progress_bar", "false",
        "--model.n_layer", "2",
        "--model.n_head", "2",
        "--model.n_embd", "32",
        "--model.block_size", "32",
        "--model.warmup_steps", "2",
        "--data.block_size", "32",
        "--data.batch_size", "8",
        "--data.corpus_sentences", "3000",
        "--data.vocab_size", "300",
        "--data.samples_per_epoch", "2000",
        "--data.cache_dir", str(cache),
        "--speed.measure_cpu_peak", "false",
        *extra,
    ]  # fmt: skip


def clean_env() -> dict[str, str]:
    """Environment for a child process: no DDP variables left by another test, offline HF."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")
    }
    env.update(
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_bounded(command: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run `command` from the repository root in its own process group; on timeout kill the whole
    group (Ray's processes with it) and fail the test with the end of its output."""
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s:\n{output[-4000:]}")
    return proc.returncode, output


def attnlm_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.cli", *args]


def build_tiny_artifact(out: Path, seed: int = 0, **config: object) -> Path:
    """An untrained 2-layer GPT with a real tokenizer, exported: enough to exercise serving.
    `config` overrides GPTConfig fields (e.g. arch="lstm")."""
    import torch

    from attnlm.artifact import save_artifact
    from attnlm.config import GPTConfig
    from attnlm.corpus import generate_corpus
    from attnlm.networks import build_model
    from attnlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(generate_corpus(2000, seed=seed), vocab_size=300)
    torch.manual_seed(seed)
    shape = {"block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, **config}
    model = build_model(GPTConfig(vocab_size=tokenizer.vocab_size, **shape))
    return save_artifact(model, tokenizer, out)


# a chat template for tokenizer_config.json: "role: content" lines, then "assistant:"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def with_chat_template(folder: Path) -> Path:
    """Give a model folder's tokenizer_config.json `CHAT_TEMPLATE` (chat completions served)."""
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": CHAT_TEMPLATE}))
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(client, path: str, tries: int = 120) -> None:
    """Poll `path` with an httpx.Client until it answers 200 (bounded: `tries` x 0.5 s)."""
    import httpx

    for _ in range(tries):
        try:
            if client.get(path).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{path} did not become healthy")


@contextmanager
def local_serve(ray_dir: str | None = None) -> Iterator[str]:
    """Ray (2 CPUs, no auth, its temp dir `ray_dir` or a new one) and Ray Serve's HTTP proxy on
    127.0.0.1 at a free port; yields the base URL, shuts both down after."""
    import ray
    from ray import serve

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=ray_dir or tempfile.mkdtemp(prefix="ray", dir="/tmp"),
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
