"""The probe study end to end: the LSTM and additive-attention models train through `attnlm fit`,
export, load and generate; `attnlm probe` reads all three kinds and writes its table and plot."""

from __future__ import annotations

import json

import pytest
import torch

from attnlm.artifact import load_artifact
from attnlm.generate import SamplingParams, generate
from tests.integration.helpers import tiny_args
from training.cli import main

VARIANTS = {
    "additive": ["--model.attention", "additive"],
    "lstm": ["--model.arch", "lstm", "--model.n_head", "1", "--model.n_embd", "40"],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_cache, trained_run) -> dict[str, object]:
    """Each variant trained for 6 steps and exported, plus the session's tiny GPT run exported."""
    out = {}
    root = tmp_path_factory.mktemp("variants")
    for name, extra in VARIANTS.items():
        run = root / f"run-{name}"
        assert main(tiny_args(run, data_cache, 6, *extra)) == 0
        assert (
            main(
                [
                    "export",
                    "--checkpoint",
                    str(run / "checkpoints" / "last.ckpt"),
                    "--out",
                    str(root / name),
                ]
            )
            == 0
        )
        out[name] = root / name
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(root / "gpt")]) == 0
    out["gpt"] = root / "gpt"
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains_exports_loads_and_generates(exported, name):
    artifact = load_artifact(exported[name])
    assert artifact.config.arch == ("lstm" if name == "lstm" else "transformer")
    assert artifact.config.attention == ("additive" if name == "additive" else "dot_product")
    assert artifact.info["global_step"] == 6
    prompt = torch.tensor([artifact.tokenizer.encode("The cat that")])
    out = generate(artifact.model, prompt, SamplingParams(max_new_tokens=6, temperature=0))
    assert len(out.tokens[0]) == 6 or out.finish_reasons == ["stop"]
    # a trained model, not an initial one: the loss went down from ln(vocab)
    with torch.no_grad():
        ids = torch.tensor([artifact.tokenizer.encode("The cats near the dog sleep.")])
        loss = artifact.model(ids[:, :-1], ids[:, 1:]).loss
    assert loss < torch.log(torch.tensor(float(artifact.config.vocab_size)))


def test_probe_cli_prints_the_table_and_writes_plot_and_json(exported, tmp_path, capsys):
    plot, data = tmp_path / "probe.png", tmp_path / "probe.json"
    argv = ["probe", *(str(exported[n]) for n in ("gpt", "additive", "lstm"))]
    argv += ["--per-cell", "4", "--max-depth", "1", "--train-sentences", "0"]  # 32-token context
    argv += ["--plot", str(plot), "--json", str(data)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Agreement accuracy" in out and "best head" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    results = {r["name"]: r for r in json.loads(data.read_text())}
    assert results["lstm"]["best_head"] is None and results["gpt"]["best_head"] is not None
    for result in results.values():
        assert result["n"] == 4 * 3 and 0 <= result["accuracy"] <= 1
        assert sum(g["n"] for g in result["by_depth"].values()) == result["n"]


def test_probe_cli_errors_are_one_line(exported, tmp_path, capsys):
    assert main(["probe", str(tmp_path / "nothing")]) == 1
    assert "artifact folder not found" in capsys.readouterr().err
    assert main(["probe", str(exported["gpt"]), "--per-cell", "0"]) == 1
    assert "--per-cell must be >= 1" in capsys.readouterr().err
