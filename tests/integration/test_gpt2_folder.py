"""Any GPT-2-family folder serves: one written by transformers' `save_pretrained` at the 124M shape
(random weights, nothing downloaded) plus a `tokenizer.json` loads into attnlm with the logits and
attentions of transformers' eager path; a folder of another family fails with a clear error."""

from __future__ import annotations

import json

import pytest
import tokenizers
import torch

from attnlm.artifact import ArtifactError, load_artifact
from attnlm.tokenizer import EOT_TOKEN

GPT2_VOCAB = 50257  # 50,256 byte-level BPE tokens, then <|endoftext|> (id 50256), as GPT-2's
TEXT = "The cat that was sitting on the mat which was next to the dog jumped over the fence."


def gpt2_shaped_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer laid out as GPT-2's: the 256 byte symbols, merges up to 50,256
    tokens, <|endoftext|> last. The merges are synthetic (pairs of bytes): GPT-2's own vocabulary
    would need a download, and the model's weights are random anyway."""
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    alphabet.sort()
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    merges = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) == GPT2_VOCAB - 1:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    inner = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges))
    inner.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = tokenizers.decoders.ByteLevel()
    inner.add_special_tokens([EOT_TOKEN])
    assert inner.token_to_id(EOT_TOKEN) == GPT2_VOCAB - 1
    return inner


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    # gpt2's shape: 12 layers, 12 heads, 768 wide, 1,024 positions; eager: the reference attention
    config = transformers.GPT2Config(attn_implementation="eager")
    assert (config.n_layer, config.n_head, config.n_embd) == (12, 12, 768)
    assert (config.n_positions, config.vocab_size) == (1024, GPT2_VOCAB)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config).eval()
    folder = tmp_path_factory.mktemp("hf") / "gpt2-random"
    hf.save_pretrained(folder)  # model.safetensors + config.json, as any GPT-2 on the Hub
    gpt2_shaped_tokenizer().save(str(folder / "tokenizer.json"))
    return folder, hf


def test_a_124m_gpt2_folder_loads_with_eager_logits_and_attention(gpt2_folder):
    folder, hf = gpt2_folder
    art = load_artifact(folder)
    model = art.model
    n_params = sum(p.numel() for p in model.parameters())  # tied: the head is the embedding
    assert abs(n_params - 124_439_808) <= 0.01 * 124_439_808
    assert art.config.vocab_size == art.tokenizer.vocab_size == GPT2_VOCAB
    assert (art.config.n_layer, art.config.n_head, art.config.block_size) == (12, 12, 1024)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()

    ids = torch.tensor([art.tokenizer.encode(TEXT)])
    assert 20 < ids.shape[1] < 200
    with torch.no_grad():
        theirs = hf(ids, output_attentions=True)
        ours = model(ids, return_attention=True)
        fast = model(ids)  # the SDPA path
    torch.testing.assert_close(ours.logits, theirs.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fast.logits, theirs.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.stack(theirs.attentions), ours.attention, atol=1e-5, rtol=1e-4)


def test_a_folder_of_another_family_names_what_is_supported(gpt2_folder, tmp_path):
    folder, _ = gpt2_folder
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 32000}))
    (llama / "model.safetensors").write_bytes(b"")
    (llama / "tokenizer.json").write_text((folder / "tokenizer.json").read_text())
    with pytest.raises(ArtifactError, match="model_type 'llama' is not supported") as err:
        load_artifact(llama)
    assert "gpt2" in str(err.value) and "distilgpt2" in str(err.value)

    variant = tmp_path / "variant"
    variant.mkdir()
    config = json.loads((folder / "config.json").read_text())
    config["scale_attn_by_inverse_layer_idx"] = True
    (variant / "config.json").write_text(json.dumps(config))
    for name in ("model.safetensors", "tokenizer.json"):
        (variant / name).symlink_to(folder / name)
    with pytest.raises(ArtifactError, match="scale_attn_by_inverse_layer_idx=True"):
        load_artifact(variant)
