"""Training data: text -> byte-level BPE tokens -> one packed token file per split -> windows.

`TextDataModule` is the `data:` section of the LightningCLI config. Its pipeline:

1. `prepare_data` (Lightning runs it on local rank 0 only) builds the token cache of these settings
   unless it exists (`training.token_cache`): local text streamed (other formats loaded with
   `datasets.load_dataset`), a tokenizer trained on a bounded sample of the training split
   (unless `tokenizer_path` is given), every split tokenized in bounded memory, with a progress
   bar and its MB/s, into one flat token file, in a directory named by a hash of everything
   that determines its contents, written atomically, reused by a later run with the same settings.
   The settings themselves are checked, all at once, when the module is built
   (`training.data_settings`).
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

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from attnlm.tokenizer import Tokenizer
from training.data_settings import DataSettings
from training.token_cache import TokenCache, build_notes

_MASK64 = (1 << 64) - 1


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
        tokenizer_sample_mb: int = 64,
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
        encoding: str = "utf-8",
        decode_errors: str = "strict",
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
            tokenizer_sample_mb: the most training text (MB) a tokenizer is trained on: evenly
                spaced chunks of the training split when it is larger (the whole split else).
            block_size: training window length T (windows hold T + 1 tokens). Under `attnlm fit`
                it is one setting with the model's context `model.block_size`: give either, the
                other follows.
            batch_size: windows per batch, per device.
            val_fraction: fraction of documents held out for validation when the dataset has no
                "validation" or "test" split.
            samples_per_epoch: random training windows per epoch, over all devices.
            max_val_samples: the most validation windows.
            num_proc: worker processes that tokenize (None: this process, with the tokenizer's
                own threads; more processes help where those threads leave cores idle).
            num_workers: DataLoader worker processes.
            cache_dir: where token caches (and `datasets` downloads) are kept.
            corpus_sentences: sentences in the built-in corpus.
            seed: seeds the built-in corpus, the validation split and the training windows.
            encoding: the encoding of local text, json and csv files: any codec Python knows
                (utf-8, latin-1, cp1252, utf-16, ...). They are checked before anything is built.
            decode_errors: what to do with bytes that are not `encoding`: "strict" (stop, naming
                the file, line and byte offset), "replace" (each becomes U+FFFD) or "skip" (drop
                the lines holding them); the count is reported when the cache is built.
        """
        super().__init__()
        self.save_hyperparameters()
        self.settings = DataSettings(
            dataset=dataset,
            data_files=data_files,
            dataset_config=dataset_config,
            split=split,
            text_column=text_column,
            tokenizer_path=tokenizer_path,
            vocab_size=vocab_size,
            tokenizer_sample_mb=tokenizer_sample_mb,
            block_size=block_size,
            batch_size=batch_size,
            val_fraction=val_fraction,
            samples_per_epoch=samples_per_epoch,
            max_val_samples=max_val_samples,
            num_proc=num_proc,
            num_workers=num_workers,
            cache_dir=cache_dir,
            corpus_sentences=corpus_sentences,
            seed=seed,
            encoding=encoding,
            decode_errors=decode_errors,
        )
        self.cache = TokenCache(self.settings)
        self._tokenizer: Tokenizer | None = self.settings.tokenizer
        self._meta: dict[str, Any] | None = None
        self.train_dataset: RandomWindowDataset | None = None
        self.val_dataset: ConsecutiveWindowDataset | None = None

    @property
    def block_size(self) -> int:
        """Training window length T (`data.block_size`)."""
        return self.settings.block_size

    @property
    def cache_path(self) -> Path:
        """The token cache directory of these settings (see `training.token_cache`)."""
        return self.cache.path

    @property
    def fingerprint(self) -> str:
        """The hash of what determines the cache's contents; the end of its name."""
        return self.cache.fingerprint

    # ------------------------------------------------------------------------------------------
    # Lightning hooks

    @property
    def vocab_size(self) -> int:
        """Vocabulary size for the model: the given tokenizer's, else the configured one.

        A tokenizer trained on a small corpus can come out smaller than the configured size; the
        model then has a few embedding rows no token uses (`setup` says so; `attnlm export` and
        `load_artifact` crop them, so no served or exported distribution gives them mass).
        """
        given = self.settings.tokenizer
        return given.vocab_size if given is not None else self.settings.vocab_size

    def prepare_data(self) -> None:
        """Build the token cache at `cache_path` unless it is there already."""
        if self.cache.is_built():
            rank_zero_info(f"data: reusing token cache {self.cache_path}")
            return
        rank_zero_info(f"data: building token cache {self.cache_path} (new settings)")
        meta = self.cache.build()
        splits, tok, seconds = meta["splits"], meta["tokenize"], meta["seconds"]
        rank_zero_info(
            f"data: built token cache {self.cache_path} in {meta['build_seconds']:.1f}s: "
            f"train {splits['train']['tokens']:,} tokens, val {splits['val']['tokens']:,} tokens, "
            f"vocab {meta['vocab_size']}; tokenized {tok['text_bytes'] / 1e6:,.1f} MB in "
            f"{tok['seconds']:.1f}s ({tok['mb_per_s']:.2f} MB/s, num_proc {tok['num_proc']}), "
            f"tokenizer trained in {seconds['train_tokenizer']:.1f}s"
        )
        for note in build_notes(meta):
            rank_zero_info(f"data: {note}")

    def setup(self, stage: str | None = None) -> None:
        """Open the cache (every rank): tokenizer, memory-mapped splits, window datasets."""
        meta = self._meta = self.cache.read_meta()
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_file(self.cache_path / "tokenizer.json")
        if self._tokenizer.vocab_size < self.vocab_size:
            rank_zero_info(
                f"data: the trained tokenizer has {self._tokenizer.vocab_size} tokens, fewer than "
                f"data.vocab_size={self.vocab_size} (the corpus has no more merges); the model "
                f"keeps {self.vocab_size} embedding rows, ids {self._tokenizer.vocab_size}.."
                f"{self.vocab_size - 1} are padding, never sampled and cropped on export"
            )
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
            self.settings.samples_per_epoch,
            self.settings.seed,
        )
        self.val_dataset = ConsecutiveWindowDataset(
            self.cache_path / "val.bin",
            dtype,
            splits["val"]["tokens"],
            self.block_size,
            self.settings.max_val_samples,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self._require(self.train_dataset)
        num_replicas, rank = self._data_parallel_world()
        sampler = EpochWindowSampler(dataset, num_replicas=num_replicas, rank=rank)
        s = self.settings
        if len(sampler) < s.batch_size:
            raise ValueError(
                f"data.samples_per_epoch: {s.samples_per_epoch} windows over {num_replicas} "
                f"devices is {len(sampler)} per device, less than data.batch_size {s.batch_size}"
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
        if self.settings.tokenizer_path is not None:
            return Path(self.settings.tokenizer_path)
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
            batch_size=self.settings.batch_size,
            num_workers=self.settings.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.settings.num_workers > 0,
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
