"""Local text files checked and decoded before `datasets` reads them: one fast pass, clear lines.

`datasets` decodes a text, json or csv file deep inside its builders: a byte that is not UTF-8
ends in a 40-line traceback (a `DatasetGenerationError`, the `UnicodeDecodeError` buried above
it), and an empty file in another one. `decode_file` streams a file in binary chunks through an
incremental decoder first, and knows, before any long work starts:

- the first undecodable byte: its line (1-based) and byte offset (0-based), for the error line;
- how many undecodable bytes there are, and on how many lines, under a policy that goes on;
- whether the file holds any text at all (not empty, not only blank lines).

The policy is `data.decode_errors`:

    strict   the first undecodable byte stops the command (`DecodeError`, naming the ways out)
    replace  each undecodable byte becomes U+FFFD (the replacement character)
    skip     the lines holding undecodable bytes are dropped

`prepare_file` returns the path that `datasets` should read: the file itself when it is clean
UTF-8 (the common case: read once, not copied), else a UTF-8 copy with the policy applied,
written in the same pass that decodes it. Lines are what `datasets`' text builder makes
documents of, and JSON Lines' records.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CHUNK_BYTES = 1 << 20
MARK = "attnlm.mark"  # codec error handler: undecodable byte b -> the lone surrogate U+DC00 + b
_MARKED = re.compile("[\udc00-\udcff]+")  # what strict decoding never yields


def _mark(err: UnicodeError) -> tuple[str, int]:
    """Each undecodable byte becomes a lone surrogate, which `_unmark` takes back."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return "".join(chr(0xDC00 + b) for b in err.object[err.start : err.end]), err.end


def _unmark(marks: str) -> bytes:
    return bytes(ord(c) - 0xDC00 for c in marks)


codecs.register_error(MARK, _mark)


class DecodeError(ValueError):
    """A local data file holds bytes that are not its encoding (data.decode_errors=strict)."""


@dataclass
class FileDecoding:
    """What decoding one file found."""

    path: Path
    bad_bytes: int = 0  # undecodable bytes (replaced, or on dropped lines)
    bad_lines: int = 0  # lines holding them
    first_bad: tuple[int, int, bytes] | None = None  # (line, byte offset, the bytes) of the first
    has_text: bool = False  # any character that is not whitespace (after dropping lines)


def _byte_length(text: str, codec: str) -> int:
    """Bytes of `text` in the file: its characters encoded (less the byte-order mark that
    encoding "" gives), and one per undecodable byte."""
    marks = sum(len(m) for m in _MARKED.findall(text))
    return len(_MARKED.sub("", text).encode(codec)) - len("".encode(codec)) + marks


def decode_file(
    path: Path, codec: str, policy: str, out: IO[str] | None = None, stop_at_bad: bool = False
) -> FileDecoding:
    """Decode `path` from `codec` in chunks; write the text (policy applied) to `out` if given.

    Args:
        policy: "strict", "replace" or "skip" (see the module docstring). Under "strict" decoding
            stops at the first undecodable byte, as under `stop_at_bad`.
        stop_at_bad: stop at the first undecodable byte (`first_bad` says where).
    """
    found = FileDecoding(Path(path))
    decoder = codecs.getincrementaldecoder(codec)(errors=MARK)
    stop_at_bad = stop_at_bad or policy == "strict"
    line = 0  # complete lines before `text`
    fed = 0  # bytes given to the decoder
    carry = ""  # the start of a line that the next chunk finishes
    with open(path, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            final = not chunk
            fed += len(chunk)
            text = carry + decoder.decode(chunk, final)
            cut = len(text) if final else text.rfind("\n") + 1
            lines, carry = text[:cut], text[cut:]  # whole lines, and the start of the next
            bad = _MARKED.search(lines)
            if bad is not None and found.first_bad is None:
                pending = len(decoder.getstate()[0])  # bytes the decoder holds for the next chunk
                text_offset = fed - pending - _byte_length(text, codec)
                found.first_bad = (
                    line + lines.count("\n", 0, bad.start()) + 1,
                    text_offset + _byte_length(text[: bad.start()], codec),
                    _unmark(bad.group())[:8],
                )
                if stop_at_bad:
                    return found
            line += lines.count("\n")
            if bad is not None:
                lines = _apply(lines, policy, found)
            if not found.has_text and lines and not lines.isspace():
                found.has_text = True
            if out is not None:
                out.write(lines)
            if final:
                return found


def _apply(text: str, policy: str, found: FileDecoding) -> str:
    """`text` (whole lines) with the lines holding undecodable bytes replaced or dropped."""
    kept = []
    for line in re.split(r"(?<=\n)", text):  # each line with its newline
        marks = _MARKED.findall(line)
        if not marks:
            kept.append(line)
            continue
        found.bad_lines += 1
        found.bad_bytes += sum(len(m) for m in marks)
        if policy == "replace":
            kept.append(_MARKED.sub(lambda m: "\ufffd" * len(m.group()), line))
    return "".join(kept)


def describe_bad(found: FileDecoding, encoding: str) -> str:
    """The error line for the first undecodable byte of `found`."""
    line, offset, data = found.first_bad
    return (
        f"data.data_files: {found.path} is not valid {encoding} text: undecodable byte(s) "
        f"{data.hex(' ')} at line {line}, byte offset {offset}. Give the file's encoding with "
        "--data.encoding (any codec Python knows, e.g. latin-1 or cp1252), or go on with "
        "--data.decode_errors replace (each such byte becomes U+FFFD) or skip (the lines "
        "holding them are dropped)"
    )


def prepare_file(
    path: Path, codec: str, encoding: str, policy: str, copy: Path
) -> tuple[Path, FileDecoding]:
    """(the path `datasets` should read, what decoding found) for one local text file.

    Clean UTF-8 is read once and not copied; anything else is decoded into `copy` (UTF-8, the
    policy applied). Raises DecodeError under "strict" at the first undecodable byte.
    """
    if codec == "utf-8":
        found = decode_file(path, codec, policy, stop_at_bad=True)
        if found.first_bad is None:
            return path, found
        if policy == "strict":
            raise DecodeError(describe_bad(found, encoding))
    copy.parent.mkdir(parents=True, exist_ok=True)
    with open(copy, "w", encoding="utf-8", newline="") as out:
        found = decode_file(path, codec, policy, out)
    if policy == "strict" and found.first_bad is not None:
        copy.unlink()
        raise DecodeError(describe_bad(found, encoding))
    return copy, found
