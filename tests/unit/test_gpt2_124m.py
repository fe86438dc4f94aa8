"""configs/gpt2-124m.yaml: the full shape builds with GPT-2's 124M parameters; 2 steps of the
config itself run on the CPU with the shape shrunk (bf16-mixed, fused AdamW with clipping, the
global batch reached by accumulation, checkpoints every N steps)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from attnlm.config import GPTConfig
from attnlm.networks import build_model
from training.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "gpt2-124m.yaml"
GPT2_124M = 124_439_808  # gpt2 on the Hub: the output head tied to the token embedding


def printed_config(capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_the_full_shape_has_124m_parameters(capsys):
    config = printed_config(capsys)
    model, data, trainer = config["model"], config["data"], config["trainer"]
    gpt = GPTConfig(
        vocab_size=data["vocab_size"],
        **{k: model[k] for k in ("block_size", "n_layer", "n_head", "n_embd", "bias")},
    )
    assert (gpt.n_layer, gpt.n_head, gpt.n_embd, gpt.block_size) == (12, 12, 768, 1024)
    assert gpt.vocab_size == 50257
    net = build_model(gpt)
    assert net.lm_head.weight is net.transformer.wte.weight  # tied
    n_params = sum(p.numel() for p in net.parameters())
    assert abs(n_params - GPT2_124M) <= 0.01 * GPT2_124M, n_params
    assert trainer["precision"] == "bf16-mixed" and model["compile"] is True
    assert (model["learning_rate"], model["warmup_steps"], model["weight_decay"]) == (
        6e-4,
        700,
        0.1,
    )
    assert model["betas"] == [0.9, 0.95] and trainer["gradient_clip_val"] == 1.0
    assert config["global_batch"]["tokens"] == 2**19
    assert config["checkpoint"]["every_n_train_steps"] > 0


def test_two_steps_of_the_config_on_the_cpu_shrunk(tmp_path, monkeypatch):
    import training.module

    seen: dict = {}
    real = training.module.LanguageModel.configure_optimizers

    def spy(self):
        out = real(self)
        seen["fused"] = out["optimizer"].defaults["fused"]
        seen["accumulate"] = self.trainer.accumulate_grad_batches
        return out

    monkeypatch.setattr(training.module.LanguageModel, "configure_optimizers", spy)
    root = tmp_path / "run"
    args = [
        "fit", "--config", str(CONFIG),
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
        "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32",
        "--model.block_size", "32", "--model.compile", "false", "--model.warmup_steps", "1",
        "--data.corpus_sentences", "400", "--data.vocab_size", "300",
        "--data.batch_size", "2", "--data.num_workers", "0", "--data.samples_per_epoch", "64",
        "--data.cache_dir", str(tmp_path / "cache"),
        "--global_batch.tokens", "128", "--global_batch.val_every_steps", "1",
        "--checkpoint.every_n_train_steps", "1", "--speed.measure_cpu_peak", "false",
    ]  # fmt: skip
    assert main(args) == 0
    assert seen == {"fused": True, "accumulate": 2}  # 128 tokens / (2 x 32): 2 micro-batches
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    assert last["hyper_parameters"]["n_layer"] == 2
    assert (root / "checkpoints" / "best.ckpt").is_file()


def test_a_fused_adamw_has_its_gradients_clipped_as_they_are():
    """bf16-mixed has no loss scale: the module clips a fused optimizer's gradients itself
    (Lightning's mixed-precision plugin refuses fused optimizers for fear of fp16 scaling)."""
    from training.module import LanguageModel

    lm = LanguageModel(vocab_size=300, block_size=8, n_layer=1, n_head=1, n_embd=8)
    optimizer = torch.optim.AdamW(lm.parameters(), fused=True)
    for p in lm.parameters():
        p.grad = torch.full_like(p, 10.0)
    lm.configure_gradient_clipping(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in lm.parameters()]))
    assert norm.item() == pytest.approx(1.0, rel=1e-4)


def test_global_batch_sets_accumulation_per_device_count_and_refuses_a_second_setting():
    from types import SimpleNamespace

    from attnlm.config import ConfigError
    from training.callbacks import GlobalBatch

    data = SimpleNamespace(settings=SimpleNamespace(batch_size=16), block_size=1024)
    for devices, accumulate in ((1, 32), (8, 4), (3, 11)):
        trainer = SimpleNamespace(
            datamodule=data, world_size=devices, accumulate_grad_batches=1, val_check_interval=1.0
        )
        GlobalBatch(tokens=2**19, val_every_steps=250).setup(trainer, None, "fit")
        assert trainer.accumulate_grad_batches == accumulate
        assert trainer.val_check_interval == 250 * accumulate  # batches: optimizer steps x accum.
    trainer.accumulate_grad_batches = 2
    with pytest.raises(ConfigError, match="give one of them"):
        GlobalBatch(tokens=2**19).setup(trainer, None, "fit")
    with pytest.raises(ConfigError, match="global_batch.tokens: must be an int >= 1"):
        GlobalBatch(tokens=0)
