"""serving.settings: the deployment's user_config, defaults written once, every error named; the
shipped Ray Serve configs parse into it."""

from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from serving.settings import GRACEFUL_SHUTDOWN_TIMEOUT_S, MAX_ONGOING_REQUESTS, ServerSettings

REPO = Path(__file__).resolve().parents[2]


def test_missing_keys_keep_their_defaults():
    defaults = ServerSettings()
    settings = ServerSettings.from_user_config({"max_batch_size": 8})
    assert settings == ServerSettings(8, defaults.batch_wait_timeout_s, defaults.max_in_flight)
    assert ServerSettings.from_user_config(None) == defaults
    assert ServerSettings.from_user_config(asdict(defaults)) == defaults
    assert defaults.max_batch_size <= MAX_ONGOING_REQUESTS  # or batches never fill


def test_every_bad_value_is_named_at_once():
    with pytest.raises(ValueError) as info:
        ServerSettings(
            max_batch_size=0,
            batch_wait_timeout_s=-1,
            max_in_flight=True,
            attention_cache_bytes=-1,
            max_attention_bytes=0,
        )
    message = str(info.value)
    for name in (
        "max_batch_size",
        "batch_wait_timeout_s",
        "max_in_flight",
        "attention_cache_bytes",
        "max_attention_bytes",
    ):
        assert name in message
    assert ServerSettings(attention_cache_bytes=0).attention_cache_bytes == 0  # the cache off
    with pytest.raises(ValueError, match="unknown key.*max_batch"):
        ServerSettings.from_user_config({"max_batch": 8})


def _serve_configs() -> list[tuple[str, dict]]:
    manifest = yaml.safe_load((REPO / "deploy" / "rayservice.yaml").read_text())
    configs = [
        ("configs/serve.yaml", yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())),
        (
            "docker/serve.docker.yaml",
            yaml.safe_load((REPO / "docker" / "serve.docker.yaml").read_text()),
        ),
        ("deploy/rayservice.yaml", yaml.safe_load(manifest["spec"]["serveConfigV2"])),
    ]
    return [
        (name, deployment)
        for name, config in configs
        for app in config["applications"]
        for deployment in app["deployments"]
    ]


@pytest.mark.parametrize(
    "name, deployment", _serve_configs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_shipped_user_configs_parse(name, deployment):
    settings = ServerSettings.from_user_config(deployment["user_config"])
    assert deployment["max_ongoing_requests"] >= settings.max_batch_size, name


def test_request_timeout_is_a_positive_number_or_none():
    assert ServerSettings(request_timeout_s=None).request_timeout_s is None
    assert ServerSettings(request_timeout_s=0.5).request_timeout_s == 0.5
    for bad in (0, -1, True, "60"):
        with pytest.raises(ValueError, match="request_timeout_s"):
            ServerSettings(request_timeout_s=bad)


@pytest.mark.parametrize(
    "name, deployment", _serve_configs(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_draining_replica_outlasts_its_longest_request(name, deployment):
    settings = ServerSettings.from_user_config(deployment["user_config"])
    assert deployment["graceful_shutdown_timeout_s"] > settings.request_timeout_s, name
    assert GRACEFUL_SHUTDOWN_TIMEOUT_S > ServerSettings().request_timeout_s
