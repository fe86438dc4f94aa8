"""TokenCache: named by what determines its contents, built atomically, shared by racing builds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.unit.test_data_settings import settings  # noqa: E402
from training.token_cache import TokenCache, token_dtype  # noqa: E402

SMALL = dict(corpus_sentences=200, vocab_size=300)


def test_token_dtype_widens_past_uint16():
    assert token_dtype(512) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_name_hashes_content_settings_only(tmp_path):
    cache = TokenCache(settings(cache_dir=str(tmp_path), **SMALL))
    assert cache.path.parent == tmp_path and cache.path.name == f"builtin-{cache.fingerprint}"
    same = TokenCache(settings(cache_dir=str(tmp_path), block_size=8, num_workers=2, **SMALL))
    assert same.path == cache.path  # how windows are cut is not cache content
    assert TokenCache(settings(cache_dir=str(tmp_path), seed=2, **SMALL)).path != cache.path
    assert cache.fingerprint_inputs["source"]["builtin"] == 200
    json.dumps(cache.fingerprint_inputs)  # JSON-serialisable: it goes into meta.json


def test_build_then_read_and_no_temporary_left(tmp_path):
    cache = TokenCache(settings(cache_dir=str(tmp_path), **SMALL))
    assert not cache.is_built()
    with pytest.raises(RuntimeError, match="call prepare_data"):
        cache.read_meta()
    meta = cache.build()
    assert cache.is_built() and cache.read_meta() == meta
    assert meta["fingerprint"] == cache.fingerprint and meta["vocab_size"] <= 300
    assert sum(split["documents"] for split in meta["splits"].values()) == 200
    assert [p.name for p in tmp_path.iterdir()] == [cache.path.name]


def test_a_directory_without_meta_is_not_taken_for_a_cache(tmp_path):
    cache = TokenCache(settings(cache_dir=str(tmp_path), **SMALL))
    cache.path.mkdir()
    with pytest.raises(RuntimeError, match="exists but has no meta.json"):
        cache.is_built()


def test_a_build_that_loses_the_race_uses_the_winners_cache(tmp_path, monkeypatch):
    cache = TokenCache(settings(cache_dir=str(tmp_path), **SMALL))
    real_build = TokenCache._build

    def build_while_another_process_finishes_first(self, tmp, progress):
        meta = real_build(self, tmp, progress)
        cache.path.mkdir()
        (cache.path / "meta.json").write_text(json.dumps({"winner": True}))
        return meta

    monkeypatch.setattr(TokenCache, "_build", build_while_another_process_finishes_first)
    assert cache.build() == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [cache.path.name]  # ours was removed


KILLED_BUILD = """
import sys, time
from pathlib import Path
import training.token_writer as tw
from tests.unit.test_data_settings import settings
from training.token_cache import TokenCache

real = tw.encode_documents
def slow(*args, **kwargs):
    Path(sys.argv[2]).touch()  # tokenizing has begun: token files are half written
    time.sleep(0.5)
    return real(*args, **kwargs)
tw.encode_documents = slow
TokenCache(settings(dataset="text", data_files=sys.argv[3], cache_dir=sys.argv[1], vocab_size=300)).build()
"""


def test_a_killed_build_is_never_trusted_and_the_next_build_clears_it(tmp_path):
    text = tmp_path / "docs.txt"
    text.write_text("".join(f"the cat {i} sat on the mat\n" for i in range(20_000)))
    caches, started = tmp_path / "caches", tmp_path / "started"
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_BUILD, str(caches), str(started), str(text)], cwd=repo
    )
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the build never began tokenizing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    cache = TokenCache(
        settings(dataset="text", data_files=str(text), cache_dir=str(caches), vocab_size=300)
    )
    assert not cache.is_built() and not cache.path.exists()  # nothing at the cache's path
    (left,) = cache.abandoned_builds()  # the killed build's temporary folder, never read
    assert (left / "train.bin").exists() and not (left / "meta.json").exists()
    meta = cache.build()
    assert [p.name for p in caches.iterdir()] == [cache.path.name]  # the leftover is gone
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 20_000


def test_a_second_run_reuses_the_text_cache(tmp_path, monkeypatch):
    import training.token_cache

    text = tmp_path / "docs.txt"
    text.write_text("".join(f"a dog {i} ran\n" for i in range(500)))
    make = lambda: TokenCache(  # noqa: E731
        settings(
            dataset="text", data_files=str(text), cache_dir=str(tmp_path / "c"), vocab_size=300
        )
    )
    first = make()
    meta = first.build()
    assert meta["tokenize"]["text_bytes"] == text.stat().st_size
    assert (
        meta["tokenize"]["mb_per_s"] > 0
        and meta["fingerprint_inputs"]["tokenizer"]["sample_mb"] == 64
    )

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(training.token_cache, "tokenize_to_files", fail)
    again = make()
    assert again.path == first.path and again.is_built() and again.read_meta() == meta
    text.write_text(text.read_text() + "one more line\n")  # the file changed: a new cache
    assert make().path != first.path
