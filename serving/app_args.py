"""The Serve application's args (`args:` in configs/serve.yaml), checked before any replica starts.

`check_app_args(args)` is called by the application builder, `serving.app.build_app`: known keys
of the right types, and an artifact that loads. A bad one raises one line there, so the
application fails at once, instead of Ray starting replicas that cannot load it and retrying them
forever.

`serve run CONFIG` builds the application inside Ray (a build task): when the builder fails, Ray
marks the application DEPLOY_FAILED with that line, but `serve run` itself keeps running. To end
with the line and a non-zero exit code instead, check the config file first, in this process
(`make serve` does):

    python -m serving.app_args configs/serve.yaml && serve run configs/serve.yaml
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from attnlm.artifact import load_artifact
from serving.auth import Access
from serving.engine import _DTYPES

APP_ARGS = (
    "artifact",
    "device",
    "dtype",
    "compile",
    "batch_invariant",
    "model_name",
    "api_keys",
    "metrics_require_key",
)
BUILDER = "serving.app:build_app"  # the import_path whose args these are


def check_app_args(args: dict[str, Any]) -> dict[str, Any]:
    """The application's args, checked: known keys of the right types, and an artifact that loads
    (config, tokenizer, weights, on the CPU). Returns them with `artifact` made absolute (replicas
    need not share the caller's working directory).

    Raises:
        ValueError: one line naming every bad arg (an ArtifactError for the artifact's problem).
    """
    if not isinstance(args, dict):
        raise ValueError(f"bad application args: a mapping of {', '.join(APP_ARGS)}, got {args!r}")
    errors = [
        f"unknown arg {name!r} (known: {', '.join(APP_ARGS)})"
        for name in sorted(set(args) - set(APP_ARGS), key=str)
    ]
    artifact = args.get("artifact")
    if artifact is None:
        errors.append("'artifact' (an exported model folder) is required")
    elif not isinstance(artifact, str) or not artifact:
        errors.append(f"'artifact' must be a folder path, got {artifact!r}")
    device, dtype, model_name = args.get("device"), args.get("dtype"), args.get("model_name")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            errors.append(f"'device' must be a torch device (cpu, cuda, cuda:1), got {device!r}")
    if dtype is not None and dtype not in (*_DTYPES, "auto"):
        errors.append(f"'dtype' must be one of {', '.join([*_DTYPES, 'auto'])}, got {dtype!r}")
    for flag in ("compile", "batch_invariant"):
        if not isinstance(args.get(flag, False), bool):
            errors.append(f"'{flag}' must be true or false, got {args[flag]!r}")
    if model_name is not None and (not isinstance(model_name, str) or not model_name.strip()):
        errors.append(f"'model_name' must be a non-empty string, got {model_name!r}")
    try:  # the keys alone: those of $ATTNLM_API_KEY join them in each replica
        Access.configure(args.get("api_keys"), args.get("metrics_require_key", False), environ={})
    except (TypeError, ValueError) as err:
        errors.append(str(err))
    if errors:
        raise ValueError("bad application args: " + "; ".join(errors))
    artifact = str(Path(artifact).resolve())
    load_artifact(artifact, device="cpu")  # here, once, rather than failing in every replica
    return {**args, "artifact": artifact}


def check_config_file(path: str | Path) -> list[str]:
    """One line per application of a Serve config file whose builder args are bad."""
    problems = []
    try:
        config = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        return [f"{path}: not a readable YAML file: {' '.join(str(err).split())}"]
    applications = config.get("applications") if isinstance(config, dict) else None
    if not isinstance(applications, list):
        return [f"{path}: no list of applications"]
    for app in applications:
        if not isinstance(app, dict) or app.get("import_path") != BUILDER:
            continue
        try:
            check_app_args(app.get("args") or {})
        except ValueError as err:
            problems.append(f"{path}: application {app.get('name')!r}: {err}")
    return problems


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print("usage: python -m serving.app_args CONFIG.yaml ...", file=sys.stderr)
        return 2
    problems = [line for path in paths for line in check_config_file(path)]
    for line in problems:
        print(f"serve: error: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
