"""DataSettings: the checked `data:` settings, every error at once, what follows from them."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest

from attnlm.config import ConfigError
from attnlm.tokenizer import Tokenizer
from training.data import TextDataModule
from training.data_settings import DataSettings

# TextDataModule's signature holds the defaults (it is the CLI's config); DataSettings has none
DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(TextDataModule.__init__).parameters.items()
    if name != "self"
}


def settings(**overrides) -> DataSettings:
    return DataSettings(**{**DEFAULTS, **overrides})


def test_fields_are_the_data_module_arguments():
    init_fields = [f.name for f in dataclasses.fields(DataSettings) if f.init]
    assert init_fields == list(DEFAULTS)
    dm = TextDataModule(cache_dir="somewhere", seed=7)
    assert dm.settings == settings(cache_dir="somewhere", seed=7)


def test_defaults_and_what_follows_from_them():
    s = settings(cache_dir="~/caches/../caches", val_fraction=1 / 4)
    assert (s.builder, s.resolved_files, s.local_dir, s.tokenizer) == (None, (), None, None)
    assert s.cache_root == Path.home() / "caches" and s.cache_root.is_absolute()
    assert s.data_files is None and isinstance(s.val_fraction, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.block_size = 8


def test_local_files_resolve_globs_and_a_lone_path_becomes_a_list(tmp_path):
    for name in ("b.txt", "a.txt", "c.json"):
        (tmp_path / name).write_text("x\n")
    s = settings(dataset="text", data_files=str(tmp_path / "*.txt"))
    assert s.builder == "text" and s.data_files == [str(tmp_path / "*.txt")]
    assert s.resolved_files == (tmp_path / "a.txt", tmp_path / "b.txt")
    s = settings(dataset="json", data_files=[str(tmp_path / "c.json"), str(tmp_path / "a.txt")])
    assert s.resolved_files == (tmp_path / "c.json", tmp_path / "a.txt")


def test_a_dataset_directory_and_a_hub_name(tmp_path):
    s = settings(dataset=str(tmp_path))
    assert s.local_dir == tmp_path.resolve() and s.builder is None
    hub = settings(dataset="someone/some-dataset", data_files="data/train-*.parquet")
    assert hub.local_dir is None and hub.resolved_files == ()  # the Hub resolves those
    assert hub.data_files == ["data/train-*.parquet"]


def test_the_given_tokenizer_is_loaded_once(tmp_path):
    path = Tokenizer.train(["The cat sits."] * 50, vocab_size=300).save(tmp_path / "tok.json")
    s = settings(tokenizer_path=str(path))
    assert isinstance(s.tokenizer, Tokenizer) and s.tokenizer.to_json_str() == path.read_text()


def test_every_error_in_one_config_error_in_field_order(tmp_path):
    with pytest.raises(ConfigError) as info:
        settings(
            dataset="csv",
            split="",
            vocab_size=256,
            num_proc=0,
            seed=True,
            val_fraction=0,
            batch_size=64,
            samples_per_epoch=10,
            tokenizer_path=str(tmp_path / "missing.json"),
        )
    assert isinstance(info.value, ValueError)  # what the CLI reports as a user error
    lines = str(info.value).splitlines()
    assert lines[0] == "invalid data settings:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "data.split",
        "data.vocab_size",
        "data.num_proc",
        "data.seed",
        "data.val_fraction",
        "data.samples_per_epoch",
        "data.data_files",
        "data.tokenizer_path",
    ]
    assert lines[-2] == "  data.data_files: required with data.dataset='csv'"


@pytest.mark.parametrize(
    "data_files",
    [[], [""], ["a.txt", 3], {"train": "a.txt"}],
    ids=["empty", "blank", "int", "dict"],
)
def test_bad_data_files_are_named(data_files):
    with pytest.raises(ConfigError, match="data.data_files: must be a path or a list of paths"):
        settings(dataset="json", data_files=data_files)


def test_the_encoding_is_a_codec_and_decode_errors_a_policy(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("x\n")
    s = settings(dataset="text", data_files=str(path), encoding="Latin1", decode_errors="skip")
    assert (s.codec, s.decode_errors, s.decodes_by_default) == ("iso8859-1", "skip", False)
    assert settings(encoding="UTF8").decodes_by_default  # one codec, any of its names
    with pytest.raises(ConfigError) as info:
        settings(dataset="text", data_files=str(path), encoding="base64", decode_errors="ignore")
    lines = str(info.value).splitlines()[1:]
    assert lines[0].startswith("  data.encoding: 'base64' is not a text encoding Python knows")
    assert lines[1] == "  data.decode_errors: must be one of strict, replace, skip, got 'ignore'"
    with pytest.raises(
        ConfigError, match="apply to local text files .* not to data.dataset='parquet'"
    ):
        settings(dataset="parquet", data_files=str(path), decode_errors="replace")
    with pytest.raises(ConfigError, match="not to data.dataset=None"):
        settings(encoding="cp1252")
