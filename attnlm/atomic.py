"""Atomic writes: a file or a folder appears at its path complete, or not at all.

Whatever is written goes to a temporary sibling of the target (same folder, so the same file
system), which is renamed onto the target only when the writing block ends without an exception.
Readers never see half a file; a crash or an exception leaves the old target, if any, in place
and removes the temporary sibling::

    with atomic_write(path, "w", encoding="utf-8") as f:  # .<name>.tmp-<random> beside path
        f.write(text)                                     # then flush, fsync, os.replace
    with atomic_folder(out) as tmp:                       # an empty folder beside out
        (tmp / "config.json").write_text("{}")            # renamed to out when the block ends

Both create missing parent folders. What they create has the permissions of a plain `open` or
`mkdir` (0666 / 0777 less the umask), not the 0600 / 0700 of `tempfile`'s functions, so other
users (a container's uid) can read the result as they could read any new file: `atomic_folder`
sets them on everything in the folder before the rename, whatever its writers made (safetensors
writes 0600).
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A fresh hidden name beside `path`: `.<name>.<kind>-<12 hex digits>`."""
    return path.with_name(f".{path.name}.{kind}-{secrets.token_hex(6)}")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """Write the file at `path` atomically: yield a new temporary file beside it; when the block
    ends, flush, fsync and rename it onto `path` (replacing any file there).

    Args:
        path: the file to write.
        mode: "wb" (bytes) or "w" (text; pass `encoding`, `newline`, ... as to `open`).
    Raises:
        Whatever the block raises, after removing the temporary file; `path` is then untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    try:
        with open(tmp, mode.replace("w", "x"), **open_kwargs) as f:  # "x": a new file, 0666 - umask
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Write the folder at `path` atomically: yield a new empty folder beside it to fill; when the
    block ends, give its contents plain permissions and rename it to `path`.

    Args:
        path: the folder to write.
        replace: True: a folder (or file) already at `path` is replaced: moved aside, the new
            folder renamed into place, the old one deleted (if the rename fails, the old one is
            put back). False: if something is at `path` by the time of the rename (another
            process wrote it meanwhile), raise FileExistsError and keep that.
    Raises:
        Whatever the block raises, and FileExistsError (replace=False), after deleting the
        temporary folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(path)
    tmp.mkdir()  # 0777 less the umask, like any mkdir
    try:
        yield tmp
        _plain_permissions(tmp)
        if replace:
            _replace(tmp, path)
        else:
            try:
                os.rename(tmp, path)  # fails if path is a non-empty folder or a file
            except OSError as err:
                if path.exists():
                    raise FileExistsError(f"{path} already exists") from err
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _plain_permissions(folder: Path) -> None:
    """chmod everything in `folder` to what a plain mkdir / open makes: 0777 / 0666 less the
    umask, read off `folder` itself (made by mkdir), so the process-wide umask is left alone."""
    dir_mode = stat.S_IMODE(folder.stat().st_mode) & 0o777
    for root, dirs, files in os.walk(folder):
        for names, mode in ((dirs, dir_mode), (files, dir_mode & 0o666)):
            for name in names:
                entry = Path(root) / name
                if not entry.is_symlink():
                    entry.chmod(mode)


def _replace(new: Path, path: Path) -> None:
    """Rename folder `new` to `path`, moving whatever is at `path` aside first and deleting it."""
    old = None
    if path.exists() or path.is_symlink():
        old = _temporary_sibling(path, "old")
        os.replace(path, old)
    try:
        os.replace(new, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
