"""The core model: causality, the two attention paths, the KV cache, FLOPs, config validation."""

import math

import pytest
import torch

from attnlm.config import ConfigError, GPTConfig
from attnlm.model import GPT, KVCache, causal_mask, segment_starts
from attnlm.networks import flops_per_token

CFG = GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).eval()


def test_logits_shape_and_loss(model):
    idx = torch.randint(0, CFG.vocab_size, (3, 16))
    out = model(idx, idx)
    assert out.logits.shape == (3, 16, CFG.vocab_size)
    assert out.attention is None
    # an untrained model predicts close to uniform
    assert abs(out.loss.item() - math.log(CFG.vocab_size)) < 0.5


def test_causality(model):
    idx = torch.randint(0, CFG.vocab_size, (2, 20))
    changed = idx.clone()
    changed[:, 11] = (changed[:, 11] + 1) % CFG.vocab_size
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :11], b[:, :11], rtol=0, atol=0)
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_explicit_attention_path_equals_sdpa(model):
    idx = torch.randint(0, CFG.vocab_size, (2, 24))
    fast = model(idx).logits
    explicit = model(idx, return_attention=True)
    assert (fast - explicit.logits).abs().max().item() <= 1e-5
    assert explicit.attention.shape == (CFG.n_layer, 2, CFG.n_head, 24, 24)


def test_attention_rows_sum_to_one_with_zeros_above_diagonal(model):
    att = model(torch.randint(0, CFG.vocab_size, (2, 12)), return_attention=True).attention
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]))
    upper = torch.ones(12, 12, dtype=torch.bool).triu(1)
    assert torch.all(att[..., upper] == 0)
    assert att.dtype == torch.float32


def test_kv_cache_decoding_equals_full_forward(model):
    idx = torch.randint(0, CFG.vocab_size, (2, 20))
    full = model(idx, return_attention=True)
    model.set_kv_cache(batch_size=2)
    prefill = model(idx[:, :8], input_pos=0, return_attention=True)
    steps = [model(idx[:, t : t + 1], input_pos=t, return_attention=True) for t in range(8, 20)]
    model.clear_kv_cache()
    cached = torch.cat([prefill.logits] + [s.logits for s in steps], dim=1)
    assert (cached - full.logits).abs().max().item() <= 1e-5
    torch.testing.assert_close(prefill.attention, full.attention[..., :8, :8], atol=1e-6, rtol=0)
    for t, s in zip(range(8, 20), steps, strict=True):
        assert s.attention.shape == (CFG.n_layer, 2, CFG.n_head, 1, t + 1)
        torch.testing.assert_close(
            s.attention[..., 0, :], full.attention[..., t, : t + 1], atol=1e-6, rtol=0
        )


def test_kv_cache_chunked_prefill_uses_offset_mask(model):
    idx = torch.randint(0, CFG.vocab_size, (1, 18))
    full = model(idx).logits
    model.set_kv_cache(batch_size=1)
    first = model(idx[:, :10], input_pos=0).logits
    second = model(idx[:, 10:], input_pos=10).logits  # 8 queries over 18 keys
    model.clear_kv_cache()
    assert (torch.cat([first, second], 1) - full).abs().max().item() <= 1e-5


def test_cache_errors(model):
    idx = torch.randint(0, CFG.vocab_size, (1, 4))
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model(idx, input_pos=0)
    with pytest.raises(ValueError, match="context window"):
        model(torch.zeros(1, CFG.block_size + 1, dtype=torch.long))
    model.set_kv_cache(batch_size=1, max_seq_length=4)
    with pytest.raises(ValueError, match="KV cache"):
        model(idx[:, :1], input_pos=4)


def test_causal_mask_offset():
    mask = causal_mask(2, 5)
    assert mask.tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


def test_causal_mask_of_every_layout():
    assert torch.equal(causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool).tril())  # plain
    rows = causal_mask(1, 4, row_positions=torch.tensor([3, 0, 1]))  # per-row decode
    assert rows.shape == (3, 1, 1, 4)
    assert rows[:, 0, 0].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]
    segments = torch.tensor([[0, 0, 1, 1, 1, 0]])  # ids need only differ between neighbours
    assert segment_starts(segments).tolist() == [[0, 0, 2, 2, 2, 5]]
    packed = causal_mask(6, 6, segments=segments)
    assert packed.shape == (1, 1, 6, 6)
    assert packed[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # the third text does not see the first, though both are id 0
    ]


