"""The `data:` settings, checked: `TextDataModule`'s arguments with what follows from them.

`DataSettings` validates itself at construction and collects every problem into one
`ConfigError` (a ValueError), one line per field (a lone problem: one line in all), before
anything is read or built:

    >>> from training.data import TextDataModule
    >>> TextDataModule(block_size=0, val_fraction=1.0)
    Traceback (most recent call last):
    ...
    attnlm.config.ConfigError: invalid data settings:
      data.block_size: must be an int >= 1, got 0
      data.val_fraction: must be in (0, 1), got 1.0

The fields are the arguments of `TextDataModule.__init__`, which builds this from them (they
are documented there: they are the `--data.*` options of `attnlm fit`, and their defaults are
its defaults). Checking also resolves what the data module needs next: the `datasets` builder
for local files, those files (globs expanded), a local dataset directory, the codec of
`encoding`, and the given tokenizer (loaded once, here).
"""

from __future__ import annotations

import codecs
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from attnlm.config import ConfigError
from attnlm.tokenizer import NUM_BYTES, Tokenizer, TokenizerError

LOCAL_BUILDERS = ("text", "json", "parquet", "csv")  # `datasets` builders that read data_files
TEXT_BUILDERS = ("text", "json", "csv")  # those whose files are text: data.encoding applies to them
DECODE_ERRORS = ("strict", "replace", "skip")  # data.decode_errors: see training.text_decoding
DEFAULT_DECODING = ("utf-8", "strict")  # (codec, decode_errors) of every file before they existed


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DataSettings:
    dataset: str | None
    data_files: str | list[str] | None  # a list after checking (a lone path becomes one)
    dataset_config: str | None
    split: str
    text_column: str
    tokenizer_path: str | None
    vocab_size: int
    tokenizer_sample_mb: int
    block_size: int
    batch_size: int
    val_fraction: float
    samples_per_epoch: int
    max_val_samples: int
    num_proc: int | None
    num_workers: int
    cache_dir: str
    corpus_sentences: int
    seed: int
    encoding: str
    decode_errors: str
    # What follows from the fields above, set by __post_init__:
    builder: str | None = field(init=False)  # `dataset` if it names a builder of LOCAL_BUILDERS
    resolved_files: tuple[Path, ...] = field(init=False)  # the builder's data_files, absolute
    local_dir: Path | None = field(init=False)  # `dataset` as a local dataset directory
    cache_root: Path = field(init=False)  # cache_dir, absolute
    codec: str = field(init=False)  # encoding's canonical name: "latin-1" is "iso8859-1"
    tokenizer: Tokenizer | None = field(init=False, compare=False, repr=False)  # tokenizer_path's

    def __post_init__(self) -> None:
        errors: list[str] = []
        self._check_values(errors)
        data_files, resolved_files = self._resolve_files(errors)
        local_dir = self._resolve_dir(errors)
        tokenizer = self._load_tokenizer(errors)
        codec = self._check_decoding(errors)
        if len(errors) == 1:
            raise ConfigError(f"invalid data settings: {errors[0]}")
        if errors:
            raise ConfigError("invalid data settings:\n  " + "\n  ".join(errors))
        derived = {
            "data_files": data_files,
            "val_fraction": float(self.val_fraction),
            "builder": self.dataset if self.dataset in LOCAL_BUILDERS else None,
            "resolved_files": tuple(resolved_files),
            "local_dir": local_dir,
            "cache_root": Path(self.cache_dir).expanduser().resolve(),
            "codec": codec,
            "tokenizer": tokenizer,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: set here, once

    def _check_values(self, errors: list[str]) -> None:
        dataset = self.dataset
        if dataset is not None and (not isinstance(dataset, str) or not dataset.strip()):
            errors.append(f"data.dataset: must be None or a non-empty string, got {dataset!r}")
        for name in ("split", "text_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                errors.append(f"data.{name}: must be a non-empty string, got {value!r}")
        for name, minimum in (
            ("vocab_size", NUM_BYTES + 1),
            ("tokenizer_sample_mb", 1),
            ("block_size", 1),
            ("batch_size", 1),
            ("samples_per_epoch", 1),
            ("max_val_samples", 1),
            ("num_workers", 0),
            ("corpus_sentences", 1),
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                errors.append(f"data.{name}: must be an int >= {minimum}, got {value!r}")
        num_proc = self.num_proc
        if num_proc is not None and (not _is_int(num_proc) or num_proc < 1):
            errors.append(f"data.num_proc: must be None or an int >= 1, got {num_proc!r}")
        if not _is_int(self.seed):
            errors.append(f"data.seed: must be an int, got {self.seed!r}")
        val_fraction = self.val_fraction
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            errors.append(f"data.val_fraction: must be in (0, 1), got {val_fraction!r}")
        batch_size, samples = self.batch_size, self.samples_per_epoch
        if _is_int(batch_size) and _is_int(samples) and 1 <= samples < batch_size:
            errors.append(
                f"data.samples_per_epoch: {samples} is less than data.batch_size "
                f"{batch_size}: not one full batch per epoch"
            )

    @property
    def decodes_by_default(self) -> bool:
        """True for strict UTF-8 (DEFAULT_DECODING)."""
        return (self.codec, self.decode_errors) == DEFAULT_DECODING

    def _check_decoding(self, errors: list[str]) -> str:
        """The codec of `encoding` (its canonical name); checks `decode_errors` and where they apply."""
        codec = "utf-8"
        try:
            b"a".decode(self.encoding, "ignore")  # LookupError: an unknown or bytes-to-bytes codec
            codec = codecs.lookup(self.encoding).name
        except (LookupError, TypeError):
            errors.append(
                f"data.encoding: {self.encoding!r} is not a text encoding Python knows "
                "(e.g. utf-8, latin-1, cp1252, utf-16)"
            )
        if self.decode_errors not in DECODE_ERRORS:
            errors.append(
                f"data.decode_errors: must be one of {', '.join(DECODE_ERRORS)}, "
                f"got {self.decode_errors!r}"
            )
        elif (codec, self.decode_errors) != DEFAULT_DECODING and self.dataset not in TEXT_BUILDERS:
            errors.append(
                "data.encoding, data.decode_errors: apply to local text files (data.dataset one of "
                f"{', '.join(TEXT_BUILDERS)}), not to data.dataset={self.dataset!r}"
            )
        return codec

    def _resolve_files(self, errors: list[str]) -> tuple[list[str] | None, list[Path]]:
        """(data_files as a list or None, the files a local builder reads: globs expanded)."""
        data_files = [self.data_files] if isinstance(self.data_files, str) else self.data_files
        if data_files is not None and (
            not isinstance(data_files, list)
            or not data_files
            or not all(isinstance(f, str) and f for f in data_files)
        ):
            errors.append(f"data.data_files: must be a path or a list of paths, got {data_files!r}")
            data_files = None
        if self.dataset is None and data_files:
            errors.append(
                "data.data_files: set, but data.dataset is None (the built-in corpus); set "
                f"data.dataset to one of {LOCAL_BUILDERS} to read these files"
            )
        resolved: list[Path] = []
        if self.dataset not in LOCAL_BUILDERS:
            return data_files, resolved
        if not data_files:
            errors.append(f"data.data_files: required with data.dataset={self.dataset!r}")
        for pattern in data_files or []:
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
                if not matches:
                    errors.append(f"data.data_files: no file matches: {pattern}")
                resolved += [Path(m).resolve() for m in matches]
            else:
                path = Path(pattern).expanduser()
                if not path.is_file():
                    errors.append(f"data.data_files: no such file: {pattern}")
                resolved.append(path.resolve())
        return data_files, resolved

    def _resolve_dir(self, errors: list[str]) -> Path | None:
        """`dataset` as a local dataset directory, if it is one."""
        dataset = self.dataset
        if dataset in LOCAL_BUILDERS or not isinstance(dataset, str) or not dataset.strip():
            return None
        path = Path(dataset).expanduser()
        if path.is_file():
            errors.append(
                f"data.dataset: {dataset} is a file; use data.dataset=<one of {LOCAL_BUILDERS}> "
                "and data.data_files=<that file>"
            )
        return path.resolve() if path.is_dir() else None

    def _load_tokenizer(self, errors: list[str]) -> Tokenizer | None:
        if self.tokenizer_path is None:
            return None
        try:
            return Tokenizer.from_file(self.tokenizer_path)
        except TokenizerError as e:
            errors.append(f"data.tokenizer_path: {e}")
            return None
