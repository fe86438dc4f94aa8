"""TextDataModule: cache build and reuse, packing, windows, local files, argument errors."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read when `datasets` is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import pickle  # noqa: E402

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pa_csv  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import training.token_cache  # noqa: E402
from attnlm.corpus import generate_corpus  # noqa: E402
from attnlm.tokenizer import EOT_TOKEN, Tokenizer  # noqa: E402
from training.data import (  # noqa: E402
    EpochWindowSampler,
    RandomWindowDataset,
    TextDataModule,
    window_start,
)

SMALL = dict(
    corpus_sentences=2000, block_size=16, batch_size=8, samples_per_epoch=64, max_val_samples=50
)
SEED = 1337


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def builtin(cache_root) -> TextDataModule:
    dm = TextDataModule(cache_dir=str(cache_root), **SMALL)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def split_docs(dm: TextDataModule, split: str) -> list[str]:
    """The documents of a packed split, decoded from the memory-mapped tokens."""
    ds = dm.train_dataset if split == "train" else dm.val_dataset
    text = dm.tokenizer.decode(ds.tokens.tolist())
    docs = text.split(EOT_TOKEN)
    assert docs[-1] == ""  # every document ends with EOT
    return docs[:-1]


def test_builtin_cache_layout_and_meta(builtin):
    corpus = generate_corpus(2000, seed=SEED)
    path = builtin.cache_path
    assert path.name.startswith("builtin-")
    names = {p.name for p in path.iterdir()}
    assert names == {"meta.json", "tokenizer.json", "train.bin", "val.bin", "corpus.txt"}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp dirs left behind
    meta = json.loads((path / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and meta["fingerprint"] == builtin.fingerprint
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert (train["documents"], val["documents"]) == (1900, 100)
    assert train["chars"] + val["chars"] == sum(len(s) + 1 for s in corpus)  # +1: EOT per doc
    assert (path / "train.bin").stat().st_size == 2 * train["tokens"] == 2 * builtin.train_tokens
    assert (path / "val.bin").stat().st_size == 2 * val["tokens"] == 2 * builtin.val_tokens
    assert builtin.val_chars_per_token == pytest.approx(val["chars"] / val["tokens"])
    assert 2 < builtin.val_chars_per_token < 4
    assert builtin.vocab_size == 512 >= builtin.tokenizer.vocab_size == meta["vocab_size"]
    assert builtin.tokenizer_file == path / "tokenizer.json"
    assert (path / "corpus.txt").read_text().splitlines() == corpus


def test_packed_tokens_decode_back_to_corpus(builtin):
    train, val = split_docs(builtin, "train"), split_docs(builtin, "val")
    assert len(train) == 1900 and len(val) == 100
    assert sorted(train + val) == sorted(generate_corpus(2000, seed=SEED))


def test_train_windows_shape_shift_and_source(builtin):
    loader = builtin.train_dataloader()
    assert len(loader) == 64 // 8
    x, y = next(iter(loader))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    ds = builtin.train_dataset
    for i in range(8):
        start = ds.start(i)
        assert torch.equal(x[i], torch.from_numpy(ds.tokens[start : start + 16].astype(np.int64)))
        assert y[i, -1].item() == ds.tokens[start + 16]
    starts = [ds.start(i) for i in range(64)]
    assert min(starts) >= 0 and max(starts) <= builtin.train_tokens - 17
    assert len(set(starts)) > 60  # random offsets, not a fixed grid


def test_windows_are_deterministic_per_seed_epoch_and_index(builtin, cache_root):
    again = TextDataModule(cache_dir=str(cache_root), **SMALL)
    again.prepare_data()
    again.setup("fit")
    a, b = builtin.train_dataset, again.train_dataset
    for k in (0, 5, 63, 64, 64 * 7 + 3):
        assert torch.equal(a[k][0], b[k][0])
    epoch0 = [a.start(i) for i in range(64)]
    epoch1 = [a.start(64 + i) for i in range(64)]
    assert epoch0 != epoch1  # every epoch sees new windows
    n = a.num_starts
    assert epoch1 == [window_start(SEED, 1, i, n) for i in range(64)]
    assert epoch0 != [window_start(SEED + 1, 0, i, n) for i in range(64)]


def test_sampler_encodes_epoch_and_shards_ranks(builtin):
    ds = builtin.train_dataset
    single = EpochWindowSampler(ds)
    assert list(single) == list(range(64))
    single.set_epoch(2)
    assert list(single) == list(range(128, 192))
    ranks = [EpochWindowSampler(ds, num_replicas=2, rank=r) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(2)
    r0, r1 = list(ranks[0]), list(ranks[1])
    assert len(r0) == len(r1) == 32 and not set(r0) & set(r1)
    assert sorted(r0 + r1) == list(range(128, 192))
    odd = EpochWindowSampler(RandomWindowDataset(ds.path, ds.dtype, ds.num_tokens, 16, 7, 0), 2, 1)
    assert list(odd) == [1, 3, 5] and len(odd) == 3  # the remainder is dropped


def test_val_windows_are_consecutive_and_capped(builtin):
    ds = builtin.val_dataset
    assert len(ds) == min((builtin.val_tokens - 1) // 16, 50)
    loader = builtin.val_dataloader()
    x, y = next(iter(loader))
    assert torch.equal(x[1:, 0], y[:-1, -1])  # window i+1 starts where window i's targets end
    assert torch.equal(x[0], torch.from_numpy(ds.tokens[:16].astype(np.int64)))
    assert sum(len(b[0]) for b in loader) == len(ds)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_cache_reused_without_retokenizing(builtin, cache_root, monkeypatch):
    mtimes = {p.name: p.stat().st_mtime_ns for p in builtin.cache_path.iterdir()}

    def fail(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(Tokenizer, "train", fail)
    monkeypatch.setattr(datasets, "load_dataset", fail)
    monkeypatch.setattr(datasets.Dataset, "map", fail)
    again = TextDataModule(cache_dir=str(cache_root), **{**SMALL, "block_size": 8, "batch_size": 4})
    assert again.cache_path == builtin.cache_path  # window settings are not cache content
    again.prepare_data()
    again.setup("fit")
    assert {p.name: p.stat().st_mtime_ns for p in builtin.cache_path.iterdir()} == mtimes
    assert again.train_tokens == builtin.train_tokens


@pytest.mark.parametrize(
    "change", [{"vocab_size": 600}, {"seed": 1}, {"corpus_sentences": 2001}, {"val_fraction": 0.1}]
)
def test_content_settings_change_the_cache_dir(builtin, cache_root, change):
    other = TextDataModule(cache_dir=str(cache_root), **{**SMALL, **change})
    assert other.cache_path.parent == builtin.cache_path.parent
    assert other.cache_path != builtin.cache_path


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(training.token_cache, "tokenize_to_files", crash)
    dm = TextDataModule(cache_dir=str(tmp_path), **{**SMALL, "corpus_sentences": 200})
    with pytest.raises(RuntimeError, match="disk on fire"):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="call prepare_data"):
        dm.setup("fit")


def test_results_before_setup_raise(tmp_path):
    dm = TextDataModule(cache_dir=str(tmp_path))
    assert dm.vocab_size == 512
    for name in ("tokenizer", "train_tokens", "val_chars_per_token"):
        with pytest.raises(RuntimeError, match="setup"):
            getattr(dm, name)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()


def write_docs(path, builder: str, docs: list[str], column: str) -> None:
    if builder == "text":
        path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    elif builder == "json":
        path.write_text(
            "".join(json.dumps({column: d, "id": i}) + "\n" for i, d in enumerate(docs))
        )
    elif builder == "parquet":
        pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path)
    else:
        pa_csv.write_csv(pa.table({column: docs, "id": list(range(len(docs)))}), path)


LOCAL_DOCS = generate_corpus(300, seed=5) + ["naïve café 🐈‍⬛", "  leading spaces", "中文"]


@pytest.mark.parametrize(
    "builder, suffix, column",
    [
        ("text", "txt", "text"),
        ("json", "jsonl", "body"),
        ("parquet", "parquet", "text"),
        ("csv", "csv", "content"),
    ],
)
def test_local_files(tmp_path, builder, suffix, column):
    path = tmp_path / f"docs.{suffix}"
    docs = LOCAL_DOCS[:150] + ([""] if builder == "text" else []) + LOCAL_DOCS[150:]
    write_docs(path, builder, docs, column)
    dm = TextDataModule(
        dataset=builder,
        data_files=str(path),
        text_column=column,
        cache_dir=str(tmp_path / "cache"),
        vocab_size=300,
        **{k: v for k, v in SMALL.items() if k != "corpus_sentences"},
    )
    assert dm.cache_path.name.startswith(f"{builder}-docs-")
    dm.prepare_data()
    dm.setup("fit")
    assert dm.meta["dtype"] == "uint16" and dm.tokenizer.vocab_size <= 300
    train, val = split_docs(dm, "train"), split_docs(dm, "val")
    assert sorted(train + val) == sorted(LOCAL_DOCS)  # empty documents are dropped
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 16)


def test_local_dataset_dir_uses_its_validation_split_and_slicing(tmp_path):
    data_dir = tmp_path / "my_dataset"
    data_dir.mkdir()
    train_docs, val_docs = generate_corpus(200, seed=7), generate_corpus(20, seed=8)
    write_docs(data_dir / "train.jsonl", "json", train_docs, "text")
    write_docs(data_dir / "validation.jsonl", "json", val_docs, "text")
    dm = TextDataModule(
        dataset=str(data_dir), split="train[:50%]", cache_dir=str(tmp_path / "cache"), **SMALL
    )
    assert dm.cache_path.name.startswith("my_dataset-")
    dm.prepare_data()
    dm.setup("validate")
    assert dm.meta["val_source"] == "split 'validation'"
    assert split_docs(dm, "val") == val_docs
    assert split_docs(dm, "train") == train_docs[:100]


def test_given_tokenizer_is_used_and_sets_vocab_size(builtin, tmp_path):
    path = tmp_path / "docs.txt"
    write_docs(path, "text", LOCAL_DOCS, "text")
    dm = TextDataModule(
        dataset="text",
        data_files=str(path),
        tokenizer_path=str(builtin.tokenizer_file),
        vocab_size=9999,  # ignored: the tokenizer decides
        cache_dir=str(tmp_path / "cache"),
        **{k: v for k, v in SMALL.items() if k != "corpus_sentences"},
    )
    assert dm.vocab_size == builtin.tokenizer.vocab_size
    assert dm.tokenizer_file == builtin.tokenizer_file
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.cache_path / "tokenizer.json").read_text() == builtin.tokenizer.to_json_str()
    assert dm.state_dict()["tokenizer_json"] == builtin.tokenizer.to_json_str()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_size": 0}, "data.block_size"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"val_fraction": 0.0}, "data.val_fraction"),
        ({"val_fraction": 1.0}, "data.val_fraction"),
        ({"vocab_size": 256}, "data.vocab_size"),
        ({"samples_per_epoch": 0}, "data.samples_per_epoch"),
        ({"samples_per_epoch": 10, "batch_size": 32}, "data.samples_per_epoch: 10 is less than"),
        ({"max_val_samples": 0}, "data.max_val_samples"),
        ({"num_proc": 0}, "data.num_proc"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"corpus_sentences": 0}, "data.corpus_sentences"),
        ({"block_size": 1.5}, "data.block_size"),
        ({"text_column": ""}, "data.text_column"),
        ({"dataset": "text"}, "data.data_files: required"),
        (
            {"dataset": "json", "data_files": "/no/such.jsonl"},
            "data.data_files: no such file: /no/such.jsonl",
        ),
        ({"dataset": "text", "data_files": "/no/where/*.txt"}, "data.data_files: no file matches"),
        ({"data_files": "x.txt"}, "data.data_files: set, but data.dataset is None"),
        ({"tokenizer_path": "/no/tokenizer.json"}, "data.tokenizer_path: tokenizer file not found"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_field(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        TextDataModule(cache_dir=str(tmp_path), **kwargs)


def test_all_bad_settings_reported_at_once(tmp_path):
    with pytest.raises(ValueError) as info:
        TextDataModule(cache_dir=str(tmp_path), block_size=0, batch_size=0, vocab_size=10)
    assert all(f"data.{f}" in str(info.value) for f in ("block_size", "batch_size", "vocab_size"))


def test_dataset_path_to_a_file_is_rejected(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("{}\n")
    with pytest.raises(ValueError, match="data.dataset: .* is a file"):
        TextDataModule(dataset=str(path), cache_dir=str(tmp_path))


def test_missing_text_column_is_named(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_docs(path, "json", LOCAL_DOCS, "body")
    dm = TextDataModule(dataset="json", data_files=str(path), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match=r"data.text_column: no column 'text'.*\['body', 'id'\]"):
        dm.prepare_data()


def test_split_too_short_for_a_window(tmp_path):
    path = tmp_path / "tiny.txt"
    write_docs(path, "text", ["a cat.", "two dogs.", "one bird."], "text")
    dm = TextDataModule(
        dataset="text", data_files=str(path), block_size=512, cache_dir=str(tmp_path / "c")
    )
    dm.prepare_data()
    with pytest.raises(
        ValueError, match=r"the train split has \d+ tokens; data.block_size=512 needs at least 513"
    ):
        dm.setup("fit")


def test_datasets_pickle_without_their_tokens(builtin):
    ds = builtin.train_dataset
    _ = ds.tokens  # opened in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 2000
    clone = pickle.loads(blob)
    assert torch.equal(clone[3][1], ds[3][1])


def test_worker_processes_give_the_same_batches(builtin, cache_root):
    workers = TextDataModule(cache_dir=str(cache_root), num_workers=1, **SMALL)
    workers.setup("fit")
    with_workers = [x for x, _ in workers.train_dataloader()]
    in_process = [x for x, _ in builtin.train_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(with_workers, in_process, strict=True))


def test_sampler_resume_skips_consumed_samples_of_that_epoch_only():
    from training.data import EpochWindowSampler

    dataset = list(range(10))
    sampler = EpochWindowSampler(dataset, num_replicas=2, rank=1)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.resume_at(epoch=3, samples=2)
    assert list(sampler) == full[2:]
    assert list(sampler) == full  # the skip applies to one pass only
    sampler.resume_at(epoch=2, samples=2)  # a checkpoint from an earlier, finished epoch
    assert list(sampler) == full


@pytest.mark.parametrize("policy", ["replace", "skip"])
def test_replace_and_skip_train_on_the_rest_and_count(tmp_path, policy, caplog):
    path = tmp_path / "scraped.txt"
    docs = generate_corpus(300, seed=9)
    path.write_bytes(
        ("\n".join(docs[:150]) + "\n").encode()
        + b"broken \xff\xfe bytes\n\nlone \xc3\n"
        + ("\n".join(docs[150:]) + "\n").encode()
    )
    kwargs = {k: v for k, v in SMALL.items() if k != "corpus_sentences"}
    dm = TextDataModule(
        dataset="text", data_files=str(path), decode_errors=policy, vocab_size=300,
        cache_dir=str(tmp_path / "cache"), **kwargs,
    )  # fmt: skip
    strict = TextDataModule(
        dataset="text", data_files=str(path), cache_dir=str(tmp_path / "cache"), **kwargs
    )
    assert dm.cache_path != strict.cache_path  # the policy is part of the cache key
    with caplog.at_level("INFO"):
        dm.prepare_data()
    dm.setup("fit")
    trained = split_docs(dm, "train") + split_docs(dm, "val")
    if policy == "replace":
        assert sorted(trained) == sorted([*docs, "broken \ufffd\ufffd bytes", "lone \ufffd"])
        note = f"replaced 3 undecodable bytes with U+FFFD on 2 lines of {path}"
    else:
        assert sorted(trained) == sorted(docs)
        note = f"dropped 2 lines holding 3 undecodable bytes from {path}"
    assert note in caplog.text
    assert "skipped 1 empty documents" in caplog.text  # the blank line
    assert sum(s["empty_documents"] for s in dm.meta["splits"].values()) == 1
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 16)
