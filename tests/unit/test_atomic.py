"""attnlm.atomic: files and folders appear complete or not at all, with no temporary litter."""

from __future__ import annotations

import os
import stat

import pytest

from attnlm import atomic
from attnlm.atomic import atomic_folder, atomic_write


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_creates_parents_writes_and_replaces(tmp_path, umask_022):
    path = tmp_path / "a" / "b" / "notes.txt"
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("naïve\nline two\n")
    assert path.read_bytes() == "naïve\nline two\n".encode()
    assert mode_of(path) == 0o644  # 0666 less the umask, not tempfile's 0600
    with atomic_write(str(path)) as f:  # str paths; bytes by default; replaces the file
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in path.parent.iterdir()] == ["notes.txt"]


def test_write_is_invisible_until_the_block_ends(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as f:
        f.write(b"new")
        f.flush()
        assert path.read_bytes() == b"old"
        (tmp,) = (p for p in tmp_path.iterdir() if p != path)
        assert tmp.name.startswith(".f.bin.tmp-")
    assert path.read_bytes() == b"new"


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="half way"), atomic_write(path) as f:
        f.write(b"half a file")
        raise RuntimeError("half way")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    with pytest.raises(RuntimeError), atomic_write(tmp_path / "new.bin") as f:
        raise RuntimeError("before anything")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no new file either


def test_failed_rename_leaves_no_temp(tmp_path, monkeypatch):
    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"), atomic_write(tmp_path / "f.txt", "w") as f:
        f.write("text")
    assert list(tmp_path.iterdir()) == []


def test_write_syncs_before_renaming(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(
        atomic.os, "replace", lambda a, b: events.append("replace") or real_replace(a, b)
    )
    with atomic_write(tmp_path / "f.bin") as f:
        f.write(b"x")
    assert events == ["fsync", "replace"]


def test_write_refuses_read_or_append_modes(tmp_path):
    for mode in ("r", "a", "rb+"):
        with pytest.raises(ValueError, match="mode"), atomic_write(tmp_path / "f", mode):
            pass
    assert list(tmp_path.iterdir()) == []


def test_folder_appears_whole_with_plain_permissions(tmp_path, umask_022):
    out = tmp_path / "deep" / "artifact"
    with atomic_folder(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".artifact.tmp-")
        (tmp / "config.json").write_text("{}")
        assert not out.exists()
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert mode_of(out) == 0o755  # 0777 less the umask, not mkdtemp's 0700
    assert [p.name for p in out.parent.iterdir()] == ["artifact"]


def test_folder_replaces_an_existing_folder(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with atomic_folder(out) as tmp:
        (tmp / "fresh.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["fresh.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # the old one is gone


def test_failed_folder_keeps_the_old_one_and_leaves_no_temp(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="crash"), atomic_folder(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crash")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_failed_folder_rename_puts_the_old_one_back(tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"), atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_folder_without_replace_keeps_what_another_process_wrote(tmp_path):
    out = tmp_path / "cache"
    with pytest.raises(FileExistsError), atomic_folder(out, replace=False) as tmp:
        (tmp / "mine.txt").write_text("mine")
        out.mkdir()  # another process finishes the same folder first
        (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    fresh = tmp_path / "fresh"
    with atomic_folder(fresh, replace=False) as tmp:
        (tmp / "mine.txt").write_text("mine")
    assert [p.name for p in fresh.iterdir()] == ["mine.txt"]


def test_folder_contents_get_plain_permissions_whatever_their_writers_made(tmp_path, umask_022):
    out = tmp_path / "artifact"
    with atomic_folder(out) as tmp:
        (tmp / "weights").write_bytes(b"w")
        (tmp / "weights").chmod(0o600)  # as safetensors' save_file leaves it
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x.json").write_text("{}")
        (tmp / "sub" / "x.json").chmod(0o600)
    assert mode_of(out) == mode_of(out / "sub") == 0o755
    assert mode_of(out / "weights") == mode_of(out / "sub" / "x.json") == 0o644
