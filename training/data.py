"""Training data: text -> byte-level BPE tokens -> one packed token file per split -> windows.

`TextDataModule` is the `data:` section of the LightningCLI config. Its pipeline:

1. `prepare_data` (Lightning runs it on local rank 0 only) builds a cache directory unless one with
   the same settings exists: load the text with `datasets.load_dataset` (the built-in corpus of
   `attnlm.corpus`, local text/json/parquet/csv files, a local dataset directory, or a Hub dataset),
   split off validation data, train a tokenizer on the training split (unless `tokenizer_path` is
   given), tokenize with EOT after each document, and pack each split into one flat token file::

       data_cache/builtin-1f0c2a9d3b5e7a11/
           meta.json        # dtype, tokens/characters/documents per split, vocab size, fingerprint
           tokenizer.json   # the tokenizer the tokens were made with
           train.bin        # every training token, end to end, raw np.uint16 (np.uint32 above 65536)
           val.bin
           corpus.txt       # the built-in corpus only: the text itself, one sentence per line

   The directory is named by a hash of everything that determines its contents, and is written as a
   temporary directory then renamed, so a crashed run never leaves half a cache and a second run
   with the same settings reuses it.
2. `setup` (every rank) memory-maps the token files read-only and loads the tokenizer.
3. Training batches are random windows of `block_size + 1` tokens (inputs and shifted targets).
   Window `i` of epoch `e` starts at an offset hashed from `(seed, e, i)`. `EpochWindowSampler`
   (a `DistributedSampler`, so Lightning keeps it under DDP and calls its `set_epoch`) yields the
   indices `e * samples_per_epoch + i`, this rank's share of them, and the dataset decodes the epoch
   from the index. So DataLoader workers need no shared state, every epoch sees new windows, ranks
   see disjoint windows, and a run resumed at epoch `e` sees the same windows as the original.
   The training loader (`ResumableDataLoader`) is saved in checkpoints with how many batches of
   the epoch were trained on; on resume its sampler skips exactly those, so an interrupted and
   resumed run trains on the same batches, in the same order, as an uninterrupted one.
   Validation uses consecutive non-overlapping windows of the validation split.

Run (build the default cache and print its summary):
    python -m training.data
"""

import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import lightning as L
import numpy as np
import tokenizers
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import attnlm.corpus
from attnlm.corpus import write_corpus
from attnlm.tokenizer import NUM_BYTES, Tokenizer, TokenizerError

CACHE_FORMAT = 1  # bump when the layout or the meaning of the cache files changes
LOCAL_BUILDERS = ("text", "json", "parquet", "csv")  # `datasets` builders that read data_files
VAL_SPLIT_NAMES = ("validation", "test")  # used as validation data when the dataset has them
TOKENIZER_MIN_FREQUENCY = 2
_MASK64 = (1 << 64) - 1


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a `vocab_size` vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def window_start(seed: int, epoch: int, index: int, num_starts: int) -> int:
    """Start of training window `index` of `epoch`: uniform in [0, num_starts), pure function."""
    h = _splitmix64(_splitmix64(_splitmix64(seed & _MASK64) ^ epoch) ^ index)
    return h % num_starts


