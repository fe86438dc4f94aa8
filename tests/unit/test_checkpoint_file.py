"""checkpoint_file: a file that is not a checkpoint is named for what it is, in one line."""

from __future__ import annotations

import zipfile

import pytest
import torch
from safetensors.torch import save_file

from attnlm.artifact import ArtifactError
from training.checkpoint_file import EXPECTED, check_lightning_checkpoint, read_checkpoint


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64, 64)}, "hyper_parameters": {"n": 1}}, path)
    return path


def test_a_checkpoint_reads_and_passes_the_check(checkpoint):
    assert read_checkpoint(checkpoint)["hyper_parameters"] == {"n": 1}
    mapped = read_checkpoint(checkpoint, mmap=True)
    assert torch.equal(mapped["state_dict"]["w"], torch.ones(64, 64))
    check_lightning_checkpoint(checkpoint)


def write_zip_without_pickle(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "not a torch archive")


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda p, good: p.write_bytes(b""), "it is empty (0 bytes)"),
        (
            lambda p, good: p.write_text("hello\n"),
            "it is not a zip archive (it starts with b'hello\\n')",
        ),
        (
            lambda p, good: p.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
            "it is truncated",
        ),
        (lambda p, good: write_zip_without_pickle(p), "not one torch.save wrote"),
        (
            lambda p, good: save_file({"w": torch.zeros(2)}, str(p)),
            "it is a safetensors file (an exported model.safetensors?)",
        ),
        (lambda p, good: p.mkdir(), "it is a folder"),
    ],
    ids=["empty", "text", "truncated", "foreign-zip", "safetensors", "folder"],
)
def test_what_the_file_is_instead(tmp_path, checkpoint, make, what):
    path = tmp_path / "bad.ckpt"
    make(path, checkpoint)
    for read in (read_checkpoint, check_lightning_checkpoint):
        with pytest.raises(ArtifactError) as info:
            read(path)
        message = str(info.value)
        assert message.startswith(f"{path} is not an attnlm checkpoint ({EXPECTED}): ")
        assert what in message and "\n" not in message


def test_a_torch_file_that_is_not_a_lightning_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"something": torch.zeros(1)}, path)
    assert "something" in read_checkpoint(path)  # export names what is missing itself
    with pytest.raises(ArtifactError, match="has no 'state_dict': not written by `attnlm fit`"):
        check_lightning_checkpoint(path)
    torch.save([1, 2], path)
    with pytest.raises(ArtifactError, match="it holds a list, not a dict"):
        read_checkpoint(path)


def test_a_missing_file(tmp_path):
    with pytest.raises(ArtifactError, match="checkpoint not found"):
        read_checkpoint(tmp_path / "nowhere.ckpt")
