"""One vocabulary on every path: a model with more embedding rows than its tokenizer has tokens
is cropped to the tokenizer on export and on load, so no padded id ever gets probability mass."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnlm.artifact import crop_vocab, load_artifact, save_artifact, to_hf_state_dict
from attnlm.config import GPTConfig
from attnlm.corpus import generate_corpus
from attnlm.generate import SamplingParams, generate
from attnlm.networks import build_model
from attnlm.tokenizer import Tokenizer

PADDED = 384  # model rows, past the tokenizer's 300 tokens (a smaller-than-asked tokenizer, or
# rows padded for speed: the same thing to every path)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer.train(generate_corpus(2000, seed=0), vocab_size=300)
    assert tok.vocab_size < PADDED
    return tok


def padded_model(arch: str = "transformer"):
    """A model of PADDED embedding rows."""
    torch.manual_seed(0)
    shape = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
    return build_model(GPTConfig(vocab_size=PADDED, arch=arch, **shape)).eval()


def write_padded_folder(model, tokenizer: Tokenizer, out):
    """The folder `attnlm export` wrote before it cropped: every embedding row of the model, and
    config.json's vocab_size the model's, past the tokenizer's."""
    out = save_artifact(model, tokenizer, out)
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] = model.config.vocab_size
    (out / "config.json").write_text(json.dumps(config))
    save_file(to_hf_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    return out


def loud(model, vocab_size: int):
    """Make the padded output rows win every argmax: a path that leaks them cannot pass."""
    with torch.no_grad():
        u = torch.nn.functional.normalize(torch.randn(model.config.n_embd), dim=0)
        model.transformer.ln_f.weight.zero_()  # the final hidden state is 3u for every input
        model.transformer.ln_f.bias.copy_(3 * u)
        model.lm_head.weight[vocab_size:] = 10 * u  # padded logits 30, real ones near 0
    return model


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_export_crops_to_the_tokenizer(tokenizer, tmp_path, arch):
    model = padded_model(arch)
    out = save_artifact(model, tokenizer, tmp_path / "art")
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == tokenizer.vocab_size
    weights = load_file(out / "model.safetensors")
    embedding = "transformer.wte.weight" if arch == "transformer" else "wte.weight"
    assert weights[embedding].shape[0] == tokenizer.vocab_size
    assert json.loads((out / "attnlm.json").read_text())["model_vocab_rows"] == PADDED
    art = load_artifact(out)
    assert art.config.vocab_size == tokenizer.vocab_size
    ids = torch.tensor([tokenizer.encode("The cats near the dog sit on the mat.")])
    theirs = model(ids).logits[..., : tokenizer.vocab_size]
    assert art.model(ids).logits.shape[-1] == tokenizer.vocab_size
    torch.testing.assert_close(art.model(ids).logits, theirs, rtol=0, atol=1e-6)


def test_a_padded_folder_loads_cropped(tokenizer, tmp_path):
    """A folder written before cropping (config.json vocab_size past the tokenizer's) loads with
    the tokenizer's vocabulary; sampling from it never emits a padded id."""
    model = loud(padded_model(), tokenizer.vocab_size)
    out = write_padded_folder(model, tokenizer, tmp_path / "art")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == PADDED

    art = load_artifact(out)
    assert art.config.vocab_size == art.model.lm_head.weight.shape[0] == tokenizer.vocab_size
    prompt = torch.tensor([tokenizer.encode("The cat")] * 4)
    seen = 0
    for seed in range(20):
        params = SamplingParams(max_new_tokens=25, temperature=1.5, seed=seed)
        result = generate(art.model, prompt, params)
        for row in result.tokens:
            assert all(0 <= t < tokenizer.vocab_size for t in row)
            seen += len(row)
    assert seen >= 2000
    # the uncropped model would have sampled padding at once
    uncropped = generate(model, prompt, SamplingParams(max_new_tokens=1, temperature=1.5, seed=0))
    assert max(max(row) for row in uncropped.tokens) >= tokenizer.vocab_size


def test_crop_vocab_checks_and_is_a_no_op_at_size():
    config = GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=1, n_embd=8)
    state = {"transformer.wte.weight": torch.zeros(300, 8), "lm_head.weight": torch.zeros(300, 8)}
    same, same_config = crop_vocab(state, config, 300)
    assert same is state and same_config is config
    cropped, small = crop_vocab(state, config, 257)
    assert small.vocab_size == 257
    assert {k: tuple(v.shape) for k, v in cropped.items()} == {
        "transformer.wte.weight": (257, 8),
        "lm_head.weight": (257, 8),
    }
    with pytest.raises(ValueError, match="cannot crop 300 embedding rows to 301"):
        crop_vocab(state, config, 301)
