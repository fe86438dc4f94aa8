"""The token cache of `TextDataModule`: text -> byte-level BPE tokens -> one packed token file per split.

    data_cache/builtin-1f0c2a9d3b5e7a11/
        meta.json        # dtype, tokens/characters/documents per split, vocab size, fingerprint,
                         # local files left out (no text) or with undecodable bytes
        tokenizer.json   # the tokenizer the tokens were made with
        train.bin        # every training token, end to end, raw np.uint16 (np.uint32 above 65536)
        val.bin
        corpus.txt       # the built-in corpus only: the text itself, one sentence per line

`TokenCache(settings).path` is named by a hash (the fingerprint) of everything that determines the
directory's contents: the source (the built-in corpus generator's code, or the dataset, its
files' sizes and times, their encoding and decode_errors unless strict UTF-8), the split, the tokenizer's settings (or the given tokenizer's bytes), the
seed, the cache format. Settings that change the contents get a new directory; the same settings
find the one built before.

`build` reads the text (the built-in corpus of `attnlm.corpus` and local text files streamed by
`training.token_writer.TextFileSource`, one document a line, validation lines drawn per block;
json/csv/parquet files, a local dataset directory or a Hub dataset through `datasets`
(`training.data_loading`), validation data split off unless the dataset has its own), trains a
tokenizer on a bounded sample of the training text (`data.tokenizer_sample_mb`, unless one is
given), and tokenizes every split in bounded memory straight into its token file, EOT after each
document (empty ones are skipped and counted), with a progress bar and the MB/s in meta.json
(`training.token_writer.tokenize_to_files`, `data.num_proc` worker processes if set).
It writes into a temporary directory that is renamed into place (`attnlm.atomic.atomic_folder`):
a crashed or killed run never leaves half a cache at `path` (the next build of the same cache
deletes a killed build's temporary folder), and of two processes building the same cache one
wins and the other uses its result.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

import attnlm.corpus
from attnlm.atomic import atomic_folder
from attnlm.corpus import write_corpus
from attnlm.tokenizer import Tokenizer
from training.data_loading import check_local_files, load_splits
from training.data_settings import DataSettings
from training.token_writer import DatasetSource, TextFileSource, tokenize_to_files

# bump when the layout or the meaning of the cache files changes (2: text files streamed, their
# validation lines drawn per block; tokenizer trained on a bounded sample)
CACHE_FORMAT = 2
BUILDER_FILE = "builder.json"  # in a build's temporary folder: who builds it (host, pid)
TOKENIZER_MIN_FREQUENCY = 2
META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def build_notes(meta: dict[str, Any]) -> list[str]:
    """What a build left out or changed of the text, one line each (for the log)."""
    notes = []
    empty = {name: split.get("empty_documents", 0) for name, split in meta["splits"].items()}
    if any(empty.values()):
        counts = ", ".join(f"{name} {n:,}" for name, n in empty.items())
        notes.append(f"skipped {sum(empty.values()):,} empty documents ({counts})")
    files = meta.get("files", {})
    if files.get("left_out_without_text"):
        notes.append(f"left out files without text: {', '.join(files['left_out_without_text'])}")
    decode_errors = files.get("decode_errors")
    for f in decode_errors["files"] if decode_errors else []:
        if decode_errors["policy"] == "replace":
            notes.append(
                f"replaced {f['bad_bytes']:,} undecodable bytes with U+FFFD on {f['bad_lines']:,} "
                f"lines of {f['file']} (data.decode_errors=replace)"
            )
        else:
            notes.append(
                f"dropped {f['bad_lines']:,} lines holding {f['bad_bytes']:,} undecodable bytes "
                f"from {f['file']} (data.decode_errors=skip)"
            )
    return notes


def _file_signature(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_inputs(settings: DataSettings) -> dict[str, Any]:
    """Everything that determines the cache's contents (JSON-serialisable)."""
    s = settings
    inputs: dict[str, Any] = {"format": CACHE_FORMAT, "seed": s.seed}
    if s.dataset is None:
        inputs["source"] = {
            "builtin": s.corpus_sentences,
            "generator_sha256": _sha256_file(Path(attnlm.corpus.__file__)),
        }
    else:
        inputs["source"] = {
            "dataset": s.dataset if s.local_dir is None else str(s.local_dir),
            "dataset_config": s.dataset_config,
            "data_files": (
                [_file_signature(p) for p in s.resolved_files]
                if s.builder is not None
                else s.data_files
            ),
            "split": s.split,
            "text_column": s.text_column,
        }
        if not s.decodes_by_default:
            inputs["source"]["decoding"] = [s.codec, s.decode_errors]
        if s.local_dir is not None:
            inputs["source"]["dir_files"] = [
                _file_signature(p)
                for p in sorted(s.local_dir.rglob("*"))
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(s.local_dir).parts)
            ]
        inputs["val_fraction"] = s.val_fraction
    if s.tokenizer is not None:
        inputs["tokenizer"] = {"sha256": _sha256_file(Path(s.tokenizer_path))}
    else:
        inputs["tokenizer"] = {
            "train_vocab_size": s.vocab_size,
            "min_frequency": TOKENIZER_MIN_FREQUENCY,
            "sample_mb": s.tokenizer_sample_mb,
            "tokenizers": tokenizers.__version__,
        }
    if s.dataset is None:
        inputs["val_fraction"] = s.val_fraction
    return inputs


