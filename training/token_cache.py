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

`build` loads the text (`training.data_loading`: the built-in corpus of `attnlm.corpus`, local
text/json/parquet/csv files, a local dataset directory, or a Hub dataset; validation data split
off unless the dataset has its own), trains a tokenizer on the training split (unless one is
given), tokenizes with EOT after each document (empty ones are skipped and counted), and packs
each split into one flat token file. It writes into a temporary
directory that is renamed into place (`attnlm.atomic.atomic_folder`): a crashed run never leaves
half a cache, and of two processes building the same cache one wins and the other uses its result.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import tokenizers

import attnlm.corpus
from attnlm.atomic import atomic_folder
from attnlm.tokenizer import Tokenizer
from training.data_loading import load_splits
from training.data_settings import DataSettings

CACHE_FORMAT = 1  # bump when the layout or the meaning of the cache files changes
TOKENIZER_MIN_FREQUENCY = 2
META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class _TokenizeBatch:
    """`datasets.map` function: texts -> ids with EOT appended; empty documents are dropped."""

    def __init__(self, tokenizer: Tokenizer, text_column: str) -> None:
        self.tokenizer = tokenizer
        self.text_column = text_column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        texts = [t or "" for t in batch[self.text_column]]  # None counts as empty
        eot = self.tokenizer.eot_id
        ids = self.tokenizer.encode_batch(texts)
        return {
            "ids": [x + [eot] if t else [] for x, t in zip(ids, texts, strict=True)],
            # EOT stands for the separator between documents: one character, like a newline
            "n_chars": [len(t) + 1 if t else 0 for t in texts],
        }


def _text_batches(
    ds: datasets.Dataset, text_column: str, batch_size: int = 1000
) -> Iterator[list[str]]:
    for batch in ds.select_columns([text_column]).iter(batch_size=batch_size):
        yield [t for t in batch[text_column] if t]


def _pack(tokenized: datasets.Dataset, path: Path, dtype: np.dtype) -> dict[str, int]:
    """Write the `ids` column end to end into a raw token file; return the split's counts."""
    column = tokenized.data.column("ids")  # ChunkedArray of list<uint>
    num_tokens = sum(len(chunk.flatten()) for chunk in column.chunks)
    if num_tokens == 0:
        path.write_bytes(b"")  # np.memmap cannot map an empty file
    else:
        out = np.memmap(path, dtype=dtype, mode="w+", shape=(num_tokens,))
        pos = 0
        for chunk in column.chunks:
            flat = chunk.flatten().to_numpy(zero_copy_only=False)
            out[pos : pos + len(flat)] = flat
            pos += len(flat)
        out.flush()
        del out
    n_chars = np.asarray(tokenized.data.column("n_chars").to_numpy(), dtype=np.int64)
    documents = int((n_chars > 0).sum())
    return {
        "tokens": num_tokens,
        "chars": int(n_chars.sum()),
        "documents": documents,
        "empty_documents": len(n_chars) - documents,  # skipped: no text, no tokens
    }


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

    def build(self) -> dict[str, Any]:
        """Build the cache (call it where `is_built()` is False); return its meta.json contents."""
        try:
            with atomic_folder(self.path, replace=False) as tmp:
                meta = self._build(tmp)
                (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        except FileExistsError:
            if not self.is_built():
                raise
            return self.read_meta()  # another process finished the same cache first
        return meta

    def _build(self, tmp: Path) -> dict[str, Any]:
        s = self.settings
        t0 = time.perf_counter()
        loaded = load_splits(s, tmp)
        train, val = loaded.train, loaded.val
        t_load = time.perf_counter()
        if s.tokenizer is not None:
            tokenizer = s.tokenizer
        else:
            tokenizer = Tokenizer.train(
                _text_batches(train, s.text_column),
                vocab_size=s.vocab_size,
                min_frequency=TOKENIZER_MIN_FREQUENCY,
            )
        tokenizer.save(tmp / "tokenizer.json")
        t_tok = time.perf_counter()
        dtype = token_dtype(tokenizer.vocab_size)
        list_feature = getattr(datasets, "List", datasets.Sequence)  # List since datasets 4
        features = datasets.Features(
            {"ids": list_feature(datasets.Value(dtype.name)), "n_chars": datasets.Value("int64")}
        )
        splits = {}
        for name, ds in (("train", train), ("val", val)):
            tokenized = ds.map(
                _TokenizeBatch(tokenizer, s.text_column),
                batched=True,
                batch_size=1000,
                num_proc=s.num_proc,
                remove_columns=ds.column_names,
                features=features,
                cache_file_name=str(tmp / "arrow" / f"{name}.arrow"),
                load_from_cache_file=False,
                new_fingerprint=f"{self.fingerprint}-{name}",
                desc=f"tokenizing {name}",
            )
            splits[name] = _pack(tokenized, tmp / f"{name}.bin", dtype)
            del tokenized
        t_pack = time.perf_counter()
        for scratch in ("arrow", "hf", "decoded"):
            shutil.rmtree(tmp / scratch, ignore_errors=True)
        return {
            "format": CACHE_FORMAT,
            "fingerprint": self.fingerprint,
            "fingerprint_inputs": self.fingerprint_inputs,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "val_source": loaded.val_source,
            "splits": splits,
            "files": loaded.files,
            "build_seconds": round(t_pack - t0, 3),
            "seconds": {
                "load": round(t_load - t0, 3),
                "train_tokenizer": round(t_tok - t_load, 3),
                "tokenize_and_pack": round(t_pack - t_tok, 3),
            },
        }
