"""AttnLMCLI's pieces: one context length, the parser's errors on one line, config file checks,
the progress bar's label."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from jsonargparse import Namespace

from attnlm.config import ConfigError
from training.callbacks import TrainProgressBar
from training.cli import main
from training.lightning_cli import (
    DEFAULT_BLOCK_SIZE,
    AttnLMCLI,
    check_config_files,
    one_line,
    resolve_block_size,
    run_lightning,
)

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def config(model_block, data_block) -> Namespace:
    return Namespace(model=Namespace(block_size=model_block), data=Namespace(block_size=data_block))


@pytest.mark.parametrize(
    ("model_block", "data_block", "both"),
    [(None, None, DEFAULT_BLOCK_SIZE), (64, None, 64), (None, 32, 32), (48, 48, 48)],
)
def test_the_block_size_given_sets_both(model_block, data_block, both):
    cfg = config(model_block, data_block)
    resolve_block_size(cfg)
    assert cfg.model.block_size == cfg.data.block_size == both


@pytest.mark.parametrize(
    ("model_block", "data_block", "relation"), [(32, 64, "exceeds"), (64, 32, "differs from")]
)
def test_two_different_block_sizes_are_one_config_error(model_block, data_block, relation):
    with pytest.raises(ConfigError) as info:
        resolve_block_size(config(model_block, data_block))
    assert str(info.value).startswith(
        f"data.block_size ({data_block}) {relation} the model's context model.block_size "
        f"({model_block}); the context length is one setting"
    )


def printed_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_printed_config_shows_the_resolved_context_length(capsys):
    printed = printed_config(capsys, "--config", TINY, "--model.block_size", "128")
    assert printed["model"]["block_size"] == printed["data"]["block_size"] == 128
    printed = printed_config(capsys, "--data.block_size", "48")  # no config: the data's sets both
    assert printed["model"]["block_size"] == printed["data"]["block_size"] == 48


class _Built(Exception):
    pass


class _BuildOnly(AttnLMCLI):
    def after_instantiate_classes(self) -> None:
        raise _Built(self.model, self.datamodule)


def test_the_model_block_size_alone_sets_the_windows(tmp_path):
    with pytest.raises(_Built) as built:
        run_lightning(
            [
                "fit",
                "--config",
                TINY,
                "--model.block_size",
                "128",
                "--data.cache_dir",
                str(tmp_path),
            ],
            cli_class=_BuildOnly,
        )
    model, datamodule = built.value.args
    assert model.config.block_size == datamodule.block_size == 128
    assert model.hparams_initial["block_size"] == datamodule.hparams_initial["block_size"] == 128


def test_the_given_tokenizer_decides_the_vocab_size_of_both(tmp_path):
    from attnlm.tokenizer import Tokenizer

    path = Tokenizer.train(["The cat sits."] * 50, vocab_size=300).save(tmp_path / "tok.json")
    with pytest.raises(_Built) as built:
        run_lightning(
            ["fit", "--config", TINY, "--data.tokenizer_path", str(path)], cli_class=_BuildOnly
        )
    model, datamodule = built.value.args
    vocab = Tokenizer.from_file(path).vocab_size
    assert model.hparams_initial["vocab_size"] == datamodule.hparams_initial["vocab_size"] == vocab


@pytest.mark.parametrize(
    ("message", "line"),
    [
        (
            "unrecognized arguments: --model.n_experts 4",
            "unrecognized arguments: --model.n_experts 4",
        ),
        (
            "Parser key \"model.n_layer\":\n  Expected a <class 'int'>. Got value: two",
            "model.n_layer: expected int. Got value: two",
        ),
        (
            "Parser key \"config\": File does not exist: 'x.yaml'",
            "config: File does not exist: 'x.yaml'",
        ),
        (
            'Parser key "trainer.precision":\n  Does not validate against any of the Union subtypes\n'
            "  Subtypes: [typing.Literal['16-mixed', '32-true'], <class 'NoneType'>]\n  Errors:\n"
            "    - Expected a typing.Literal['16-mixed', '32-true']\n"
            "    - Expected a <class 'NoneType'>\n"
            "  Given value type: <class 'str'>\n  Given value: bf17",
            "trainer.precision: got bf17; expected one of ['16-mixed', '32-true'] or null",
        ),
    ],
    ids=["unknown", "type", "missing-file", "union"],
)
def test_parser_errors_become_one_line(message, line):
    assert one_line(message) == line


def test_config_files_that_are_not_yaml_are_named_with_the_place(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: [1\n")
    with pytest.raises(
        ConfigError, match=rf"config file {bad} is not valid YAML: .* at line 3, column 1"
    ):
        check_config_files(["fit", "--config", str(bad)])
    with pytest.raises(ConfigError, match="is not valid YAML"):
        check_config_files(["fit", f"--config={bad}"])
    bad.write_bytes(b"trainer: \xff\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        check_config_files(["fit", "-c", str(bad)])
    check_config_files(["fit", "--config", TINY, "--config", str(tmp_path / "missing.yaml")])


def test_the_progress_bar_has_no_epoch_limit_when_steps_end_the_run():
    bar = TrainProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1)  # max_steps limits the run
    assert bar._get_train_description(0).rstrip() == "Epoch 0"
    assert len(bar._get_train_description(0)) == len(bar.validation_description)
    bar._trainer = SimpleNamespace(max_epochs=3)
    assert bar._get_train_description(1).rstrip() == "Epoch 1/2"
