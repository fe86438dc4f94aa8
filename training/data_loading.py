"""The text of the `data:` settings as `datasets` splits, or one clear line saying why not.

`load_splits(settings, tmp)` loads the training split and the validation data (the dataset's own
"validation" or "test" split, else `val_fraction` of the training split) from:

- the built-in corpus (`attnlm.corpus`), written to `tmp/corpus.txt` and read as text;
- local text, json or csv files, checked and decoded first (`training.text_decoding`: bytes
  that are not `data.encoding` stop the command naming file, line and byte offset, unless
  `data.decode_errors` replaces them or skips their lines); files with no text are left out,
  and when no file has text that is the error;
- local parquet files, a local dataset directory, or a Hub dataset. Before a Hub dataset is
  fetched, a request of a few seconds tells whether the Hub answers at all (rather than
  `datasets` retrying for half a minute).

What `datasets` raises deep inside (a `DatasetGenerationError` around the real error, a
`ConnectionError` when the Hub is out of reach) becomes one `ValueError` line naming the file,
the line of a malformed JSON record, or the dataset and what to do; so do a text column that is
missing, not strings, or empty in every document.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets.exceptions import DatasetGenerationError
from huggingface_hub import constants as hub_constants

from attnlm.corpus import write_corpus
from training.data_settings import TEXT_BUILDERS, DataSettings
from training.text_decoding import prepare_file

VAL_SPLIT_NAMES = ("validation", "test")  # used as validation data when the dataset has them
HUB_PROBE_TIMEOUT_S = 5.0
LOCAL_FILES_HINT = "--data.dataset text --data.data_files FILE (or json, parquet, csv)"


@dataclass
class LoadedText:
    train: datasets.Dataset
    val: datasets.Dataset
    val_source: str  # where the validation data came from, for meta.json
    # what checking local files found: files left out for having no text, files with
    # undecodable bytes replaced or skipped (see training.text_decoding)
    files: dict[str, Any] = field(default_factory=dict)


def load_splits(settings: DataSettings, tmp: Path) -> LoadedText:
    """Load the settings' text (`tmp`: the cache's build folder, for files not worth keeping)."""
    s = settings
    files: dict[str, Any] = {}
    copies: dict[str, Path] = {}  # the file datasets reads -> the user's file
    if s.dataset is None:
        corpus = write_corpus(tmp / "corpus.txt", s.corpus_sentences, seed=s.seed)
        path, name, data_files = "text", None, [str(corpus)]
        hf_cache = tmp / "hf"  # nothing here is worth keeping past this build
    elif s.builder is not None:
        path, name = s.builder, s.dataset_config
        read, copies, files = check_local_files(s, tmp / "decoded")
        data_files = [str(r) for r in read]
        hf_cache = tmp / "hf" if copies else s.cache_root / "hf"
    else:
        path = str(s.local_dir) if s.local_dir is not None else s.dataset
        name, data_files = s.dataset_config, s.data_files
        hf_cache = s.cache_root / "hf"
        if s.local_dir is None and s.dataset not in _packaged_builders():
            _check_hub_reachable(s.dataset, hf_cache)
    kwargs = {"name": name, "data_files": data_files, "cache_dir": str(hf_cache)}
    loaded = _load(s, path, kwargs, hf_cache, copies)
    if not isinstance(loaded, datasets.DatasetDict):
        raise ValueError(f"data.dataset: {s.dataset!r} did not load as a dataset with splits")
    base_split = s.split.split("[", 1)[0]
    if s.split in loaded:
        train = loaded[s.split]
    elif base_split in loaded:
        train = _load(s, path, {**kwargs, "split": s.split}, hf_cache, copies)  # slicing syntax
    else:
        raise ValueError(
            f"data.split: {s.split!r} is not a split of the dataset; it has {list(loaded)}"
        )
    _check_text_column(train, s.text_column, s.split)
    for val_name in VAL_SPLIT_NAMES:
        if val_name in loaded and val_name != base_split:
            _check_text_column(loaded[val_name], s.text_column, val_name)
            return LoadedText(train, loaded[val_name], f"split {val_name!r}", files)
    if len(train) < 2:
        raise ValueError(
            f"data: the {s.split!r} split has {len(train)} document(s); splitting off "
            "validation data needs at least 2"
        )
    parts = train.train_test_split(
        test_size=s.val_fraction,
        seed=s.seed,
        shuffle=True,
        train_indices_cache_file_name=str(tmp / "arrow" / "train_indices.arrow"),
        test_indices_cache_file_name=str(tmp / "arrow" / "val_indices.arrow"),
    )
    source = f"val_fraction={s.val_fraction} of {s.split!r}"
    return LoadedText(parts["train"], parts["test"], source, files)


def check_local_files(
    s: DataSettings, copy_dir: Path
) -> tuple[list[Path], dict[str, Path], dict[str, Any]]:
    """(the files datasets should read, {decoded copy: the user's file}, what checking found)."""
    read: list[Path] = []
    copies: dict[str, Path] = {}
    empty: list[str] = []
    decoded: list[dict[str, Any]] = []
    for i, path in enumerate(s.resolved_files):
        if s.builder not in TEXT_BUILDERS:  # parquet: binary, read as it is
            source, has_text = path, path.stat().st_size > 0
        else:
            source, found = prepare_file(
                path, s.codec, s.encoding, s.decode_errors, copy_dir / f"{i}-{path.name}"
            )
            has_text = found.has_text
            if found.bad_lines:
                decoded.append(
                    {"file": str(path), "bad_bytes": found.bad_bytes, "bad_lines": found.bad_lines}
                )
        if not has_text:
            empty.append(str(path))
            continue
        read.append(source)
        if source != path:
            copies[str(source)] = path
    if not read:
        if len(empty) == 1:
            raise ValueError(
                f"data.data_files: {empty[0]} has no text (it is empty or holds only blank lines)"
            )
        raise ValueError(
            f"data.data_files: none of the {len(empty)} files has text (each is empty or holds "
            f"only blank lines): {', '.join(empty)}"
        )
    files: dict[str, Any] = {}
    if empty:
        files["left_out_without_text"] = empty
    if decoded:
        files["decode_errors"] = {"policy": s.decode_errors, "files": decoded}
    return read, copies, files


def _packaged_builders() -> set[str]:
    """The builders `datasets` ships (arrow, pandas, ...): they read local files, not the Hub."""
    return set(getattr(datasets.packaged_modules, "_PACKAGED_DATASETS_MODULES", {}))


def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the Hub at `endpoint` does not answer an HTTP request within `timeout` s (None if it
    answers, whatever the status). Proxies in the environment are used, as downloads use them."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None  # it answered
    except urllib.error.URLError as err:
        return str(err.reason)
    except (OSError, ValueError) as err:  # a timeout, a reset; a malformed HF_ENDPOINT
        return str(err) or type(err).__name__
    return None


def _check_hub_reachable(dataset: str, hf_cache: Path) -> None:
    if datasets.config.HF_HUB_OFFLINE:
        return  # datasets looks in the local cache only, and fails at once (see _load)
    endpoint = hub_constants.ENDPOINT
    reason = hub_unreachable(endpoint)
    if reason is not None:
        raise ValueError(
            f"data.dataset: {dataset!r} is not a local builder or folder, so it comes from the "
            f"Hugging Face Hub, which did not answer at {endpoint} ({reason}). To proceed: with a "
            f"copy downloaded before (into {hf_cache}), set HF_HUB_OFFLINE=1; or train on local "
            f"files: {LOCAL_FILES_HINT}"
        )


def _load(
    s: DataSettings, path: str, kwargs: dict[str, Any], hf_cache: Path, copies: dict[str, Path]
) -> Any:
    """`datasets.load_dataset(path, **kwargs)`, its errors as one line."""
    try:
        return datasets.load_dataset(path, **kwargs)
    except ConnectionError as err:  # OfflineModeIsEnabled is one
        if datasets.config.HF_HUB_OFFLINE:
            raise ValueError(
                f"data.dataset: {s.dataset!r} is not in the local cache ({hf_cache}), and "
                "HF_HUB_OFFLINE=1 keeps the Hugging Face Hub out of reach. To proceed: download "
                f"it once with network access (HF_HUB_OFFLINE=0), or train on local files: "
                f"{LOCAL_FILES_HINT}"
            ) from err
        raise ValueError(
            f"data.dataset: could not fetch {s.dataset!r} from the Hub: {err}"
        ) from err
    except (DatasetGenerationError, pa.ArrowException) as err:  # a builder's, or arrow's itself
        cause = (
            (err.__cause__ or err.__context__ or err)
            if isinstance(err, DatasetGenerationError)
            else err
        )
        read = kwargs["data_files"] if isinstance(kwargs["data_files"], list) else []
        if s.builder == "json":
            bad = _first_bad_json_line([Path(f) for f in read])
            if bad is not None:
                file, line, problem = bad
                raise ValueError(
                    f"data.data_files: {copies.get(str(file), file)} line {line} is not valid "
                    f"JSON ({problem}); a JSON Lines file holds one JSON object per line"
                ) from err
        names = ", ".join(str(copies.get(f, f)) for f in read[:3]) + (
            " ..." if len(read) > 3 else ""
        )
        what = f"{s.builder or 'dataset'} {names or s.dataset}"
        raise ValueError(f"data: could not read {what}: {_first_line(cause)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else '(no message)'}"


def _first_bad_json_line(files: list[Path]) -> tuple[Path, int, str] | None:
    """(file, line, what is wrong) of the first line of `files` that is not a JSON value."""
    for file in files:
        with open(file, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    json.loads(line)
                except ValueError as err:
                    problem = f"{err.msg}, column {err.colno}" if hasattr(err, "msg") else str(err)
                    return file, number, problem
    return None


def _check_text_column(ds: datasets.Dataset, column: str, split: str) -> None:
    feature = ds.features.get(column)
    if feature is None:
        raise ValueError(
            f"data.text_column: no column {column!r}; the dataset has {list(ds.features)}"
        )
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"data.text_column: column {column!r} holds {feature}, not strings")
    for batch in ds.with_format("arrow").select_columns([column]).iter(batch_size=1 << 16):
        if pc.any(pc.greater(pc.utf8_length(batch[column]), 0)).as_py():
            return
    raise ValueError(
        f"data: the {split!r} split has no text: column {column!r} is empty in every one of its "
        f"{len(ds)} documents"
    )
