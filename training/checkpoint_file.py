"""Reading a Lightning checkpoint file, with one clear line when the file is not one.

`read_checkpoint(path)` is `torch.load(path, weights_only=True)` for the checkpoints `attnlm fit`
writes (zip archives from torch.save). A file that is not such an archive is named with what it is
instead (empty, truncated, not a zip archive, a safetensors file, a folder), before torch's
unpickler can fail on it with an error that says nothing to the user:

    >>> read_checkpoint("notes.txt")
    Traceback (most recent call last):
    ...
    attnlm.artifact.ArtifactError: notes.txt is not an attnlm checkpoint (a file written by `attnlm fit`, a zip archive from torch.save): it is not a zip archive (it starts with b'hello\\n')

`attnlm export --checkpoint` reads checkpoints with it, and `attnlm fit|validate --ckpt_path`
checks the file with `check_lightning_checkpoint` before Lightning loads it.
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from attnlm.artifact import ArtifactError

EXPECTED = "a file written by `attnlm fit`, a zip archive from torch.save"
ZIP_MAGIC = b"PK\x03\x04"


def _not_a_checkpoint(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path} is not an attnlm checkpoint ({EXPECTED}): {what}")


def _looks_like_safetensors(head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    return len(head) >= 10 and head[8:10] == b'{"' and struct.unpack("<Q", head[:8])[0] < 1 << 30


def file_problem(path: Path) -> str | None:
    """What the file at `path` is, if it is not a zip archive that torch.save could have written."""
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(16)
    if _looks_like_safetensors(head):
        return (
            "it is a safetensors file (an exported model.safetensors?), not a training checkpoint"
        )
    if not head.startswith(ZIP_MAGIC):
        return f"it is not a zip archive (it starts with {head[:8]!r})"
    if not zipfile.is_zipfile(path):
        return (
            f"it is truncated ({size:,} bytes: it starts as a zip archive but its end, the zip "
            "directory, is missing; an interrupted copy or write?)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"it is a damaged zip archive ({err})"
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return "it is a zip archive, but not one torch.save wrote (it holds no data.pkl)"
    return None


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's contents (`torch.load(weights_only=True)` on the CPU).

    Args:
        mmap: map the tensors' storage instead of reading it (cheap: for looking at the keys).
    Raises:
        ArtifactError: no such file, or one that is not a checkpoint (saying what it is instead).
    """
    path = Path(path)
    if path.is_dir():
        raise _not_a_checkpoint(
            path, "it is a folder (checkpoints are files: RUN/checkpoints/*.ckpt)"
        )
    if not path.is_file():
        raise ArtifactError(f"checkpoint not found: {path}")
    problem = file_problem(path)
    if problem is not None:
        raise _not_a_checkpoint(path, problem)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises several types for a damaged or foreign archive
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise _not_a_checkpoint(path, f"torch.load could not read it ({reason})") from err
    if not isinstance(checkpoint, dict):
        raise _not_a_checkpoint(path, f"it holds a {type(checkpoint).__name__}, not a dict")
    return checkpoint


def check_lightning_checkpoint(path: str | os.PathLike) -> None:
    """Raise ArtifactError unless `path` is a checkpoint that Lightning can resume or validate."""
    checkpoint = read_checkpoint(path, mmap=True)
    for key in ("state_dict", "hyper_parameters"):
        if key not in checkpoint:
            raise ArtifactError(
                f"{path} is not an attnlm checkpoint: it has no {key!r}: not written by `attnlm fit`"
            )
