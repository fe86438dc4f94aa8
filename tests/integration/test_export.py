"""Export a trained checkpoint to a GPT-2 folder; load it with attnlm and with transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from attnlm.artifact import ArtifactError, load_artifact
from training.cli import main
from training.export import model_from_checkpoint, read_checkpoint

SENTENCE = "The cat that was sitting on the mat which was next to the dog jumps."


@pytest.fixture(scope="module")
def artifact_dir(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact") / "tiny"
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(trained_run / "checkpoints" / "best.ckpt"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_export_writes_a_gpt2_folder_without_pickles(artifact_dir):
    names = {p.name for p in artifact_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".ckpt", ".pkl")) for n in names)
    config = json.loads((artifact_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 2
    info = json.loads((artifact_dir / "attnlm.json").read_text())
    assert info["global_step"] in (6, 12) and "best_val_loss" in info


def test_exported_model_gives_identical_logits(trained_run, artifact_dir):
    art = load_artifact(artifact_dir)
    original = model_from_checkpoint(read_checkpoint(trained_run / "checkpoints" / "best.ckpt"))
    ids = torch.tensor([art.tokenizer.encode(SENTENCE)[: art.config.block_size]])  # the context
    torch.testing.assert_close(art.model(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_transformers_loads_the_folder_with_same_logits_and_attention(artifact_dir):
    transformers = pytest.importorskip("transformers")
    art = load_artifact(artifact_dir)
    hf = transformers.GPT2LMHeadModel.from_pretrained(
        artifact_dir, attn_implementation="eager"
    ).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(artifact_dir)
    ids = art.tokenizer.encode(SENTENCE)
    assert hf_tok(SENTENCE)["input_ids"] == ids
    assert hf_tok.decode(ids) == SENTENCE
    x = torch.tensor([ids[: art.config.block_size]])  # what fits the context
    ours = art.model(x, return_attention=True)
    with torch.no_grad():
        theirs = hf(x, output_attentions=True)
    torch.testing.assert_close(theirs.logits, ours.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(theirs.attentions), ours.attention, atol=1e-5, rtol=1e-4)


def test_generate_command_prints_completions(artifact_dir, capsys):
    code = main(
        [
            "generate",
            "--artifact",
            str(artifact_dir),
            "--prompt",
            "The cat",
            "--num_samples",
            "2",
            "--max_new_tokens",
            "8",
            "--seed",
            "0",
        ]
    )
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("The cat" in line for line in lines)


def test_corrupt_or_mismatched_artifact_fails_clearly(artifact_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(artifact_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        load_artifact(broken)

    mismatched = tmp_path / "mismatched"
    shutil.copytree(artifact_dir, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["n_embd"] = 64
    (mismatched / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="has shape"):
        load_artifact(mismatched)

    (mismatched / "config.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(mismatched)

    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "nowhere")

    (broken / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="no tokenizer.json"):
        load_artifact(broken)


def test_export_rejects_a_foreign_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"something": torch.zeros(1)}, bogus)
    assert main(["export", "--checkpoint", str(bogus), "--out", str(tmp_path / "out")]) == 1
    assert "not written by `attnlm fit`" in capsys.readouterr().err
