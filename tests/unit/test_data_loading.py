"""data_loading: local files checked before `datasets` reads them, its errors as one line, the
Hub probed before it is waited for."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import socket  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import datasets  # noqa: E402
import pytest  # noqa: E402

import training.data_loading as data_loading  # noqa: E402
from tests.unit.test_data_settings import settings  # noqa: E402
from training.data_loading import hub_unreachable, load_splits  # noqa: E402
from training.text_decoding import DecodeError  # noqa: E402

DOCS = [f"The cat number {i} sat on the mat." for i in range(40)]


def load(tmp_path, **overrides):
    build = Path(tempfile.mkdtemp(dir=tmp_path))  # each build has its own, as TokenCache's do
    s = settings(cache_dir=str(tmp_path / "cache"), **overrides)
    return load_splits(s, build)


def write_lines(path, lines, raw: bytes = b""):
    path.write_bytes(("\n".join(lines) + "\n").encode() + raw)
    return path


def test_undecodable_bytes_stop_strict_and_are_counted_by_replace_and_skip(tmp_path):
    path = write_lines(tmp_path / "mixed.txt", DOCS, b"bad \xff here\n")
    with pytest.raises(DecodeError, match=rf"{path} is not valid utf-8 text: .* at line 41"):
        load(tmp_path, dataset="text", data_files=str(path))
    for policy, kept in (("replace", 41), ("skip", 40)):
        loaded = load(tmp_path, dataset="text", data_files=str(path), decode_errors=policy)
        assert len(loaded.train) + len(loaded.val) == kept
        assert loaded.files["decode_errors"] == {
            "policy": policy,
            "files": [{"file": str(path), "bad_bytes": 1, "bad_lines": 1}],
        }
    texts = load(tmp_path, dataset="text", data_files=str(path), decode_errors="replace")
    assert "bad \ufffd here" in list(texts.train["text"]) + list(texts.val["text"])


def test_another_encoding_is_read_through_a_utf8_copy(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("\n".join([*DOCS, "naïve café"]).encode("latin-1"))
    loaded = load(tmp_path, dataset="text", data_files=str(path), encoding="latin-1")
    assert "naïve café" in list(loaded.train["text"]) + list(loaded.val["text"])
    assert loaded.files == {}


def test_files_without_text_are_left_out_or_are_the_error(tmp_path):
    good = write_lines(tmp_path / "good.txt", DOCS)
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_bytes(b"")
    blank.write_text("\n  \n\n")
    loaded = load(tmp_path, dataset="text", data_files=[str(good), str(empty)])
    assert loaded.files == {"left_out_without_text": [str(empty)]}
    with pytest.raises(ValueError, match=rf"data.data_files: {empty} has no text \(it is empty"):
        load(tmp_path, dataset="text", data_files=str(empty))
    with pytest.raises(ValueError, match="none of the 2 files has text"):
        load(tmp_path, dataset="csv", data_files=[str(empty), str(blank)])
    (tmp_path / "empty.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.parquet has no text"):
        load(tmp_path, dataset="parquet", data_files=str(tmp_path / "empty.parquet"))


def test_a_column_of_empty_strings_names_the_split(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("".join(json.dumps({"text": ""}) + "\n" for _ in range(5)))
    with pytest.raises(ValueError, match="the 'train' split has no text: column 'text' is empty"):
        load(tmp_path, dataset="json", data_files=str(path))


def test_a_malformed_json_line_is_named(tmp_path):
    lines = [json.dumps({"text": d}) for d in DOCS]
    lines.insert(7, '{"text": oops}')
    path = write_lines(tmp_path / "docs.jsonl", lines)
    with pytest.raises(ValueError, match=rf"{path} line 8 is not valid JSON \(Expecting value"):
        load(tmp_path, dataset="json", data_files=str(path))


def test_other_builder_errors_are_one_line(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError) as info:
        load(tmp_path, dataset="parquet", data_files=str(path))
    assert str(info.value).startswith(f"data: could not read parquet {path}: ")
    assert "\n" not in str(info.value)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_hub_probe_answers_within_its_timeout():
    start = time.perf_counter()
    reason = hub_unreachable(f"http://127.0.0.1:{closed_port()}", timeout=2)
    assert reason is not None and "refused" in reason.lower()
    assert time.perf_counter() - start < 2
    assert hub_unreachable("not a url") is not None


def test_a_hub_dataset_without_the_hub_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as offline:
        load(tmp_path, dataset="someone/some-dataset")
    assert "'someone/some-dataset' is not in the local cache" in str(offline.value)
    assert "HF_HUB_OFFLINE=1 keeps the Hugging Face Hub out of reach" in str(offline.value)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setattr(data_loading.hub_constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("not probed first"))
    with pytest.raises(ValueError) as unreachable:
        load(tmp_path, dataset="someone/some-dataset")
    message = str(unreachable.value)
    assert f"comes from the Hugging Face Hub, which did not answer at {endpoint}" in message
    assert "set HF_HUB_OFFLINE=1" in message and "--data.dataset text" in message
