"""Tokenizing a corpus of gigabytes: documents in, one raw token file per split out, in bounded memory.

`training.token_cache` builds a cache with these pieces:

- `TextFileSource`: local text files read in ~1 MB chunks of whole lines (one document a line,
  as `datasets`' text builder makes them: universal newlines, empty lines are empty documents).
  Nothing is converted or copied first. The validation lines are chosen as `train_test_split`
  would choose them (ceil(val_fraction * lines), at random, seeded), but stratified so that the
  choice streams: the lines are cut into that many equal blocks and one line of each block, drawn
  from `(seed, block)`, is validation. It needs the number of lines: one fast counting pass.
- `DatasetSource`: any `datasets.Dataset` split (json, csv, parquet, a dataset folder, the Hub),
  read in arrow slices of about 1 MB of text.
- `tokenizer_sample`: the training text a tokenizer is trained on, bounded (64 MB by default):
  evenly spaced chunks of the training documents, the whole split when it is smaller.
- `tokenize_to_files`: every chunk encoded with `Tokenizer.encode_batch`, EOT after each
  document, appended to `<split>.bin` as it comes. In this process (the tokenizer's own threads
  encode a chunk in parallel while a reader thread prepares the next), or with `num_proc`
  worker processes (forked; one encoding thread each; chunks written back in order). A progress bar in
  bytes shows MB/s; the counts come back with the seconds and MB/s of the pass.

Memory stays bounded by a few chunks in flight, whatever the corpus size: nothing holds more
than a chunk of text or of tokens at a time (files are appended to, never held).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from attnlm.tokenizer import Tokenizer

CHUNK_BYTES = 1 << 20  # text read, encoded and written at a time
TOKENIZER_SAMPLE_BYTES = 64 << 20  # the most training text a tokenizer is trained on
SPLITS = ("train", "val")
_MASK64 = (1 << 64) - 1

# A unit of work: {split: documents} of one chunk, and the chunk's size in bytes of text
Unit = tuple[dict[str, list[str]], int]


@dataclass
class SplitCounts:
    """What went into one split's token file."""

    tokens: int = 0
    chars: int = 0  # characters of the documents, plus one per document for its EOT
    documents: int = 0
    empty_documents: int = 0  # skipped: no text, no tokens


@dataclass
class TokenizeStats:
    """The tokenizing pass: its counts per split and its speed."""

    splits: dict[str, SplitCounts] = field(default_factory=dict)
    text_bytes: int = 0
    seconds: float = 0.0
    num_proc: int = 1

    @property
    def mb_per_s(self) -> float:
        return self.text_bytes / 1e6 / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text_bytes": self.text_bytes,
            "seconds": round(self.seconds, 3),
            "mb_per_s": round(self.mb_per_s, 3),
            "num_proc": self.num_proc,
        }


# -- sources ------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def val_line_mask(start: int, count: int, lines: int, val_lines: int, seed: int) -> np.ndarray:
    """Which of lines `start .. start + count - 1` (of `lines` in all) are validation lines.

    The lines are cut into `val_lines` blocks of near-equal length (block j: the lines i with
    i * val_lines // lines == j); one line of each block, drawn from (seed, j), is validation.
    So exactly `val_lines` lines are chosen, spread over the whole corpus, and any range of
    lines can be classified alone (streaming, or in worker processes).
    """
    i = np.arange(start, start + count, dtype=np.int64)
    n, k = lines, val_lines
    j = i * k // n
    block_start = (j * n + k - 1) // k  # ceil(j * n / k): the first line of block j
    block_len = ((j + 1) * n + k - 1) // k - block_start  # >= 1 since n >= k
    salt = np.uint64((seed * 0x9E3779B97F4A7C15) & _MASK64)
    draw = _splitmix64(j.astype(np.uint64) ^ salt)
    chosen = block_start + (draw % block_len.astype(np.uint64)).astype(np.int64)
    return i == chosen


def _line_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[str, int]]:
    """(text, bytes) chunks of a UTF-8 file, each ending at a line break (or the file's end);
    line breaks normalised to "\\n" as Python's universal newlines do."""
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                return
            if not block.endswith(b"\n"):
                block += f.readline()  # finish the line (a "\r\n" is never cut in two)
            text = block.decode("utf-8")
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            yield text, len(block)


def _lines_of(text: str) -> list[str]:
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the chunk ended with a line break
    return lines