class _TokenWindows(Dataset):
    """Windows of `block_size + 1` tokens of a packed token file, as (x, y) int64 tensors.

    The file is memory-mapped lazily in each process that reads it; pickling (to DataLoader
    workers) carries the path, never the tokens.
    """

    def __init__(self, path: Path, dtype: np.dtype, num_tokens: int, block_size: int) -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.num_tokens = num_tokens
        self.block_size = block_size
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        """All tokens of the split, memory-mapped read-only: (num_tokens,)."""
        if self._tokens is None:
            self._tokens = np.memmap(
                self.path, dtype=self.dtype, mode="r", shape=(self.num_tokens,)
            )
        return self._tokens

    def window(self, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs `tokens[start : start+T]` and targets `tokens[start+1 : start+T+1]`."""
        chunk = np.array(self.tokens[start : start + self.block_size + 1], dtype=np.int64)
        chunk = torch.from_numpy(chunk)  # (T+1,)
        return chunk[:-1], chunk[1:]  # (T,), (T,)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state


class RandomWindowDataset(_TokenWindows):
    """`samples_per_epoch` random training windows per epoch.

    Index `k` means window `k % samples_per_epoch` of epoch `k // samples_per_epoch`; its start is
    `window_start(seed, epoch, i, num_tokens - block_size)`. `EpochWindowSampler` yields such indices.
    """

    def __init__(
        self,
        path: Path,
        dtype: np.dtype,
        num_tokens: int,
        block_size: int,
        samples_per_epoch: int,
        seed: int,
    ) -> None:
        super().__init__(path, dtype, num_tokens, block_size)
        self.samples_per_epoch = samples_per_epoch
        self.seed = seed
        self.num_starts = num_tokens - block_size  # starts 0 .. num_tokens - (T+1)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def start(self, index: int) -> int:
        """Offset of window `index` (which encodes its epoch)."""
        epoch, i = divmod(int(index), self.samples_per_epoch)
        return window_start(self.seed, epoch, i, self.num_starts)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.window(self.start(index))


class ConsecutiveWindowDataset(_TokenWindows):
    """Non-overlapping windows `[i*T, i*T + T + 1)` from the start of a split, at most `max_windows`.

    Consecutive windows share one boundary token, so every target token is scored exactly once.
    """

    def __init__(
        self, path: Path, dtype: np.dtype, num_tokens: int, block_size: int, max_windows: int
    ) -> None:
        super().__init__(path, dtype, num_tokens, block_size)
        self.num_windows = min((num_tokens - 1) // block_size, max_windows)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.num_windows:
            raise IndexError(f"window {index} out of range [0, {self.num_windows})")
        return self.window(index * self.block_size)


class EpochWindowSampler(DistributedSampler):
    """Yields `epoch * len(dataset) + i` for this rank's share of `i in range(len(dataset))`.

    Rank `r` of `n` takes `i = r, r + n, r + 2n, ...` (the remainder of `len(dataset) / n` is
    dropped). Lightning calls `set_epoch` before each training epoch and, since this is a
    `DistributedSampler`, leaves it in place under DDP. Outside Lightning, call `set_epoch` yourself.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True
        )
        self._resume: tuple[int, int] | None = None

    def resume_at(self, epoch: int, samples: int) -> None:
        """Make the next pass over `epoch` skip this rank's first `samples` indices (the ones a
        resumed run already trained on); a pass over any other epoch ignores it."""
        self._resume = (epoch, samples)

    def __iter__(self) -> Iterator[int]:
        skip = 0
        if self._resume is not None:
            if self._resume[0] == self.epoch:
                skip = min(self._resume[1], self.num_samples)
            self._resume = None
        base = self.epoch * len(self.dataset)
        start = base + self.rank + skip * self.num_replicas
        return iter(range(start, base + self.num_samples * self.num_replicas, self.num_replicas))


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning saves in checkpoints (it has `state_dict`/`load_state_dict`):
    the epoch and how many of its batches were trained on; on resume its `EpochWindowSampler`
    skips them, so a resumed run sees exactly the windows an uninterrupted one would.

    `progress()` returns (epoch, batches consumed this epoch) from the trainer's loop counters
    rather than from this loader's own iterator, which Lightning prefetches ahead of training.
    """

    def __init__(self, *args: Any, progress: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        return {"epoch": epoch, "batches": batches, "batch_size": self.batch_size}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if state_dict and isinstance(self.sampler, EpochWindowSampler):
            samples = state_dict["batches"] * state_dict["batch_size"]
            self.sampler.resume_at(state_dict["epoch"], samples)


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
    return {
        "tokens": num_tokens,
        "chars": int(n_chars.sum()),
        "documents": int((n_chars > 0).sum()),
    }


def _file_signature(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class TextDataModule(L.LightningDataModule):
    """Tokenized, packed text as random training windows and consecutive validation windows."""

    def __init__(
        self,
        dataset: str | None = None,
        data_files: str | list[str] | None = None,
        dataset_config: str | None = None,
        split: str = "train",
        text_column: str = "text",
        tokenizer_path: str | None = None,
        vocab_size: int = 512,
        block_size: int = 64,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        samples_per_epoch: int = 100_000,
        max_val_samples: int = 2_000,
        num_proc: int | None = None,
        num_workers: int = 0,
        cache_dir: str = "data_cache",
        corpus_sentences: int = 100_000,
        seed: int = 1337,
    ) -> None:
        """Validate the settings; nothing is read or built until `prepare_data`.

        Args:
            dataset: None for the built-in corpus (`attnlm.corpus`); "text", "json", "parquet" or
                "csv" for local files given in `data_files`; any other string is passed to
                `datasets.load_dataset`: a local dataset directory or a Hub dataset name.
            data_files: file paths or glob patterns. Required for the local builders; for a dataset
                directory or Hub dataset, files inside it.
            dataset_config: the dataset's configuration name (`load_dataset(name=...)`).
            split: the split to train on; `datasets` slicing works ("train[:10%]").
            text_column: the column holding the documents' text.
            tokenizer_path: a `tokenizer.json` to use; None trains one on the training split.
            vocab_size: vocabulary size of the tokenizer to train (>= 257: 256 bytes + EOT). On a
                small corpus the trained vocabulary can come out smaller.
            block_size: training window length T (windows hold T + 1 tokens).
            batch_size: windows per batch, per device.
            val_fraction: fraction of documents held out for validation when the dataset has no
                "validation" or "test" split.
            samples_per_epoch: random training windows per epoch, over all devices.
            max_val_samples: the most validation windows.
            num_proc: processes for tokenizing with `datasets.map` (None: in this process).
            num_workers: DataLoader worker processes.
            cache_dir: where token caches (and `datasets` downloads) are kept.
            corpus_sentences: sentences in the built-in corpus.
            seed: seeds the built-in corpus, the validation split and the training windows.
        """
        super().__init__()
        self.save_hyperparameters()
        errors: list[str] = []
        builder = dataset if dataset in LOCAL_BUILDERS else None
        if dataset is not None and (not isinstance(dataset, str) or not dataset.strip()):
            errors.append(f"data.dataset: must be None or a non-empty string, got {dataset!r}")
        for name, value in (("split", split), ("text_column", text_column)):
            if not isinstance(value, str) or not value:
                errors.append(f"data.{name}: must be a non-empty string, got {value!r}")
        for name, value, minimum in (
            ("vocab_size", vocab_size, NUM_BYTES + 1),
            ("block_size", block_size, 1),
            ("batch_size", batch_size, 1),
            ("samples_per_epoch", samples_per_epoch, 1),
            ("max_val_samples", max_val_samples, 1),
            ("num_workers", num_workers, 0),
            ("corpus_sentences", corpus_sentences, 1),
        ):
            if not _is_int(value) or value < minimum:
                errors.append(f"data.{name}: must be an int >= {minimum}, got {value!r}")
        if num_proc is not None and (not _is_int(num_proc) or num_proc < 1):
            errors.append(f"data.num_proc: must be None or an int >= 1, got {num_proc!r}")
        if not _is_int(seed):
            errors.append(f"data.seed: must be an int, got {seed!r}")
        if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
            errors.append(f"data.val_fraction: must be in (0, 1), got {val_fraction!r}")
        if (
            _is_int(batch_size)
            and _is_int(samples_per_epoch)
            and 1 <= samples_per_epoch < batch_size
        ):
            errors.append(
                f"data.samples_per_epoch: {samples_per_epoch} is less than data.batch_size "
                f"{batch_size}: not one full batch per epoch"
            )

        if isinstance(data_files, str):
            data_files = [data_files]
        if data_files is not None and (
            not isinstance(data_files, list)
            or not data_files
            or not all(isinstance(f, str) and f for f in data_files)
        ):
            errors.append(f"data.data_files: must be a path or a list of paths, got {data_files!r}")
            data_files = None
        resolved_files: list[Path] = []
        if dataset is None and data_files:
            errors.append(
                "data.data_files: set, but data.dataset is None (the built-in corpus); set "
                f"data.dataset to one of {LOCAL_BUILDERS} to read these files"
            )
        if builder is not None:
            if not data_files:
                errors.append(f"data.data_files: required with data.dataset={builder!r}")
            for pattern in data_files or []:
                if glob.has_magic(pattern):
                    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
                    if not matches:
                        errors.append(f"data.data_files: no file matches: {pattern}")
                    resolved_files += [Path(m).resolve() for m in matches]
                else:
                    path = Path(pattern).expanduser()
                    if not path.is_file():
                        errors.append(f"data.data_files: no such file: {pattern}")
                    resolved_files.append(path.resolve())
        local_dir: Path | None = None
        if builder is None and isinstance(dataset, str) and dataset.strip():
            path = Path(dataset).expanduser()
            if path.is_file():
                errors.append(
                    f"data.dataset: {dataset} is a file; use data.dataset=<one of {LOCAL_BUILDERS}> "
                    "and data.data_files=<that file>"
                )
            elif path.is_dir():
                local_dir = path.resolve()

        fixed_tokenizer: Tokenizer | None = None
        if tokenizer_path is not None:
            try:
                fixed_tokenizer = Tokenizer.from_file(tokenizer_path)
            except TokenizerError as e:
                errors.append(f"data.tokenizer_path: {e}")
        if errors:
            raise ValueError("invalid data settings:\n  " + "\n  ".join(errors))

        self.dataset = dataset
        self.data_files = data_files
        self.dataset_config = dataset_config
        self.split = split
        self.text_column = text_column
        self.tokenizer_path = tokenizer_path
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.samples_per_epoch = samples_per_epoch
        self.max_val_samples = max_val_samples
        self.num_proc = num_proc
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.corpus_sentences = corpus_sentences
        self.seed = seed
        self._configured_vocab_size = vocab_size
        self._builder = builder
        self._resolved_files = resolved_files
        self._local_dir = local_dir
        self._fixed_tokenizer = fixed_tokenizer
        self._tokenizer: Tokenizer | None = fixed_tokenizer
        self._meta: dict[str, Any] | None = None
        self.train_dataset: RandomWindowDataset | None = None
        self.val_dataset: ConsecutiveWindowDataset | None = None
        self.fingerprint_inputs = self._fingerprint_inputs()
        digest = hashlib.sha256(
            json.dumps(self.fingerprint_inputs, sort_keys=True).encode()
        ).hexdigest()
        self.fingerprint = digest[:16]
        self.cache_path = self.cache_dir / f"{self._cache_slug()}-{self.fingerprint}"

    # ------------------------------------------------------------------------------------------
    # What the cache holds, and its name

    def _fingerprint_inputs(self) -> dict[str, Any]:
        """Everything that determines the cache's contents (JSON-serialisable)."""
        inputs: dict[str, Any] = {"format": CACHE_FORMAT, "seed": self.seed}
        if self.dataset is None:
            corpus_file = Path(attnlm.corpus.__file__)
            inputs["source"] = {
                "builtin": self.corpus_sentences,
                "generator_sha256": _sha256_file(corpus_file),
            }
        else:
            inputs["source"] = {
                "dataset": self.dataset if self._local_dir is None else str(self._local_dir),
                "dataset_config": self.dataset_config,
                "data_files": (
                    [_file_signature(p) for p in self._resolved_files]
                    if self._builder is not None
                    else self.data_files
                ),
                "split": self.split,
                "text_column": self.text_column,
            }
            if self._local_dir is not None:
                inputs["source"]["dir_files"] = [
                    _file_signature(p)
                    for p in sorted(self._local_dir.rglob("*"))
                    if p.is_file()
                    and not any(
                        part.startswith(".") for part in p.relative_to(self._local_dir).parts
                    )
                ]
            inputs["val_fraction"] = self.val_fraction
        if self._fixed_tokenizer is not None:
            inputs["tokenizer"] = {"sha256": _sha256_file(Path(self.tokenizer_path))}
        else:
            inputs["tokenizer"] = {
                "train_vocab_size": self._configured_vocab_size,
                "min_frequency": TOKENIZER_MIN_FREQUENCY,
                "tokenizers": tokenizers.__version__,
            }
        if self.dataset is None:
            inputs["val_fraction"] = self.val_fraction
        return inputs

    def _cache_slug(self) -> str:
        if self.dataset is None:
            slug = "builtin"
        elif self._builder is not None:
            slug = f"{self._builder}-{self._resolved_files[0].stem}"
        elif self._local_dir is not None:
            slug = self._local_dir.name
        else:
            slug = self.dataset.replace("/", "--")
        return re.sub(r"[^A-Za-z0-9._-]+", "_", slug)[:48]

    # ------------------------------------------------------------------------------------------
    # Lightning hooks

    @property
    def vocab_size(self) -> int:
        """Vocabulary size for the model: the given tokenizer's, else the configured one.

        A tokenizer trained on a small corpus can come out smaller than the configured size; the
        model then has a few embedding rows no token uses.
        """
        if self._fixed_tokenizer is not None:
            return self._fixed_tokenizer.vocab_size
        return self._configured_vocab_size

    def prepare_data(self) -> None:
        """Build the token cache at `cache_path` unless it is there already."""
        if (self.cache_path / "meta.json").is_file():
            rank_zero_info(f"data: reusing token cache {self.cache_path}")
            return
        if self.cache_path.exists():
            raise RuntimeError(
                f"data: {self.cache_path} exists but has no meta.json (not a finished cache); "
                "delete it to rebuild"
            )
        rank_zero_info(f"data: building token cache {self.cache_path} (new settings)")
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.cache_path.name}.tmp-", dir=self.cache_dir))
        try:
            meta = self._build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            try:
                os.rename(tmp, self.cache_path)
            except OSError:
                if not (self.cache_path / "meta.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        splits = meta["splits"]
        rank_zero_info(
            f"data: built token cache {self.cache_path} in {meta['build_seconds']:.1f}s: "
            f"train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens, "
            f"vocab {meta['vocab_size']}"
        )

    def setup(self, stage: str | None = None) -> None:
        """Open the cache (every rank): tokenizer, memory-mapped splits, window datasets."""
        meta_file = self.cache_path / "meta.json"
        if not meta_file.is_file():
            raise RuntimeError(
                f"data: no token cache at {self.cache_path}; call prepare_data() first "
                "(Trainer.fit does)"
            )
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        self._meta = meta
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(self.cache_path / "tokenizer.json")
        dtype = np.dtype(meta["dtype"])
        splits = meta["splits"]
        needed = self.block_size + 1
        for name in ("train", "val"):
            n = splits[name]["tokens"]
            if n < needed:
                raise ValueError(
                    f"data: the {name} split has {n} tokens; data.block_size={self.block_size} "
                    f"needs at least {needed} (a window is block_size + 1 tokens). Use more data "
                    "or a smaller block_size"
                    + (" or a larger val_fraction" if name == "val" else "")
                )
        self.train_dataset = RandomWindowDataset(
            self.cache_path / "train.bin",
            dtype,
            splits["train"]["tokens"],
            self.block_size,
            self.samples_per_epoch,
            self.seed,
        )
        self.val_dataset = ConsecutiveWindowDataset(
            self.cache_path / "val.bin",
            dtype,
            splits["val"]["tokens"],
            self.block_size,
            self.max_val_samples,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset)
        num_replicas, rank = self._data_parallel_world()
        sampler = EpochWindowSampler(dataset, num_replicas=num_replicas, rank=rank)
        if len(sampler) < self.batch_size:
            raise ValueError(
                f"data.samples_per_epoch: {self.samples_per_epoch} windows over {num_replicas} "
                f"devices is {len(sampler)} per device, less than data.batch_size {self.batch_size}"
            )
        return self._loader(
            dataset,
            sampler=sampler,
            drop_last=True,
            loader_class=ResumableDataLoader,
            progress=self._training_progress,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._require(self.val_dataset), shuffle=False, drop_last=False)

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints: the tokenizer, so a checkpoint alone can be decoded."""
        if self._tokenizer is None:
            return {}
        return {"tokenizer_json": self._tokenizer.to_json_str(), "cache": self.cache_path.name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("tokenizer_json")
        if saved is not None and self._tokenizer is not None:
            if saved != self._tokenizer.to_json_str():
                rank_zero_warn(
                    "data: the checkpoint was trained with a different tokenizer than the one in "
                    f"{self.cache_path}; token ids will not mean the same"
                )

    # ------------------------------------------------------------------------------------------
    # Results (after setup)

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer of the cached tokens."""
        return self._require(self._tokenizer)

    @property
    def tokenizer_file(self) -> Path:
        """The `tokenizer.json` in use: `tokenizer_path` if given, else the cache's copy."""
        if self.tokenizer_path is not None:
            return Path(self.tokenizer_path)
        return self.cache_path / "tokenizer.json"

    @property
    def meta(self) -> dict[str, Any]:
        """Contents of the cache's meta.json."""
        return self._require(self._meta)

    @property
    def train_tokens(self) -> int:
        return self.meta["splits"]["train"]["tokens"]

    @property
    def val_tokens(self) -> int:
        return self.meta["splits"]["val"]["tokens"]

    @property
    def val_chars_per_token(self) -> float:
        """Characters per token of the validation split; bits/char = nats/token / this / ln 2."""
        val = self.meta["splits"]["val"]
        return val["chars"] / val["tokens"]

    # ------------------------------------------------------------------------------------------
    # Building the cache

    def _build(self, tmp: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        train, val, val_source = self._load_splits(tmp)
        t_load = time.perf_counter()
        if self._fixed_tokenizer is not None:
            tokenizer = self._fixed_tokenizer
        else:
            tokenizer = Tokenizer.train(
                _text_batches(train, self.text_column),
                vocab_size=self._configured_vocab_size,
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
                _TokenizeBatch(tokenizer, self.text_column),
                batched=True,
                batch_size=1000,
                num_proc=self.num_proc,
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
        shutil.rmtree(tmp / "arrow", ignore_errors=True)
        shutil.rmtree(tmp / "hf", ignore_errors=True)
        return {
            "format": CACHE_FORMAT,
            "fingerprint": self.fingerprint,
            "fingerprint_inputs": self.fingerprint_inputs,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "eot_id": tokenizer.eot_id,
            "val_source": val_source,
            "splits": splits,
            "build_seconds": round(t_pack - t0, 3),
            "seconds": {
                "load": round(t_load - t0, 3),
                "train_tokenizer": round(t_tok - t_load, 3),
                "tokenize_and_pack": round(t_pack - t_tok, 3),
            },
        }

    def _load_splits(self, tmp: Path) -> tuple[datasets.Dataset, datasets.Dataset, str]:
        """(train, val, where val came from) as `datasets.Dataset`s with the text column."""
        if self.dataset is None:
            corpus = write_corpus(tmp / "corpus.txt", self.corpus_sentences, seed=self.seed)
            path, name, data_files = "text", None, [str(corpus)]
            hf_cache = tmp / "hf"  # nothing here is worth keeping past this build
        elif self._builder is not None:
            path, name, data_files = (
                self._builder,
                self.dataset_config,
                [str(p) for p in self._resolved_files],
            )
            hf_cache = self.cache_dir / "hf"
        else:
            path = str(self._local_dir) if self._local_dir is not None else self.dataset
            name, data_files = self.dataset_config, self.data_files
            hf_cache = self.cache_dir / "hf"
        kwargs = {"name": name, "data_files": data_files, "cache_dir": str(hf_cache)}
        loaded = datasets.load_dataset(path, **kwargs)
        if not isinstance(loaded, datasets.DatasetDict):
            raise ValueError(
                f"data.dataset: {self.dataset!r} did not load as a dataset with splits"
            )
        base_split = self.split.split("[", 1)[0]
        if self.split in loaded:
            train = loaded[self.split]
        elif base_split in loaded:
            train = datasets.load_dataset(path, split=self.split, **kwargs)  # slicing syntax
        else:
            raise ValueError(
                f"data.split: {self.split!r} is not a split of the dataset; it has {list(loaded)}"
            )
        self._check_text_column(train)
        for val_name in VAL_SPLIT_NAMES:
            if val_name in loaded and val_name != base_split:
                return train, loaded[val_name], f"split {val_name!r}"
        if len(train) < 2:
            raise ValueError(
                f"data: the {self.split!r} split has {len(train)} document(s); splitting off "
                "validation data needs at least 2"
            )
        parts = train.train_test_split(
            test_size=self.val_fraction,
            seed=self.seed,
            shuffle=True,
            train_indices_cache_file_name=str(tmp / "arrow" / "train_indices.arrow"),
            test_indices_cache_file_name=str(tmp / "arrow" / "val_indices.arrow"),
        )
        return parts["train"], parts["test"], f"val_fraction={self.val_fraction} of {self.split!r}"

    def _check_text_column(self, ds: datasets.Dataset) -> None:
        feature = ds.features.get(self.text_column)
        if feature is None:
            raise ValueError(
                f"data.text_column: no column {self.text_column!r}; the dataset has "
                f"{list(ds.features)}"
            )
        if not (
            isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")
        ):
            raise ValueError(
                f"data.text_column: column {self.text_column!r} holds {feature}, not strings"
            )

    # ------------------------------------------------------------------------------------------
    # Helpers

    def _data_parallel_world(self) -> tuple[int, int]:
        """(number of data-parallel replicas, this replica's rank)."""
        trainer = self.trainer
        if trainer is not None:
            kwargs = trainer.distributed_sampler_kwargs
            if kwargs:
                return kwargs["num_replicas"], kwargs["rank"]
            return 1, 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _training_progress(self) -> tuple[int, int]:
        """(epoch, batches trained on this epoch) of the attached trainer, for checkpoints."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _loader(
        self, dataset: Dataset, loader_class: type[DataLoader] = DataLoader, **kwargs: Any
    ) -> DataLoader:
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )

    @staticmethod
    def _require(value: Any) -> Any:
        if value is None:
            raise RuntimeError("data: call prepare_data() and setup() first")
        return value


def main() -> None:
    """Build (or reuse) the default cache and print its summary."""
    dm = TextDataModule()
    t0 = time.perf_counter()
    dm.prepare_data()
    dm.setup("fit")
    print(f"{dm.cache_path} ready in {time.perf_counter() - t0:.1f}s")
    print(
        json.dumps({k: dm.meta[k] for k in ("dtype", "vocab_size", "splits", "seconds")}, indent=2)
    )
    print(f"val chars/token: {dm.val_chars_per_token:.3f}")


if __name__ == "__main__":
    main()