def test_row_positions_decode_equals_each_row_alone(model):
    """Rows of one cache at different lengths, one token each at its own position."""
    idx = torch.randint(0, CFG.vocab_size, (3, 12))
    lengths = [11, 4, 7]
    model.set_kv_cache(batch_size=3)
    model(idx[:, :11], input_pos=0)  # rows 1 and 2 hold more than they use: masked out
    rows = torch.tensor(lengths)
    tokens = idx[torch.arange(3), rows][:, None]  # (3, 1) the token after each row's prefix
    sdpa = model(tokens, row_positions=rows).logits[:, 0]
    model.set_kv_cache(batch_size=3)
    model(idx[:, :11], input_pos=0)
    explicit = model(tokens, row_positions=rows, return_attention=True)
    model.clear_kv_cache()
    assert explicit.attention.shape == (CFG.n_layer, 3, CFG.n_head, 1, 12)
    for b, n in enumerate(lengths):
        full = model(idx[b : b + 1, : n + 1], return_attention=True)
        torch.testing.assert_close(sdpa[b], full.logits[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(explicit.logits[b, 0], full.logits[0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            explicit.attention[:, b, :, 0, : n + 1], full.attention[:, 0, :, -1], atol=1e-6, rtol=0
        )
        assert torch.all(explicit.attention[:, b, :, 0, n + 1 :] == 0)


def test_row_positions_and_input_pos_are_apart(model):
    model.set_kv_cache(batch_size=2)
    one = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(TypeError, match="row_positions"):
        model(one, input_pos=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="row_positions needs"):
        model(one, input_pos=1, row_positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="row_positions needs"):
        model(torch.zeros(2, 2, dtype=torch.long), row_positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="context window"):
        model(one, row_positions=torch.tensor([1, CFG.block_size]))
    model.clear_kv_cache()
    with pytest.raises(RuntimeError, match="set_kv_cache"):
        model(one, row_positions=torch.tensor([1, 2]))


def test_kv_cache_methods_write_where_asked():
    cache = KVCache(batch_size=4, n_head=2, max_seq_length=6, head_size=3)
    k, v = torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3)
    keys, values = cache.update(1, k, v)  # positions 1..3 of rows 0, 1
    assert keys.shape == (2, 2, 4, 3) and torch.equal(keys[:, :, 1:], k)
    assert torch.equal(values[:, :, 1:], v) and torch.all(keys[:, :, 0] == 0)
    one_k, one_v = torch.randn(2, 2, 1, 3), torch.randn(2, 2, 1, 3)
    keys, values = cache.update_rows(torch.tensor([4, 0]), one_k, one_v, length=5)
    assert keys.shape == (2, 2, 5, 3)
    assert torch.equal(keys[0, :, 4], one_k[0, :, 0]) and torch.equal(keys[1, :, 0], one_k[1, :, 0])
    assert torch.equal(values[0, :, 4], one_v[0, :, 0]) and torch.equal(keys[0, :, 1:4], k[0])
    source = KVCache(batch_size=2, n_head=2, max_seq_length=3, head_size=3)
    source.update(0, torch.randn(2, 2, 3, 3), torch.randn(2, 2, 3, 3))
    before = cache.k.clone()
    cache.copy_rows(torch.tensor([3, 1]), source)
    assert torch.equal(cache.k[3, :, :3], source.k[0]) and torch.equal(
        cache.v[1, :, :3], source.v[1]
    )
    assert torch.equal(cache.k[1, :, 3:], before[1, :, 3:])  # later positions untouched
    assert torch.equal(cache.k[[0, 2]], before[[0, 2]])  # other rows untouched
    with pytest.raises(ValueError, match="KV cache holds"):
        cache.update_rows(torch.tensor([6, 0]), one_k, one_v, length=7)
    with pytest.raises(ValueError, match="copy_rows"):
        cache.copy_rows(torch.tensor([0]), source)


def test_weight_tying_and_gpt2_names(model):
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    names = set(model.state_dict())
    for name in (
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.bias",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
        "transformer.ln_f.bias",
    ):
        assert name in names


def test_optimizer_groups_decay_only_matrices(model):
    decay, no_decay = model.optimizer_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


def test_overfit_one_batch():
    torch.manual_seed(0)
    model = GPT(CFG)
    x = torch.randint(0, CFG.vocab_size, (4, 16))
    y = torch.randint(0, CFG.vocab_size, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_flops_per_token_matches_nanogpt_formula():
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128, bias=False)
    model = GPT(cfg)
    ln_params = 2 * cfg.n_embd * (2 * cfg.n_layer + 1)
    n_matmul = model.num_params() - ln_params  # weights that take part in matmuls
    expected = 6 * n_matmul + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert flops_per_token(cfg) == pytest.approx(expected, rel=1e-9)
    assert flops_per_token(cfg, training=False) == pytest.approx(expected / 3)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_embd": 100, "n_head": 3}, "n_embd (100) must be divisible by n_head (3)"),
        ({"n_layer": 0}, "n_layer must be a positive integer"),
        ({"block_size": -4}, "block_size must be a positive integer"),
        ({"vocab_size": 200}, "vocab_size (200) must exceed the byte alphabet"),
        ({"dropout": 1.5}, "dropout must be in [0, 1)"),
    ],
)
def test_bad_config_names_the_field(kwargs, message):
    with pytest.raises(ConfigError) as err:
        GPTConfig(**kwargs)
    assert message in str(err.value)