class TextFileSource:
    """Local UTF-8 text files, one document a line, split into training and validation lines."""

    def __init__(
        self,
        paths: list[Path],
        val_fraction: float,
        seed: int,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.chunk_bytes = chunk_bytes
        self.seed = seed
        self.total_bytes = sum(p.stat().st_size for p in self.paths)
        self.lines = sum(
            text.count("\n") + (not text.endswith("\n"))
            for path in self.paths
            for text, _ in _line_chunks(path, 1 << 24)  # only the file's last may lack "\n"
        )
        if self.lines < 2:
            raise ValueError(
                f"data: the text files hold {self.lines} line(s) (documents); splitting off "
                "validation data needs at least 2"
            )
        # as datasets' train_test_split(test_size=val_fraction): ceil, and at least one each side
        self.val_lines = min(self.lines - 1, max(1, math.ceil(self.lines * val_fraction)))
        self.val_source = (
            f"val_fraction={val_fraction} of the lines: {self.val_lines:,} of {self.lines:,}, "
            "one drawn from each of as many equal blocks"
        )

    def units(self, splits: tuple[str, ...] = SPLITS) -> Iterator[Unit]:
        """Every chunk as {split: its lines of that split}."""
        first = 0  # index of the chunk's first line among all lines
        for path in self.paths:
            for text, nbytes in self._chunks(path):
                lines = _lines_of(text)
                yield self._split(lines, first, splits), nbytes
                first += len(lines)

    def sample(self, max_bytes: int) -> Iterator[list[str]]:
        """Training lines of evenly spaced chunks, about `max_bytes` of text in all."""
        keep = min(1.0, max_bytes / max(1, self.total_bytes))
        first, index, taken = 0, 0, 0
        for path in self.paths:
            for text, nbytes in self._chunks(path):
                # chunk `index` is kept when the running share crosses an integer
                if int((index + 1) * keep) > int(index * keep) and taken < max_bytes:
                    lines = _lines_of(text)
                    yield self._split(lines, first, ("train",))["train"]
                    first += len(lines)
                    taken += nbytes
                else:
                    first += text.count("\n") + (not text.endswith("\n"))
                index += 1

    def _chunks(self, path: Path) -> Iterator[tuple[str, int]]:
        return _line_chunks(path, self.chunk_bytes)

    def _split(self, lines: list[str], first: int, splits: tuple[str, ...]) -> dict[str, list[str]]:
        is_val = val_line_mask(first, len(lines), self.lines, self.val_lines, self.seed)
        out: dict[str, list[str]] = {}
        if "train" in splits:
            out["train"] = [line for line, v in zip(lines, is_val, strict=True) if not v]
        if "val" in splits:
            out["val"] = [lines[i] for i in np.flatnonzero(is_val)]
        return out


class DatasetSource:
    """A `datasets.Dataset` split, read in arrow slices of about `chunk_bytes` of text."""

    def __init__(self, split: str, dataset: Any, text_column: str, chunk_bytes: int = CHUNK_BYTES):
        self.split = split
        self.dataset = dataset.with_format("arrow").select_columns([text_column])
        self.text_column = text_column
        self.chunk_bytes = chunk_bytes
        self.total_bytes: int | None = None  # unknown before reading

    def units(self, splits: tuple[str, ...] = SPLITS) -> Iterator[Unit]:
        if self.split not in splits:
            return
        for texts, nbytes in self._slices():
            yield {self.split: texts}, nbytes

    def sample(self, max_bytes: int) -> Iterator[list[str]]:
        """The split's first `max_bytes` of text when the split is small, else evenly spaced
        slices (the split's size estimated from its arrow table)."""
        table_bytes = max(1, self.dataset.data.nbytes)
        keep = min(1.0, max_bytes / table_bytes)
        taken = 0
        for index, (texts, nbytes) in enumerate(self._slices()):
            if taken >= max_bytes:
                return
            if int((index + 1) * keep) > int(index * keep):
                taken += nbytes
                yield [t for t in texts if t]

    def _slices(self) -> Iterator[tuple[list[str], int]]:
        import pyarrow.compute as pc

        rows, start, n = 1024, 0, len(self.dataset)
        while start < n:
            column = self.dataset[start : start + rows][self.text_column]
            nbytes = pc.sum(pc.binary_length(column)).as_py() or 0
            yield [t or "" for t in column.to_pylist()], nbytes
            start += rows
            per_row = nbytes / len(column) if len(column) else 0
            rows = int(min(1 << 20, max(16, self.chunk_bytes / max(per_row, 1.0))))


# -- encoding -----------------------------------------------------------------------------------


def encode_documents(
    tokenizer: Tokenizer, texts: list[str], dtype: np.dtype
) -> tuple[np.ndarray, SplitCounts]:
    """The tokens of `texts` end to end, EOT after each non-empty document; and their counts."""
    documents = [t for t in texts if t]
    counts = SplitCounts(documents=len(documents), empty_documents=len(texts) - len(documents))
    if not documents:
        return np.empty(0, dtype), counts
    ids = tokenizer.encode_batch(documents)
    lengths = np.fromiter(map(len, ids), np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype, count=int(lengths.sum()))
    tokens = np.insert(flat, np.cumsum(lengths), tokenizer.eot_id)  # EOT after each document
    counts.tokens = len(tokens)
    counts.chars = sum(map(len, documents)) + len(documents)  # EOT counts as one character
    return tokens, counts


def _encode_unit(
    tokenizer: Tokenizer, unit: dict[str, list[str]], dtype: np.dtype
) -> dict[str, tuple[np.ndarray, SplitCounts]]:
    return {name: encode_documents(tokenizer, texts, dtype) for name, texts in unit.items()}


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_json: str, dtype_name: str) -> None:
    # one encoding thread per worker: num_proc processes share the cores, not num_proc x cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"] = Tokenizer.from_json_str(tokenizer_json)
    _WORKER["dtype"] = np.dtype(dtype_name)


