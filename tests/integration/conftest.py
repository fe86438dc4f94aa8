"""Fixtures for integration tests: one tiny training run shared by the session's tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.helpers import tiny_args


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_cache) -> Path:
    """A finished 12-step run of the tiny config (checkpoints at steps 6 and 12)."""
    from training.cli import main

    root = tmp_path_factory.mktemp("run")
    assert main(tiny_args(root, data_cache)) == 0
    return root
