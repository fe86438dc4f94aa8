"""app_args: the Serve application's args checked in the builder, and a config file's checked
before `serve run`."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attnlm.artifact import ArtifactError
from serving.app_args import check_app_args, check_config_file, main
from tests.integration.helpers import build_tiny_artifact

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return build_tiny_artifact(tmp_path_factory.mktemp("app-args") / "tiny")


def test_good_args_come_back_with_the_artifact_absolute(artifact, monkeypatch):
    monkeypatch.chdir(artifact.parent)
    args = check_app_args(
        {"artifact": "tiny", "device": "cuda:1", "dtype": "bfloat16", "model_name": "m"}
    )
    assert args == {
        "artifact": str(artifact),
        "device": "cuda:1",
        "dtype": "bfloat16",
        "model_name": "m",
    }


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({}, "'artifact' (an exported model folder) is required"),
        ({"artifact": 3}, "'artifact' must be a folder path, got 3"),
        (
            {"artifact": "x", "dtyp": "float32"},
            "unknown arg 'dtyp' (known: artifact, device, dtype, compile, batch_invariant, model_name, api_keys, metrics_require_key)",
        ),
        (
            {"artifact": "x", "device": "gpu0"},
            "'device' must be a torch device (cpu, cuda, cuda:1), got 'gpu0'",
        ),
        (
            {"artifact": "x", "dtype": "fp8"},
            "'dtype' must be one of float32, bfloat16, float16, auto, got 'fp8'",
        ),
        ({"artifact": "x", "model_name": " "}, "'model_name' must be a non-empty string"),
    ],
    ids=["no-artifact", "artifact-type", "unknown", "device", "dtype", "model-name"],
)
def test_bad_args_are_one_line(args, words):
    with pytest.raises(ValueError) as info:
        check_app_args(args)
    message = str(info.value)
    assert message.startswith("bad application args: ") and words in message and "\n" not in message


def test_every_bad_arg_at_once():
    with pytest.raises(ValueError, match="unknown arg 'x' .*; 'artifact' .* is required; 'dtype'"):
        check_app_args({"x": 1, "dtype": "fp8"})


def test_an_artifact_that_does_not_load_is_named(tmp_path, artifact):
    with pytest.raises(ArtifactError, match=f"artifact folder not found: {tmp_path / 'nowhere'}"):
        check_app_args({"artifact": str(tmp_path / "nowhere")})
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in artifact.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="has no tokenizer.json"):
        check_app_args({"artifact": str(broken)})


def config_with(tmp_path, **args) -> Path:
    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    config["applications"][0]["args"] = args
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_config_file_is_checked_before_serve_run(tmp_path, artifact, capsys):
    good = config_with(tmp_path, artifact=str(artifact), model_name="tiny")
    assert check_config_file(good) == [] and main([str(good)]) == 0
    bad = config_with(tmp_path, artifact=str(tmp_path / "nowhere"))
    assert main([str(bad)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (
        f"serve: error: {bad}: application 'attnlm': artifact folder not found: {tmp_path / 'nowhere'}"
    )
    (tmp_path / "junk.yaml").write_text("applications: [\n")
    assert check_config_file(tmp_path / "junk.yaml")[0].startswith(
        f"{tmp_path / 'junk.yaml'}: not a readable YAML file"
    )
    assert main([]) == 2


def test_the_shipped_configs_name_the_same_model(artifact):
    for path in (REPO / "configs" / "serve.yaml", REPO / "docker" / "serve.docker.yaml"):
        (app,) = yaml.safe_load(path.read_text())["applications"]
        assert app["args"]["model_name"] == "tiny"
        check_app_args({**app["args"], "artifact": str(artifact)})  # every arg is a known one