def _work(unit: dict[str, list[str]]) -> dict[str, tuple[np.ndarray, SplitCounts]]:
    return _encode_unit(_WORKER["tokenizer"], unit, _WORKER["dtype"])


def _prefetched(units: Iterator[Unit], depth: int = 2) -> Iterator[Unit]:
    """`units`, read by a thread `depth` ahead (reading overlaps encoding, which frees the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def read() -> None:
        try:
            for unit in units:
                while not stop.is_set():
                    try:
                        q.put(unit, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # handed to the consumer
            q.put(err)

    thread = threading.Thread(target=read, daemon=True, name="token-writer-reader")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        disable=not enabled,
        file=sys.stderr,
        mininterval=1.0,
    )


def tokenize_to_files(
    sources: list[Any],
    tokenizer: Tokenizer,
    out_dir: Path,
    dtype: np.dtype,
    num_proc: int | None = None,
    progress: bool = True,
) -> TokenizeStats:
    """Encode every unit of `sources` and append the tokens to `out_dir/<split>.bin`.

    Args:
        sources: `TextFileSource` / `DatasetSource` objects, read one after the other.
        num_proc: worker processes encoding chunks (None or 1: in this process, with the
            tokenizer's own threads).
        progress: show a progress bar (bytes of text, MB/s).
    """
    stats = TokenizeStats(splits={name: SplitCounts() for name in SPLITS}, num_proc=num_proc or 1)
    files = {name: open(out_dir / f"{name}.bin", "wb") for name in SPLITS}  # noqa: SIM115
    total = sum(s.total_bytes for s in sources) if all(s.total_bytes for s in sources) else None
    units = chain.from_iterable(s.units() for s in sources)
    bar = _progress(total, "tokenizing", progress)
    t0 = time.perf_counter()
    try:
        for encoded, nbytes in _encoded(units, tokenizer, dtype, num_proc):
            for name, (tokens, counts) in encoded.items():
                files[name].write(tokens.tobytes())
                acc = stats.splits[name]
                for key, value in asdict(counts).items():
                    setattr(acc, key, getattr(acc, key) + value)
            stats.text_bytes += nbytes
            bar.update(nbytes)
    finally:
        bar.close()
        for f in files.values():
            f.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def _encoded(
    units: Iterator[Unit], tokenizer: Tokenizer, dtype: np.dtype, num_proc: int | None
) -> Iterator[tuple[dict[str, tuple[np.ndarray, SplitCounts]], int]]:
    """(encoded unit, its bytes of text), in the order of `units`."""
    if not num_proc or num_proc <= 1:
        for unit, nbytes in _prefetched(units):
            yield _encode_unit(tokenizer, unit, dtype), nbytes
        return
    # fork: a spawned worker would import the main module again (under `attnlm fit`: torch and
    # Lightning, ~0.5 GB and seconds each). The workers encode on one thread each; set before the
    # fork, TOKENIZERS_PARALLELISM=false also keeps tokenizers from warning about forking after
    # its threads ran (this process's setting is put back at once).
    methods = mp.get_all_start_methods()
    ctx = mp.get_context("fork" if "fork" in methods else "spawn")
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = ctx.Pool(
            num_proc, initializer=_init_worker, initargs=(tokenizer.to_json_str(), dtype.name)
        )
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        pending: deque = deque()
        for unit, nbytes in units:
            pending.append((pool.apply_async(_work, (unit,)), nbytes))
            if len(pending) >= 2 * num_proc:  # bounded: a few chunks in flight
                result, size = pending.popleft()
                yield result.get(), size
        while pending:
            result, size = pending.popleft()
            yield result.get(), size


def raw_encode_throughput(
    tokenizer: Tokenizer, path: Path, max_bytes: int, chunk_bytes: int = CHUNK_BYTES
) -> float:
    """MB/s of `tokenizer.encode_batch` alone on the first `max_bytes` of a text file's lines,
    read into memory first (the reference the pipeline's speed is compared with)."""
    batches, taken = [], 0
    for text, nbytes in _line_chunks(Path(path), chunk_bytes):
        batches.append([line for line in _lines_of(text) if line])
        taken += nbytes
        if taken >= max_bytes:
            break
    t0 = time.perf_counter()
    for batch in batches:
        tokenizer.encode_batch(batch)
    return taken / 1e6 / (time.perf_counter() - t0)
