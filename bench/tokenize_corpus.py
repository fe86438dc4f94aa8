"""Tokenizing a large local text file into the token cache: speed, memory, reuse.

Builds the token cache of `--data.dataset text --data.data_files FILE` (the pipeline of
`attnlm fit`: `training.token_cache`, `training.token_writer`) in a fresh cache folder and
measures, in the same run:

- the build: load/check, tokenizer training on the bounded sample, tokenizing (MB/s);
- the raw `Tokenizer.encode_batch` throughput of the same tokenizer on the first
  `--raw-mb` MB of the file's lines, read into memory first (no I/O, no writing): the
  reference the pipeline is held to (>= 0.7x);
- peak memory growth of this process and its children during the build (the sum of their
  proportional set sizes, file-backed pages included, sampled every 100 ms) over the value
  before it: for one process, its RSS;
- a second `prepare_data` with the same settings: the cache reused (seconds);
- optionally (`--num-proc 2`) the same build with worker processes, in another cache folder.

The file is generated when missing (`--make-mb`, default 200): lines of one to three sentences
of the built-in corpus (`attnlm.corpus`) mixed with words drawn from a Zipf law over 200,000
made-up words, so the tokenizer sees a long tail of words as in real text. Keep it in /tmp.

    .venv/bin/python bench/tokenize_corpus.py --file /tmp/corpus200.txt
    .venv/bin/python bench/tokenize_corpus.py --file /tmp/corpus200.txt --num-proc 2 --vocab 50257

Targets printed as PASS/FAIL (ratios in the same run): pipeline >= 0.7x raw encode_batch;
peak RSS growth < 2 GB; the second run reuses the cache (< 5 s). Exit code 0 whatever they say.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from attnlm.corpus import iter_corpus  # noqa: E402
from attnlm.tokenizer import Tokenizer  # noqa: E402
from training.data import TextDataModule  # noqa: E402
from training.token_writer import raw_encode_throughput  # noqa: E402

SYLLABLES = "ka ri to ne su mi ra lo pe ba dun fel gor hin jus kel mor nal pir qua sen tav wex yol zim".split()


def make_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """Write about `megabytes` MB of lines: corpus sentences and Zipf-drawn made-up words."""
    rng = random.Random(seed)
    words = []
    while len(words) < 200_000:
        n = rng.choice((1, 2, 2, 3, 3, 4))
        words.append("".join(rng.choice(SYLLABLES) for _ in range(n)))
    weights = [1 / (r + 1) for r in range(len(words))]
    sentences = iter_corpus(num_sentences=10**9, seed=seed)
    target, written = megabytes * 1_000_000, 0
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        while written < target:
            picks = rng.choices(words, weights, k=4000)
            lines = []
            for i in range(0, len(picks), 20):
                head = " ".join(next(sentences) for _ in range(rng.randint(1, 3)))
                tail = " ".join(picks[i : i + rng.randint(5, 20)])
                lines.append(f"{head} {tail.capitalize()}, {rng.randint(1, 9999)}.\n")
            block = "".join(lines)
            f.write(block)
            written += len(block.encode("utf-8"))
    os.replace(tmp, path)


class PeakRSS:
    """Peak memory of this process plus its children, sampled by a thread: the sum of their
    proportional set sizes (Pss: a page shared by n processes, as forked workers share their
    parent's, counts 1/n in each), which for one process is its RSS."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        total = 0
        pids = [os.getpid()]
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{os.getpid()}/task").iterdir():
                pids += [int(p) for p in (task / "children").read_text().split()]
        for pid in pids:
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.before = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def build(file: Path, cache: Path, vocab: int, num_proc: int | None, sample_mb: int):
    dm = TextDataModule(
        dataset="text",
        data_files=str(file),
        vocab_size=vocab,
        tokenizer_sample_mb=sample_mb,
        num_proc=num_proc,
        cache_dir=str(cache),
    )
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        dm.prepare_data()
        wall = time.perf_counter() - t0
    dm.setup("fit")
    return dm, wall, rss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=Path("/tmp/attnlm-corpus-200mb.txt"))
    parser.add_argument("--make-mb", type=int, default=200, help="size of a generated file")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary to train (tiny: 1024)")
    parser.add_argument("--sample-mb", type=int, default=64, help="data.tokenizer_sample_mb")
    parser.add_argument("--raw-mb", type=int, default=32, help="MB for the raw encode_batch run")
    parser.add_argument("--num-proc", type=int, help="also build with these worker processes")
    parser.add_argument("--cache-dir", type=Path, help="default: a temporary folder, removed")
    args = parser.parse_args(argv)

    if not args.file.is_file():
        t0 = time.perf_counter()
        make_corpus(args.file, args.make_mb)
        print(f"wrote {args.file} in {time.perf_counter() - t0:.1f}s")
    size = args.file.stat().st_size
    print(f"file {args.file}: {size / 1e6:,.1f} MB; load {os.getloadavg()}; cpus {os.cpu_count()}")
    print(f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM', '(unset)')}")
    root = args.cache_dir or Path(tempfile.mkdtemp(prefix="attnlm-tok-"))
    rows = []
    try:
        dm, wall, rss = build(args.file, root / "a", args.vocab, None, args.sample_mb)
        meta = dm.meta
        tokenizer = Tokenizer.from_file(dm.cache_path / "tokenizer.json")
        raw = raw_encode_throughput(tokenizer, args.file, args.raw_mb << 20)
        rows.append(("num_proc None", meta, wall, rss, raw))
        t0 = time.perf_counter()
        again = TextDataModule(
            dataset="text",
            data_files=str(args.file),
            vocab_size=args.vocab,
            tokenizer_sample_mb=args.sample_mb,
            cache_dir=str(root / "a"),
        )
        again.prepare_data()
        reuse = time.perf_counter() - t0
        if args.num_proc:
            dm2, wall2, rss2 = build(
                args.file, root / "b", args.vocab, args.num_proc, args.sample_mb
            )
            raw2 = raw_encode_throughput(tokenizer, args.file, args.raw_mb << 20)
            rows.append((f"num_proc {args.num_proc}", dm2.meta, wall2, rss2, raw2))
    finally:
        if args.cache_dir is None:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(
        "| run | wall s | load s | tokenizer s | tokenize s | MB/s | raw encode_batch MB/s | "
        "ratio | peak RSS growth GB | tokens |"
    )
    print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for name, meta, wall, rss, raw in rows:
        s, tok = meta["seconds"], meta["tokenize"]
        tokens = sum(split["tokens"] for split in meta["splits"].values())
        print(
            f"| {name} | {wall:.1f} | {s['load']:.1f} | {s['train_tokenizer']:.1f} | "
            f"{s['tokenize']:.1f} | {tok['mb_per_s']:.2f} | {raw:.2f} | "
            f"{tok['mb_per_s'] / raw:.2f}x | {(rss.peak - rss.before) / 1e9:.2f} | {tokens:,} |"
        )
    print(f"\nsecond run, same settings: cache reused in {reuse:.2f}s")
    print(f"load after: {os.getloadavg()}")
    _, meta, _, rss, raw = rows[0]
    ratio = meta["tokenize"]["mb_per_s"] / raw
    checks = [
        (ratio >= 0.7, f"tokenizing at {ratio:.2f}x the raw encode_batch throughput (>= 0.7x)"),
        (
            rss.peak - rss.before < 2e9,
            f"peak RSS growth {(rss.peak - rss.before) / 1e9:.2f} GB (< 2 GB)",
        ),
        (reuse < 5, f"second run reused the cache in {reuse:.2f}s (< 5 s)"),
    ]
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