def test_config_collects_every_error():
    with pytest.raises(ConfigError) as err:
        GPTConfig(n_layer=0, n_embd=10, n_head=3)
    assert "n_layer" in str(err.value) and "divisible" in str(err.value)


def test_config_round_trips_through_hf_dict():
    cfg = GPTConfig(vocab_size=1000, block_size=48, n_layer=3, n_head=2, n_embd=64, dropout=0.1)
    assert GPTConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown field"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_experts": 4})


# -- attention_layers / attention_sink: the explicit path only where asked -------------------------
def _sink_config(attention: str = "dot_product") -> GPTConfig:
    return GPTConfig(
        vocab_size=300, block_size=16, n_layer=3, n_head=2, n_embd=16, attention=attention
    )


@pytest.mark.parametrize("attention", ["dot_product", "additive"])
def test_attention_layers_and_sink_give_the_explicit_maps(attention):
    torch.manual_seed(0)
    model = GPT(_sink_config(attention)).eval()
    idx = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        full = model(idx, return_attention=True)
        part = model(idx, return_attention=True, attention_layers=[0, 2])
        kept = {}
        plain = model(idx, attention_sink=lambda i, q, k: kept.setdefault(i, (q, k)))
    assert part.attention.shape == (2, 2, 2, 12, 12)
    torch.testing.assert_close(part.attention, full.attention[[0, 2]])
    torch.testing.assert_close(part.logits, full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.logits, full.logits, atol=1e-5, rtol=1e-5)
    assert plain.attention is None and sorted(kept) == [0, 1, 2]
    allowed = torch.ones(12, 12, dtype=torch.bool).tril()
    for i, (q, k) in kept.items():  # the map from the kept q, k: the explicit path's, exactly
        attn = model.transformer.h[i].attn
        torch.testing.assert_close(attn.probabilities(q, k, allowed), full.attention[i])
        one = attn.probabilities(q[:, [1]], k[:, [1]], allowed, heads=[1])  # a head alone
        torch.testing.assert_close(one, full.attention[i][:, [1]])


def test_attention_layers_must_be_ascending_indices():
    model = GPT(_sink_config()).eval()
    idx = torch.randint(0, 300, (1, 4))
    for bad in ([3], [1, 0], [0, 0], [-1]):
        with pytest.raises(ValueError, match="attention_layers"):
            model(idx, return_attention=True, attention_layers=bad)
