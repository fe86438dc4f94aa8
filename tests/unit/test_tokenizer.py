"""Byte-level BPE tokenizer: exact round trips, save/load, errors, per-token label strings."""

import json
import subprocess
import sys

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from attnlm.corpus import generate_corpus
from attnlm.tokenizer import EOT_TOKEN, Tokenizer, TokenizerError

TEXTS = [
    "",
    "The cat that was sitting on the mat jumps.",
    "   three leading spaces and trailing ones   ",
    " one leading space",
    "tabs\tand\nnewlines\r\nmixed",
    "naïve café, “curly quotes” — em dash, ß, Ωmega",
    "emoji 🐈‍⬛ with ZWJ, flags 🇫🇷, skin tone 👩🏽‍💻",
    "中文字符 and 日本語のテキスト",
    f"two documents{EOT_TOKEN}joined by the EOT token",
    "\x00 control \x7f bytes",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(generate_corpus(2000, seed=0), vocab_size=400)


def test_core_module_imports_neither_lightning_nor_ray():
    code = "import sys, attnlm.tokenizer; print(sorted({'lightning', 'ray', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_trained_vocab_has_bytes_eot_and_merges(tok):
    assert 257 < tok.vocab_size <= 400
    assert tok.encode(EOT_TOKEN) == [tok.eot_id]
    assert tok.decode([tok.eot_id]) == EOT_TOKEN
    # merges learned from the corpus: a common word is a single token, with its leading space
    assert len(tok.encode(" the")) == 1


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_encode_batch_equals_encode(tok):
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_save_load_gives_identical_ids(tok, tmp_path):
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    assert path == tmp_path / "sub" / "tokenizer.json"
    assert [p.name for p in path.parent.iterdir()] == ["tokenizer.json"]  # no temp file left
    loaded = Tokenizer.from_file(path)
    assert loaded.vocab_size == tok.vocab_size and loaded.eot_id == tok.eot_id
    for text in TEXTS:
        assert loaded.encode(text) == tok.encode(text)
    assert json.loads(tok.to_json_str()) == json.loads(path.read_text(encoding="utf-8"))
    assert Tokenizer.from_json_str(tok.to_json_str()).encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_small_corpus_gives_smaller_vocab_than_asked():
    small = Tokenizer.train(["aaa bbb"] * 10, vocab_size=5000)
    assert 257 <= small.vocab_size < 5000
    assert small.decode(small.encode("aaa bbb ccc")) == "aaa bbb ccc"


def test_train_accepts_batches_of_texts():
    corpus = generate_corpus(200, seed=1)
    flat = Tokenizer.train(corpus, vocab_size=300)
    batched = Tokenizer.train([corpus[i : i + 50] for i in range(0, 200, 50)], vocab_size=300)
    assert batched.encode(corpus[0]) == flat.encode(corpus[0])


@pytest.mark.parametrize("vocab_size", [0, 100, 256])
def test_vocab_below_bytes_plus_eot_rejected(vocab_size):
    with pytest.raises(TokenizerError, match="vocab_size"):
        Tokenizer.train(["hello"], vocab_size=vocab_size)
    assert issubclass(TokenizerError, ValueError)


def test_missing_file_error_names_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(TokenizerError, match="not found.*nope.json"):
        Tokenizer.from_file(missing)


@pytest.mark.parametrize("content", ["{not json", '{"version": "1.0"}', "[]"])
def test_corrupt_file_error(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json.*not a valid tokenizer.json"):
        Tokenizer.from_file(path)


def test_tokenizer_without_eot_rejected(tmp_path):
    inner = tokenizers.Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.train_from_iterator(["hello world"], trainer=trainers.BpeTrainer(vocab_size=300))
    path = tmp_path / "tokenizer.json"
    inner.save(str(path))
    with pytest.raises(TokenizerError, match="no '<\\|endoftext\\|>' token"):
        Tokenizer.from_file(path)
    with pytest.raises(TokenizerError, match="endoftext"):
        Tokenizer(inner)


def test_token_strings_are_readable(tok):
    ids = tok.encode("The cat is on the mat.")
    strings = tok.token_strings(ids)
    assert len(strings) == len(ids)
    assert "".join(strings) == "The cat is on the mat."
    assert " the" in strings  # "Ġthe" shown with a real space
    assert tok.token_strings([tok.eot_id]) == [EOT_TOKEN]


def test_token_strings_of_split_multibyte_chars_use_replacement_char(tok):
    ids = tok.encode("🐈")  # 4 UTF-8 bytes, not merged in this vocab
    strings = tok.token_strings(ids)
    assert len(strings) == len(ids) > 1
    assert all(s == "\ufffd" for s in strings)
    assert tok.decode(ids) == "🐈"


def test_out_of_range_ids_rejected(tok):
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([1, tok.vocab_size])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.token_strings([-1])
