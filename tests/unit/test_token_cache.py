"""TokenCache: named by what determines its contents, built atomically, shared by racing builds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

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

    def build_while_another_process_finishes_first(self, tmp):
        meta = real_build(self, tmp)
        cache.path.mkdir()
        (cache.path / "meta.json").write_text(json.dumps({"winner": True}))
        return meta

    monkeypatch.setattr(TokenCache, "_build", build_while_another_process_finishes_first)
    assert cache.build() == {"winner": True}
    assert [p.name for p in tmp_path.iterdir()] == [cache.path.name]  # ours was removed
