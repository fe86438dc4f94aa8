"""The probe study's architectures: additive attention and the LSTM, beside the default GPT."""

from __future__ import annotations

import json

import pytest
import torch

from attnlm.artifact import load_artifact, save_artifact
from attnlm.config import ConfigError, GPTConfig
from attnlm.corpus import generate_corpus
from attnlm.generate import SamplingParams, generate
from attnlm.lstm import LSTMLM
from attnlm.model import GPT
from attnlm.networks import build_model, flops_per_token
from attnlm.tokenizer import Tokenizer

SHAPE = dict(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=32)


def make(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(GPTConfig(**{**SHAPE, **kwargs})).eval()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(generate_corpus(1500, seed=1), vocab_size=300)


def test_build_model_picks_the_class():
    assert type(make()) is GPT and type(make(attention="additive")) is GPT
    assert type(make(arch="lstm")) is LSTMLM
    assert make().has_attention and not make(arch="lstm").has_attention


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "rnn"}, "arch must be one of transformer, lstm"),
        ({"attention": "cosine"}, "attention must be one of dot_product, additive"),
        ({"arch": "lstm", "attention": "additive"}, "an LSTM has none"),
    ],
)
def test_bad_variant_config_names_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig(**{**SHAPE, **kwargs})


def test_lstm_ignores_head_divisibility():
    GPTConfig(**{**SHAPE, "arch": "lstm", "n_embd": 30, "n_head": 4})  # no error


def test_additive_attention_rows_sum_to_one_with_zeros_above_diagonal():
    model = make(attention="additive")
    idx = torch.randint(0, 300, (3, 20))
    out = model(idx, return_attention=True)
    att = out.attention  # (L, B, H, T, T)
    assert att.shape == (2, 3, 2, 20, 20)
    torch.testing.assert_close(att.sum(-1), torch.ones(2, 3, 2, 20))
    assert torch.all(att.triu(diagonal=1) == 0)
    torch.testing.assert_close(out.logits, model(idx).logits)  # with or without the maps


def test_additive_scores_are_bahdanau():
    """score(q, k) = v^T tanh(W_q q + W_k k), per head, checked against a loop."""
    attn = make(attention="additive").transformer.h[0].attn
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 4, 16)
    scores = attn.additive_scores(q, k)
    for h in range(2):
        for i in range(3):
            for j in range(4):
                expected = attn.add_v[h] @ torch.tanh(
                    q[0, h, i] @ attn.add_q[h] + k[0, h, j] @ attn.add_k[h]
                )
                torch.testing.assert_close(scores[0, h, i, j], expected)


def test_additive_differs_from_dot_product_and_is_causal():
    model = make(attention="additive")
    idx = torch.randint(0, 300, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 300
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])  # the future does not leak back
    assert not torch.allclose(a, make()(idx).logits)


@pytest.mark.parametrize("kwargs", [{"attention": "additive"}, {"arch": "lstm"}])
def test_cache_decoding_equals_full_forward(kwargs):
    model = make(**kwargs)
    idx = torch.randint(0, 300, (2, 18))
    full = model(idx).logits
    model.set_kv_cache(2)
    parts = [model(idx[:, :11], input_pos=0).logits]
    parts += [model(idx[:, i : i + 1], input_pos=i).logits for i in range(11, 18)]
    model.clear_kv_cache()
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


def test_lstm_refuses_attention_and_out_of_order_positions():
    model = make(arch="lstm")
    idx = torch.randint(0, 300, (1, 5))
    with pytest.raises(ValueError, match="no attention"):
        model(idx, return_attention=True)
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model(idx, input_pos=0)
    model.set_kv_cache(1, max_seq_length=8)
    model(idx, input_pos=0)
    with pytest.raises(ValueError, match="does not continue"):
        model(idx[:, :1], input_pos=3)
    with pytest.raises(ValueError, match="state cache holds"):
        model(idx, input_pos=5)
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="one position"):
        model(idx[:, :1], row_positions=torch.tensor([5]))


def test_lstm_parameter_count_near_the_tiny_transformer():
    """configs/tiny-lstm.yaml is sized to match configs/tiny.yaml (within 5 %)."""
    tiny = build_model(GPTConfig(vocab_size=1024, block_size=64, n_layer=4, n_head=4, n_embd=128))
    lstm = build_model(
        GPTConfig(vocab_size=1024, block_size=64, n_layer=2, n_head=1, n_embd=208, arch="lstm")
    )
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(lstm) / count(tiny) - 1) < 0.05


def test_flops_per_token_of_the_variants():
    dot = GPTConfig(**SHAPE)
    assert flops_per_token(GPTConfig(**SHAPE, attention="additive")) > flops_per_token(dot)
    C, L, V = 32, 2, 300
    assert (
        flops_per_token(GPTConfig(**SHAPE, arch="lstm"), training=False)
        == L * 16 * C * C + 2 * C * V
    )


@pytest.mark.parametrize("kwargs", [{"attention": "additive"}, {"arch": "lstm"}])
def test_artifact_round_trip_and_generation(tmp_path, tokenizer, kwargs):
    model = make(**kwargs)
    save_artifact(model, tokenizer, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "attnlm"  # not gpt2: transformers must not load it as one
    loaded = load_artifact(tmp_path / "m")
    assert type(loaded.model) is type(model) and loaded.config == model.config
    idx = torch.tensor([tokenizer.encode("The cat that was sitting")])
    torch.testing.assert_close(loaded.model(idx).logits, model(idx).logits)
    out = generate(loaded.model, idx, SamplingParams(max_new_tokens=5, temperature=0))
    assert len(out.tokens[0]) == 5 or out.finish_reasons[0] == "stop"
    if model.has_attention:
        out = generate(loaded.model, idx, SamplingParams(max_new_tokens=3, temperature=0), True)
        assert out.attention.shape[-1] == idx.size(1) + 3


def test_default_config_still_exports_as_gpt2():
    assert GPTConfig(**SHAPE).to_hf_dict()["model_type"] == "gpt2"
    for kwargs in ({"attention": "additive"}, {"arch": "lstm"}):
        cfg = GPTConfig(**SHAPE, **kwargs)
        assert GPTConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    with pytest.raises(ConfigError, match="attnlm_config"):
        GPTConfig.from_hf_dict({"model_type": "attnlm"})


@pytest.mark.parametrize("kwargs", [{}, {"attention": "additive"}])
def test_packed_rows_equal_each_text_alone(kwargs):
    """segments: texts side by side in one row, each with its own positions and attention."""
    model = make(**kwargs)
    a, b = torch.randint(0, 300, (1, 7)), torch.randint(0, 300, (1, 12))
    packed = torch.cat([a, b, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 12 + [-1] * 3])
    out = model(packed, segments=segments, return_attention=True)
    alone_a, alone_b = model(a, return_attention=True), model(b, return_attention=True)
    torch.testing.assert_close(out.logits[:, :7], alone_a.logits)
    torch.testing.assert_close(out.logits[:, 7:19], alone_b.logits)
    torch.testing.assert_close(out.attention[..., 7:19, 7:19], alone_b.attention)
    assert torch.all(out.attention[..., 7:19, :7] == 0)  # b never sees a
    torch.testing.assert_close(model(packed, segments=segments).logits, out.logits)  # SDPA path
    model.set_kv_cache(1)
    with pytest.raises(ValueError, match="KV cache"):
        model(packed, input_pos=0, segments=segments)
