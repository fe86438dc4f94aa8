"""token_writer: streamed lines as datasets' text builder makes them, exact validation draws,
bounded samples and memory, worker processes writing the same tokens as this process."""

from __future__ import annotations

import itertools
import tracemalloc

import numpy as np
import pytest

from attnlm.tokenizer import Tokenizer
from training.token_writer import (
    TextFileSource,
    encode_documents,
    tokenize_to_files,
    val_line_mask,
)

WORDS = "the cat dog sits runs near a big small red house tree over under".split()


def write_lines(path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    lines = [f"{i} " + " ".join(rng.choice(WORDS, size=int(rng.integers(1, 12)))) for i in range(n)]
    lines[3] = ""  # an empty document
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([" ".join(WORDS)] * 50, vocab_size=300)


@pytest.mark.parametrize("lines,val", [(2, 1), (10, 1), (1000, 50), (1001, 51), (12345, 617)])
def test_val_mask_draws_exactly_one_line_per_block(lines, val):
    mask = val_line_mask(0, lines, lines, val, seed=7)
    chosen = np.flatnonzero(mask)
    assert len(chosen) == val
    assert sorted({int(i) * val // lines for i in chosen}) == list(range(val))  # one per block
    # any range classifies alone: the streamed chunks agree with the whole
    cuts = sorted({0, min(1, lines), min(17, lines), lines // 3, lines})
    parts = [val_line_mask(a, b - a, lines, val, seed=7) for a, b in itertools.pairwise(cuts)]
    assert np.array_equal(np.concatenate(parts), mask)
    if val < lines // 2:
        assert not np.array_equal(val_line_mask(0, lines, lines, val, seed=8), mask)


def test_lines_are_datasets_text_lines(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"one\r\ntwo\n\nthree\rfour\n  \nlast without newline")
    expected = ["one", "two", "", "three", "four", "  ", "last without newline"]
    source = TextFileSource([path], val_fraction=0.3, seed=0, chunk_bytes=4)
    assert source.lines == 7 and source.val_lines == 3  # ceil(0.3 * 7)
    got = {"train": [], "val": []}
    for unit, _ in source.units():
        for name, docs in unit.items():
            got[name] += docs
    assert sorted(got["train"] + got["val"]) == sorted(expected)
    assert len(got["val"]) == 3


def test_sample_is_bounded_and_spread_over_the_file(tmp_path):
    path = tmp_path / "big.txt"
    lines = write_lines(path, 20_000)
    source = TextFileSource([path], 0.05, seed=0, chunk_bytes=4096)
    size = path.stat().st_size
    sample = [line for batch in source.sample(size // 10) for line in batch]
    sampled = sum(len(line) + 1 for line in sample)
    assert size // 20 < sampled <= size // 10 + 2 * 4096
    positions = [lines.index(line) for line in sample[:: max(1, len(sample) // 50)]]
    assert min(positions) < len(lines) // 5 and max(positions) > 4 * len(lines) // 5
    everything = [line for batch in source.sample(10 * size) for line in batch]
    assert len(everything) == source.lines - source.val_lines  # small corpus: all training lines


def test_encode_documents_puts_eot_after_each_non_empty_document(tokenizer):
    tokens, counts = encode_documents(tokenizer, ["the cat", "", "a dog"], np.dtype(np.uint16))
    eot = tokenizer.eot_id
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == tokenizer.encode("the cat") + [eot] + tokenizer.encode("a dog") + [
        eot
    ]
    assert (counts.documents, counts.empty_documents, counts.tokens) == (2, 1, len(tokens))
    assert counts.chars == len("the cat") + len("a dog") + 2


def test_token_files_decode_back_and_workers_write_the_same(tmp_path, tokenizer):
    path = tmp_path / "docs.txt"
    lines = write_lines(path, 3000)
    source = TextFileSource([path], 0.05, seed=3, chunk_bytes=2048)
    dtype = np.dtype(np.uint16)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    stats = tokenize_to_files([source], tokenizer, one, dtype, progress=False)
    assert stats.text_bytes == path.stat().st_size and stats.mb_per_s > 0
    assert stats.splits["val"].documents + stats.splits["val"].empty_documents == 150
    total = sum(s.documents + s.empty_documents for s in stats.splits.values())
    assert total == len(lines)
    texts = {}
    for name in ("train", "val"):
        ids = np.fromfile(one / f"{name}.bin", dtype=dtype)
        assert len(ids) == stats.splits[name].tokens
        texts[name] = tokenizer.decode(ids.tolist()).split("<|endoftext|>")[:-1]
    assert sorted(texts["train"] + texts["val"]) == sorted(line for line in lines if line)
    stats2 = tokenize_to_files([source], tokenizer, two, dtype, num_proc=2, progress=False)
    assert stats2.num_proc == 2 and stats2.splits == stats.splits
    for name in ("train", "val"):
        assert (one / f"{name}.bin").read_bytes() == (two / f"{name}.bin").read_bytes()


def peak_python_memory(tmp_path, tokenizer, lines: int) -> tuple[int, int]:
    path = tmp_path / f"{lines}.txt"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            f.write(f"the cat {i} sits near the big red house number {i * 7}\n")
    source = TextFileSource([path], 0.05, seed=0, chunk_bytes=32 << 10)
    out = tmp_path / f"out{lines}"
    out.mkdir()
    tracemalloc.start()
    try:
        tokenize_to_files([source], tokenizer, out, np.dtype(np.uint16), progress=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, path.stat().st_size


def test_memory_stays_bounded_by_the_chunks_in_flight(tmp_path, tokenizer):
    """Python's allocations peak at what a few chunks take (their token lists), not the file."""
    small, small_size = peak_python_memory(tmp_path, tokenizer, 12_000)
    large, large_size = peak_python_memory(tmp_path, tokenizer, 48_000)
    assert large_size > 3.5 * small_size
    assert large < 1.5 * small, (
        f"peak {small:,} B for {small_size:,} B, {large:,} B for {large_size:,} B"
    )
    assert large < large_size / 2
