"""Every shipped YAML config parses through the CLI and builds a valid model and data module."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attnlm.config import GPTConfig
from training.cli import main
from training.data import TextDataModule

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
LIGHTNING_CONFIGS = [c for c in CONFIGS if c.name != "serve.yaml"]


def test_configs_exist():
    names = {c.name for c in CONFIGS}
    assert {"tiny.yaml", "small.yaml", "tiny-lstm.yaml", "tiny-additive.yaml"} <= names


@pytest.mark.parametrize("path", LIGHTNING_CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_builds(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]
    gpt = GPTConfig(
        **{
            k: model[k]
            for k in (
                "block_size",
                "n_layer",
                "n_head",
                "n_embd",
                "dropout",
                "bias",
                "arch",
                "attention",
            )
        },
        vocab_size=config["data"]["vocab_size"],
    )
    assert config["data"]["block_size"] <= gpt.block_size
    data = TextDataModule(**config["data"])
    assert data.vocab_size == config["data"]["vocab_size"]
    assert config["checkpoint"]["save_last"] is True
    assert config["checkpoint"]["monitor"] == "val_loss"


def test_cli_does_not_warn_about_its_own_args(capsys):
    """`attnlm` passes its command line to LightningCLI as `args` while sys.argv holds it too
    (Lightning's DDP launcher re-runs sys.argv): LightningCLI's warning about that stays quiet."""
    import warnings

    tiny = next(c for c in LIGHTNING_CONFIGS if c.name == "tiny.yaml")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(tiny), "--print_config"])
    assert not [w for w in caught if "args parameter" in str(w.message)]
