"""The exported model is the served model: a fit whose tokenizer comes out smaller than asked
exports a folder with the tokenizer's vocabulary, and transformers, attnlm and the server give
the same distribution over it (issue: one vocabulary on every path)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from attnlm.artifact import load_artifact
from attnlm.generate import SamplingParams, generate
from serving.engine import Engine
from tests.integration.helpers import tiny_args
from training.cli import main
from training.export import model_from_checkpoint, read_checkpoint

ASKED = 1024  # data.vocab_size; 3,000 corpus sentences give far fewer merges
IN_CORPUS = [
    "The cat that was sitting on the mat which was next to the dog jumped.",
    "The dogs near the cat",
]
UNSEEN = ["a b c d e f g", "x y z", "7 3 1 0 9 8", "?!?!... ;;; ---", "Zyxwvutsrqponmlkjih"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("vocab_run")
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    try:
        assert main(tiny_args(root, data_cache, 12, "--data.vocab_size", str(ASKED))) == 0
    finally:
        logger.removeHandler(handler)
    out = root / "export"
    assert (
        main(["export", "--checkpoint", str(root / "checkpoints" / "last.ckpt"), "--out", str(out)])
        == 0
    )
    return root, out, records


def test_fit_says_the_tokenizer_came_out_smaller(run):
    _, out, records = run
    size = load_artifact(out).tokenizer.vocab_size
    assert size < ASKED
    said = [r for r in records if "fewer than data.vocab_size" in r]
    assert len(said) == 1
    assert f"has {size} tokens" in said[0] and f"keeps {ASKED} embedding rows" in said[0]


def test_exported_folder_has_the_tokenizer_vocabulary(run):
    root, out, _ = run
    art = load_artifact(out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == art.tokenizer.vocab_size == art.model.lm_head.weight.shape[0]
    # the checkpoint keeps the padded rows; the export gives their logits on the real ids (not
    # always to the bit: a matmul with fewer output columns may block its work differently)
    original = model_from_checkpoint(read_checkpoint(root / "checkpoints" / "last.ckpt"))
    assert original.config.vocab_size == ASKED
    engine = Engine(out, device="cpu", dtype="float32")
    for text in IN_CORPUS + UNSEEN:
        ids = torch.tensor([art.tokenizer.encode(text)])
        with torch.inference_mode():
            ours = art.model(ids).logits
            theirs = original(ids).logits[..., : art.tokenizer.vocab_size]
            served = engine.model(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=text)
        assert torch.equal(ours, served), text  # the server holds exactly the exported model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_transformers_gives_the_served_distribution(run, attn_implementation):
    transformers = pytest.importorskip("transformers")
    _, out, _ = run
    engine = Engine(out, device="cpu", dtype="float32")
    vocab = engine.tokenizer.vocab_size
    hf = transformers.GPT2LMHeadModel.from_pretrained(
        out, attn_implementation=attn_implementation
    ).eval()
    texts = IN_CORPUS + UNSEEN
    served = engine.next_token(texts, top_k=vocab)
    for text, answer in zip(texts, served, strict=True):
        ids = torch.tensor([engine.tokenizer.encode(text)])
        with torch.no_grad():
            probs = hf(ids).logits[0, -1].softmax(-1)
        assert probs.shape == (vocab,)
        ours = torch.zeros(vocab, dtype=torch.float64)
        for entry in answer.top:
            ours[entry["token_id"]] = entry["prob"]
        assert len(answer.top) == vocab
        assert (ours - probs.double()).abs().max().item() < 1e-6, text


def test_nothing_samples_a_padded_id(run):
    transformers = pytest.importorskip("transformers")
    _, out, _ = run
    art = load_artifact(out)
    vocab = art.tokenizer.vocab_size
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    prompt = torch.tensor([art.tokenizer.encode("The cat")] * 8)
    hf_tokens, ours = 0, 0
    torch.manual_seed(0)
    for seed in range(9):  # 9 x 8 rows x 28 tokens > 2,000 in each sampler
        with torch.no_grad():
            sampled = hf.generate(
                prompt, do_sample=True, temperature=1.5, top_k=0, max_new_tokens=28,
                min_new_tokens=28, pad_token_id=art.tokenizer.eot_id,
            )  # fmt: skip
        new = sampled[:, prompt.shape[1] :]
        assert int(new.max()) < vocab
        hf_tokens += new.numel()
        result = generate(art.model, prompt, SamplingParams(28, temperature=1.5, seed=seed))
        assert all(0 <= t < vocab for row in result.tokens for t in row)
        ours += sum(len(row) for row in result.tokens)
    assert hf_tokens >= 2000 and ours >= 1000  # ours stops rows at end-of-text
