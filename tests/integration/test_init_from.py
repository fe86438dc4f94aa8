"""`attnlm fit --model.init_from FOLDER`: fine-tuning from a GPT-2 folder made by transformers
(random weights, nothing downloaded): shape and tokenizer from the folder, a few steps lower the
loss, export, reload; a config that contradicts the folder is one error line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnlm.artifact import load_artifact
from attnlm.config import ConfigError
from attnlm.corpus import generate_corpus
from attnlm.tokenizer import Tokenizer
from training.cli import main
from training.data import TextDataModule
from training.export import export_checkpoint
from training.module import LanguageModel

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 32}
POSITIONS = 64


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizer = Tokenizer.train(generate_corpus(3000, seed=5), vocab_size=300)
    config = transformers.GPT2Config(
        vocab_size=tokenizer.vocab_size, n_positions=POSITIONS, **SHAPE
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf") / "gpt2-small-random"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save(folder / "tokenizer.json")
    return folder


def mean_loss(model: torch.nn.Module, dm: TextDataModule, batches: int = 8) -> float:
    model.eval()
    losses = []
    with torch.no_grad():
        for i, (x, y) in enumerate(dm.val_dataloader()):
            if i == batches:
                break
            losses.append(model(x, y).loss.item())
    return float(np.mean(losses))


def test_the_module_starts_from_the_folders_weights(gpt2_folder):
    art = load_artifact(gpt2_folder)
    vocab = art.tokenizer.vocab_size
    lm = LanguageModel(vocab_size=vocab, block_size=POSITIONS, init_from=str(gpt2_folder), **SHAPE)
    for name, tensor in art.model.state_dict().items():
        torch.testing.assert_close(lm.model.state_dict()[name], tensor, rtol=0, atol=0)
    short = LanguageModel(vocab_size=vocab, block_size=16, init_from=str(gpt2_folder), **SHAPE)
    wpe = short.model.transformer.wpe.weight
    assert wpe.shape[0] == 16 and torch.equal(wpe, art.model.transformer.wpe.weight[:16])
    with pytest.raises(ConfigError, match=r"n_embd 64 \(the folder's: 32\)"):
        LanguageModel(
            vocab_size=vocab, block_size=16, init_from=str(gpt2_folder), **{**SHAPE, "n_embd": 64}
        )


def test_fine_tuning_lowers_the_loss_then_exports_and_reloads(gpt2_folder, tmp_path):
    root, cache = tmp_path / "run", tmp_path / "cache"
    args = [
        "fit", "--model.init_from", str(gpt2_folder),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.max_steps", "30", "--trainer.val_check_interval", "30",
        "--trainer.limit_val_batches", "2", "--trainer.log_every_n_steps", "10",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
        "--model.learning_rate", "3e-3", "--model.warmup_steps", "2",
        "--data.corpus_sentences", "2000", "--data.batch_size", "16",
        "--data.samples_per_epoch", "1000", "--data.cache_dir", str(cache),
        "--speed.measure_cpu_peak", "false",
    ]  # fmt: skip
    assert main(args) == 0
    dm = TextDataModule(
        corpus_sentences=2000,
        tokenizer_path=str(gpt2_folder / "tokenizer.json"),
        block_size=POSITIONS,
        batch_size=16,
        samples_per_epoch=1000,
        cache_dir=str(cache),
    )
    dm.prepare_data()  # the cache the run built: tokenized with the folder's tokenizer
    dm.setup("fit")
    assert dm.tokenizer.to_json_str() == load_artifact(gpt2_folder).tokenizer.to_json_str()
    before = mean_loss(load_artifact(gpt2_folder).model, dm)

    out = export_checkpoint(root / "checkpoints" / "last.ckpt", tmp_path / "export")
    tuned = load_artifact(out)
    assert tuned.config.n_embd == 32 and tuned.config.block_size == POSITIONS
    after = mean_loss(tuned.model, dm)
    assert after < before - 0.5, (before, after)  # from ~ln(300) = 5.7 toward the corpus
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    x, _ = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, tuned.model(x).logits, atol=1e-4, rtol=1e-4)


def test_a_config_that_contradicts_the_folder_is_one_error_line(gpt2_folder, tmp_path, capsys):
    from tests.integration.helpers import REPO

    code = main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "tiny.yaml"),
            "--model.init_from",
            str(gpt2_folder),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--data.cache_dir",
            str(tmp_path / "cache"),
        ]  # fmt: skip
    )
    assert code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("attnlm fit: error: model.init_from")
    for part in ("model.n_layer=4 (the folder's: 2)", "model.n_embd=128", "data.vocab_size=1024"):
        assert part in err
    assert not (tmp_path / "cache").exists()  # stopped before any data was built
