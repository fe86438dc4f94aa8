"""text_decoding: the first undecodable byte's line and offset, replace/skip counts, no-text files."""

from __future__ import annotations

import io

import pytest

import training.text_decoding as text_decoding
from training.text_decoding import DecodeError, decode_file, prepare_file

GOOD = "The cat sat.\n" * 3
MIXED = GOOD.encode() + b"bad \xff\xfe here\n" + "café\n".encode() + b"lone \xc3\n" + b"end\n"
FIRST_BAD = MIXED.index(b"\xff")


def decoded(path, codec, policy):
    out = io.StringIO()
    return decode_file(path, codec, policy, out), out.getvalue()


@pytest.fixture(params=[1 << 20, 3], ids=["one-chunk", "3-byte-chunks"])
def chunk_bytes(request, monkeypatch):
    monkeypatch.setattr(text_decoding, "CHUNK_BYTES", request.param)  # lines across chunks too


def test_the_first_undecodable_byte_is_found_with_its_line_and_offset(tmp_path, chunk_bytes):
    path = tmp_path / "mixed.txt"
    path.write_bytes(MIXED)
    found = decode_file(path, "utf-8", "strict")
    assert found.first_bad == (4, FIRST_BAD, b"\xff\xfe")
    assert (found.bad_bytes, found.bad_lines) == (0, 0)  # strict stops at the first


def test_a_truncated_sequence_at_the_end_of_the_file(tmp_path, chunk_bytes):
    path = tmp_path / "cut.txt"
    path.write_bytes("añb\n".encode() * 3 + b"x\xc3")
    assert decode_file(path, "utf-8", "strict").first_bad == (4, 16, b"\xc3")


def test_replace_and_skip_count_what_they_change(tmp_path, chunk_bytes):
    path = tmp_path / "mixed.txt"
    path.write_bytes(MIXED)
    found, text = decoded(path, "utf-8", "replace")
    assert text == GOOD + "bad \ufffd\ufffd here\ncafé\nlone \ufffd\nend\n"
    assert (found.bad_bytes, found.bad_lines, found.has_text) == (3, 2, True)
    found, text = decoded(path, "utf-8", "skip")
    assert text == GOOD + "café\nend\n"
    assert (found.bad_bytes, found.bad_lines) == (3, 2)
    assert found.first_bad[0] == 4


def test_other_codecs_and_their_byte_order_mark(tmp_path, chunk_bytes):
    path = tmp_path / "utf16.txt"
    path.write_bytes("héllo\nwörld\n".encode("utf-16") + b"\x00")  # an odd byte at the end
    found, text = decoded(path, "utf-16", "replace")
    assert text == "héllo\nwörld\n\ufffd"
    assert found.first_bad == (3, 26, b"\x00")  # 2 bytes of BOM + 12 characters of 2 bytes
    latin = tmp_path / "latin.txt"
    latin.write_bytes("naïve café\n".encode("latin-1"))
    assert decoded(latin, "iso8859-1", "strict") == (
        decode_file(latin, "iso8859-1", "strict"),
        "naïve café\n",
    )


@pytest.mark.parametrize("content", [b"", b"\n\n  \n\t\n"], ids=["empty", "blank-lines"])
def test_files_without_text(tmp_path, content):
    path = tmp_path / "nothing.txt"
    path.write_bytes(content)
    assert not decode_file(path, "utf-8", "strict").has_text


def test_a_file_whose_every_line_is_skipped_has_no_text(tmp_path):
    path = tmp_path / "all-bad.txt"
    path.write_bytes(b"\xff\n\xfe\n")
    assert not decode_file(path, "utf-8", "skip").has_text


def test_clean_utf8_is_read_as_it_is_anything_else_from_a_utf8_copy(tmp_path):
    clean = tmp_path / "clean.txt"
    clean.write_text(GOOD, encoding="utf-8")
    copy = tmp_path / "decoded" / "copy.txt"
    assert prepare_file(clean, "utf-8", "utf-8", "strict", copy)[0] == clean
    assert not copy.exists()
    latin = tmp_path / "latin.txt"
    latin.write_bytes("naïve\n".encode("latin-1"))
    read, found = prepare_file(latin, "iso8859-1", "latin-1", "strict", copy)
    assert read == copy and copy.read_text(encoding="utf-8") == "naïve\n"
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(MIXED)
    read, found = prepare_file(mixed, "utf-8", "utf-8", "skip", copy)
    assert read == copy and copy.read_text(encoding="utf-8") == GOOD + "café\nend\n"
    assert (found.bad_bytes, found.bad_lines) == (3, 2)


def test_strict_names_file_line_offset_and_the_ways_out(tmp_path):
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(MIXED)
    copy = tmp_path / "decoded" / "copy.txt"
    with pytest.raises(DecodeError) as info:
        prepare_file(mixed, "utf-8", "utf-8", "strict", copy)
    message = str(info.value)
    assert message.startswith(
        f"data.data_files: {mixed} is not valid utf-8 text: undecodable byte(s) ff fe at line 4, "
        f"byte offset {FIRST_BAD}."
    )
    assert "--data.encoding" in message and "--data.decode_errors replace" in message
    assert isinstance(info.value, ValueError) and "\n" not in message
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("ok\n".encode("utf-16") + b"\x00")
    with pytest.raises(DecodeError, match="is not valid utf-16 text: .* at line 2, byte offset 8"):
        prepare_file(utf16, "utf-16", "utf-16", "strict", copy)
    assert not copy.exists()  # the partial copy is removed