def _cache_slug(settings: DataSettings) -> str:
    """The readable half of the cache's name: what the text came from."""
    if settings.dataset is None:
        slug = "builtin"
    elif settings.builder is not None:
        slug = f"{settings.builder}-{settings.resolved_files[0].stem}"
    elif settings.local_dir is not None:
        slug = settings.local_dir.name
    else:
        slug = settings.dataset.replace("/", "--")
    return re.sub(r"[^A-Za-z0-9._-]+", "_", slug)[:48]


class TokenCache:
    """The cache directory of one `DataSettings`: its name, building it, reading its meta.json."""

    def __init__(self, settings: DataSettings) -> None:
        self.settings = settings
        self.fingerprint_inputs = fingerprint_inputs(settings)
        digest = hashlib.sha256(
            json.dumps(self.fingerprint_inputs, sort_keys=True).encode()
        ).hexdigest()
        self.fingerprint = digest[:16]
        self.path = settings.cache_root / f"{_cache_slug(settings)}-{self.fingerprint}"

    def is_built(self) -> bool:
        """True if the cache is there, finished; raises if something else is in its place."""
        if (self.path / META_FILE).is_file():
            return True
        if self.path.exists():
            raise RuntimeError(
                f"data: {self.path} exists but has no meta.json (not a finished cache); "
                "delete it to rebuild"
            )
        return False

    def read_meta(self) -> dict[str, Any]:
        """The contents of meta.json; raises if the cache was not built."""
        meta_file = self.path / META_FILE
        if not meta_file.is_file():
            raise RuntimeError(
                f"data: no token cache at {self.path}; call prepare_data() first (Trainer.fit does)"
            )
        return json.loads(meta_file.read_text(encoding="utf-8"))

    def build(self, progress: bool = True) -> dict[str, Any]:
        """Build the cache (call it where `is_built()` is False); return its meta.json contents.

        Temporary folders of this cache left by a build that was killed (its process is gone)
        are deleted first; they were never trusted (only a folder with meta.json at `path` is).
        """
        self.remove_abandoned_builds()
        try:
            with atomic_folder(self.path, replace=False) as tmp:
                builder = {"host": socket.gethostname(), "pid": os.getpid()}
                (tmp / BUILDER_FILE).write_text(json.dumps(builder), encoding="utf-8")
                meta = self._build(tmp, progress)
                (tmp / BUILDER_FILE).unlink()
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        except FileExistsError:
            if not self.is_built():
                raise
            return self.read_meta()  # another process finished the same cache first
        return meta

    def abandoned_builds(self) -> list[Path]:
        """Temporary folders of this cache whose builder, on this host, is no longer running."""
        found = []
        for tmp in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            try:
                builder = json.loads((tmp / BUILDER_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # just created, or not ours: left alone
            if builder.get("host") == socket.gethostname() and not _pid_alive(builder.get("pid")):
                found.append(tmp)
        return found

    def remove_abandoned_builds(self) -> None:
        for tmp in self.abandoned_builds():
            shutil.rmtree(tmp, ignore_errors=True)

    def _sources(self, tmp: Path) -> tuple[list[Any], str, dict[str, Any]]:
        """(the sources of the two splits, where the validation data comes from, file notes)."""
        s = self.settings
        if s.dataset is None or (s.builder == "text" and s.split == "train"):
            if s.dataset is None:
                paths = [write_corpus(tmp / "corpus.txt", s.corpus_sentences, seed=s.seed)]
                files: dict[str, Any] = {}
            else:
                paths, _, files = check_local_files(s, tmp / "decoded")
            source = TextFileSource(paths, s.val_fraction, s.seed)
            return [source], source.val_source, files
        loaded = load_splits(s, tmp)  # json, csv, parquet, a dataset folder, the Hub, slices
        sources = [
            DatasetSource("train", loaded.train, s.text_column),
            DatasetSource("val", loaded.val, s.text_column),
        ]
        return sources, loaded.val_source, loaded.files

    def _build(self, tmp: Path, progress: bool) -> dict[str, Any]:
        s = self.settings
        t0 = time.perf_counter()
        sources, val_source, files = self._sources(tmp)
        t_load = time.perf_counter()
        sample_bytes = s.tokenizer_sample_mb << 20
        if s.tokenizer is not None:
            tokenizer = s.tokenizer
        else:
            tokenizer = Tokenizer.train(
                sources[0].sample(sample_bytes),
                vocab_size=s.vocab_size,
                min_frequency=TOKENIZER_MIN_FREQUENCY,
            )
        tokenizer.save(tmp / "tokenizer.json")
        t_tok = time.perf_counter()
        dtype = token_dtype(tokenizer.vocab_size)
        stats = tokenize_to_files(sources, tokenizer, tmp, dtype, s.num_proc, progress)
        t_done = time.perf_counter()
        for scratch in ("arrow", "hf", "decoded"):
            shutil.rmtree(tmp / scratch, ignore_errors=True)
        return {
            "format": CACHE_FORMAT,
            "fingerprint": self.fingerprint,
            "fingerprint_inputs": self.fingerprint_inputs,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "val_source": val_source,
            "splits": {name: vars(counts) for name, counts in stats.splits.items()},
            "files": files,
            "tokenize": stats.to_dict(),
            "build_seconds": round(t_done - t0, 3),
            "seconds": {
                "load": round(t_load - t0, 3),
                "train_tokenizer": round(t_tok - t_load, 3),
                "tokenize": round(t_done - t_tok, 3),
            },
        }


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
