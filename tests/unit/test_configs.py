"""Every shipped YAML config parses through the CLI and builds a valid model and data module."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attnlm.config import GPTConfig
from training.cli import main
from training.data import TextDataModule

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
PROBE_CONFIGS = sorted((CONFIG_DIR / "probe").glob("*.yaml"))
LIGHTNING_CONFIGS = [c for c in CONFIGS if c.name != "serve.yaml"]


def test_configs_exist():
    names = {c.name for c in CONFIGS}
    assert {"tiny.yaml", "small.yaml", "tiny-lstm.yaml", "tiny-additive.yaml"} <= names
    probe = {c.stem for c in PROBE_CONFIGS}
    assert probe == {f"{a}-{s}" for a in ("dot", "additive", "lstm") for s in ("0.3m", "1m")}


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


def test_probe_configs_differ_in_the_model_only_and_match_in_parameters():
    """The probe study's six configs: same data, context, token budget and schedule; within a
    size the three architectures' parameter counts are within 5 % of each other."""
    from attnlm.networks import build_model

    loaded = {c.stem: yaml.safe_load(c.read_text()) for c in PROBE_CONFIGS}
    shared = {name: {k: v for k, v in cfg.items() if k != "model"} for name, cfg in loaded.items()}
    for cfg in shared.values():
        cfg["trainer"] = {k: v for k, v in cfg["trainer"].items() if k != "default_root_dir"}
    assert len({yaml.safe_dump(v) for v in shared.values()}) == 1
    training = {"learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "dropout"}
    assert len({yaml.safe_dump({k: c["model"][k] for k in training}) for c in loaded.values()}) == 1
    assert {c["model"]["block_size"] for c in loaded.values()} == {256}
    for size in ("0.3m", "1m"):
        counts = []
        for arch in ("dot", "additive", "lstm"):
            model = loaded[f"{arch}-{size}"]["model"]
            shape = {k: model[k] for k in ("block_size", "n_layer", "n_head", "n_embd")}
            config = GPTConfig(
                vocab_size=loaded[f"{arch}-{size}"]["data"]["vocab_size"],
                arch=model.get("arch", "transformer"),
                attention=model.get("attention", "dot_product"),
                **shape,
            )
            counts.append(sum(p.numel() for p in build_model(config).parameters()))
        assert max(counts) / min(counts) < 1.05, (size, counts)
