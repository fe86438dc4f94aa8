"""Attention of long texts: rows, pooled overviews and top keys equal the whole map's parts; the
answer's size is estimated before any work and a 400 names what would fit; the q/k cache
(serving/attention_cache.py) answers another selection of a text without a forward, stays within
its bytes, and is right under concurrent requests."""

import base64
import threading

import numpy as np
import pytest
import torch

from serving.attention_cache import QKCache, entry_bytes
from serving.attention_select import (
    answer_bytes,
    check_answer_size,
    pool_maps,
    resolve_rows,
    top_keys,
)
from serving.engine import AttentionOptions, CompletionParams, Engine, EngineError
from serving.http import dumps
from tests.unit.test_attention_maps import decoded
from tests.unit.test_engine import TEXTS, full_attention

LONG = "The cats near the dog that the man sees sleep on the mat by the door."


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    from attnlm.artifact import save_artifact
    from attnlm.config import GPTConfig
    from attnlm.corpus import generate_corpus
    from attnlm.model import GPT
    from attnlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(generate_corpus(2000, seed=0), vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32
    )
    folder = save_artifact(GPT(config), tokenizer, tmp_path_factory.mktemp("artifact") / "tiny")
    return Engine(folder, device="cpu")


def keys_of(keys: dict) -> np.ndarray:
    if keys["encoding"] == "json":
        return np.asarray(keys["data"])
    raw = base64.b64decode(keys["data"])
    return np.frombuffer(raw, dtype="<i4").reshape(keys["shape"])


# -- the parts, by hand ------------------------------------------------------------------------------
def test_rows_are_positions_negative_from_the_end_or_last():
    assert resolve_rows("last", 10) == [9]
    assert resolve_rows([-1, 0, 3, -10], 10) == [9, 0, 3, 0]
    assert resolve_rows(None, 10) is None
    with pytest.raises(EngineError, match=r"rows \[10, -11\] out of range") as err:
        resolve_rows([10, -11, 2], 10)
    assert err.value.code == "out_of_range" and err.value.param == "rows"


def test_pool_averages_square_blocks_the_last_one_smaller():
    maps = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10)
    pooled, block = pool_maps(maps, 4)  # blocks of 3: 3, 3, 3, 1
    assert block == 3 and pooled.shape == (1, 4, 4)
    assert pooled[0, 0, 0] == maps[0, :3, :3].mean()
    assert pooled[0, 3, 1] == maps[0, 9:, 3:6].mean()
    assert pooled[0, 3, 3] == maps[0, 9, 9]
    same, one = pool_maps(maps, 10)
    assert one == 1 and torch.equal(same, maps)


def test_top_keys_largest_first_with_positions():
    maps = torch.tensor([[[0.1, 0.6, 0.3, 0.0]]])
    values, keys = top_keys(maps, 2)
    torch.testing.assert_close(values, torch.tensor([[[0.6, 0.3]]]))
    assert keys.tolist() == [[[1, 2]]]
    assert keys.dtype == torch.int32 and top_keys(maps, 9)[0].shape == (1, 1, 4)


@pytest.mark.parametrize("encoding", ["json", "base64"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rows": "last"},
        {"pool": 4},
        {"top_keys": 3, "aggregation": "mean"},
        {"rows": [0, -1], "heads": [1]},
    ],
)
def test_answer_bytes_bounds_the_written_answer(engine, encoding, options):
    opts = AttentionOptions(encoding=encoding, **options)
    (att_map,) = engine.attention([LONG], opts)
    written = len(dumps(att_map.attention["data"]))
    if att_map.keys is not None:
        written += len(dumps(att_map.keys["data"]))
    T, config = len(att_map.tokens), engine.config
    estimate = answer_bytes(opts, T, config.n_layer, config.n_head)
    assert written <= estimate <= 3 * written + 64, (written, estimate)


def test_an_answer_over_the_limit_names_selections_that_fit():
    full = AttentionOptions(encoding="base64")  # 124M shape, 1,024 tokens: ~400 MB
    with pytest.raises(EngineError) as err:
        check_answer_size(full, 1024, 12, 12, 64 << 20, "text")
    message = err.value.message
    assert err.value.code == "answer_too_large" and err.value.param == "text"
    assert (
        '"pool": 64' in message and '"rows": "last"' in message and "max_attention_bytes" in message
    )
    pooled = AttentionOptions(pool=64, encoding="base64")
    check_answer_size(pooled, 1024, 12, 12, 2 << 20, "text")  # 1.6 MB: fits


# -- the engine: every new selection equals the whole map's part ----------------------------------------
@pytest.mark.parametrize("aggregation", ["none", "mean", "rollout"])
def test_rows_pool_and_top_keys_equal_the_whole_maps_parts(engine, aggregation):
    ids = engine.encode(LONG)
    T = len(ids)
    full = full_attention(engine, ids).double()  # (L, H, T, T)
    if aggregation == "mean":
        full = full.mean(dim=1)
    elif aggregation == "rollout":
        from serving.attention_maps import rollout

        full = rollout(full)
    base = {"aggregation": aggregation, "decimals": 8, "layers": [1, 0]}
    rows, pooled, top = engine.attention(
        [LONG] * 3,
        [
            AttentionOptions(rows=[-1, 2], **base),
            AttentionOptions(pool=4, **base),
            AttentionOptions(top_keys=3, rows="last", **base),
        ],
    )
    full = full[[1, 0]]
    assert rows.rows == [T - 1, 2] and "rows" in rows.body() and "keys" not in rows.body()
    np.testing.assert_allclose(decoded(rows.attention), full[..., [T - 1, 2], :], atol=1e-5)
    expected, block = pool_maps(full, 4)
    assert pooled.pool_block == block and pooled.attention["shape"][-2:] == [4, 4]
    np.testing.assert_allclose(decoded(pooled.attention), expected, atol=1e-5)
    values, keys = full[..., [T - 1], :].topk(3, dim=-1)
    np.testing.assert_allclose(decoded(top.attention), values, atol=1e-5)
    assert (keys_of(top.keys) == keys.numpy()).mean() > 0.9  # near-ties may swap


def test_old_requests_answer_the_fields_they_always_had(engine):
    (att_map,) = engine.attention([TEXTS[0]])
    assert list(att_map.body()) == [
        "tokens", "token_ids", "n_layers", "n_heads", "layers", "heads", "aggregation", "attention"
    ]  # fmt: skip


def test_completion_attention_takes_rows_and_pool(engine):
    opts = AttentionOptions(rows="last", top_keys=2, encoding="base64")
    result = engine.complete(
        "The cat", CompletionParams(max_tokens=4, temperature=0, attention=opts)
    )
    att = result.choices[0].attention
    T = len(result.choices[0].tokens)
    assert att["rows"] == [T - 1] and att["attention"]["shape"] == [2, 2, 1, 2]
    assert keys_of(att["keys"]).shape == (2, 2, 1, 2)


# -- size limit and cache -----------------------------------------------------------------------------
def test_engine_refuses_an_answer_over_max_attention_bytes(engine):
    engine.configure_attention(engine._qk_cache.max_bytes, 2000)
    try:
        with pytest.raises(EngineError, match="would fit") as err:
            engine.attention([LONG])
        assert err.value.code == "answer_too_large"
        (small,) = engine.attention([LONG], AttentionOptions(rows="last", encoding="base64"))
        assert small.attention["shape"][2] == 1
        with pytest.raises(EngineError, match="would fit"):
            engine.complete(
                "The cat", CompletionParams(max_tokens=40, attention=AttentionOptions())
            )
    finally:
        engine.configure_attention(engine._qk_cache.max_bytes, 64 << 20)


def test_cache_hit_answers_another_selection_without_a_forward(engine, monkeypatch):
    engine.configure_attention(1 << 20, 64 << 20)
    text = LONG + " again"
    (cold,) = engine.attention([text], AttentionOptions(layers=[1], heads=[0], decimals=8))
    assert cold.cache == "miss"
    monkeypatch.setattr(engine.model, "forward", None)  # a forward now would fail
    hot, other = engine.attention(
        [text, text],
        [
            AttentionOptions(layers=[1], heads=[0], decimals=8),
            AttentionOptions(layers=[0], aggregation="rollout", rows="last", decimals=8),
        ],
    )
    assert hot.cache == other.cache == "hit"
    # float32 model, q and k kept in float16: the same map to float16's precision
    np.testing.assert_allclose(decoded(hot.attention), decoded(cold.attention), atol=2e-3)
    monkeypatch.undo()
    (fresh,) = engine.attention(
        [text + "!"], AttentionOptions(layers=[0], aggregation="rollout", rows="last", decimals=8)
    )
    assert fresh.cache == "miss"


def test_cache_keeps_the_most_recent_within_its_bytes():
    def entry(T: int):
        return [(torch.ones(2, T, 4), torch.ones(2, T, 4))] * 3  # float32 in, float16 kept

    size = entry_bytes([(q.half(), k.half()) for q, k in entry(10)])
    cache = QKCache(2 * size)
    assert cache.put([1], entry(10)) and cache.put([2], entry(10))
    assert cache.get([1]) is not None  # [2] is now the least recently used
    assert cache.put([3], entry(10)) and cache.get([2]) is None and len(cache) == 2
    assert cache.bytes == 2 * size and cache.get([1])[0][0].dtype == torch.float16
    assert not cache.put([4], entry(30))  # larger than the whole budget: not kept
    cache.resize(size)
    assert len(cache) == 1 and cache.bytes == size
    with pytest.raises(ValueError, match="attention_cache_bytes"):
        cache.resize(-1)


def test_concurrent_requests_get_their_own_selections(engine):
    engine.configure_attention(1 << 20, 64 << 20)
    texts = [LONG, TEXTS[0], LONG + " too"]
    options = [
        AttentionOptions(layers=[i % 2], heads=[h], rows=[-1 - h], decimals=8)
        for i in range(len(texts))
        for h in range(2)
    ]
    jobs = [(texts[i // 2], o) for i, o in enumerate(options)] * 4
    expected = {}
    for text in texts:
        expected[text] = full_attention(engine, engine.encode(text)).double().numpy()
    results, errors = [None] * len(jobs), []

    def worker(k: int) -> None:
        try:
            text, opts = jobs[k]
            (results[k],) = engine.attention([text], opts)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (text, opts), got in zip(jobs, results, strict=True):
        want = expected[text][opts.layers][:, opts.heads][..., got.rows, :]
        np.testing.assert_allclose(decoded(got.attention), want, atol=2e-3)
    assert engine._qk_cache.bytes <= engine._qk_cache.max_bytes


@pytest.mark.parametrize("attention", ["dot_product", "additive"])
def test_rows_in_any_order_equal_the_whole_maps_rows(attention):
    from attnlm.config import GPTConfig
    from attnlm.model import GPT
    from serving.attention_maps import maps_from_qk

    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=16, attention=attention
    )
    model = GPT(config).eval()
    idx = torch.randint(0, 300, (1, 12))
    kept = {}
    with torch.no_grad():
        full = model(idx, return_attention=True).attention[:, 0]  # (L, H, T, T)
        model(idx, attention_sink=lambda i, q, k: kept.setdefault(i, (q[0], k[0])))
        qk = [kept[0], kept[1]]
        rows = [11, 0, 11, 5]
        got = list(maps_from_qk(model.transformer.h, qk, [1], [1], "none", rows, torch.float32))
    torch.testing.assert_close(got[0], full[1, [1]][:, rows], atol=1e-5, rtol=1e-5)


def test_a_bfloat16_models_cache_hit_equals_its_cold_answer(tmp_path):
    from attnlm.artifact import save_artifact
    from attnlm.config import GPTConfig
    from attnlm.corpus import generate_corpus
    from attnlm.model import GPT
    from attnlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(generate_corpus(2000, seed=0), vocab_size=300)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32
    )
    folder = save_artifact(GPT(config), tokenizer, tmp_path / "tiny")
    engine = Engine(folder, device="cpu", dtype="bfloat16")
    options = AttentionOptions(decimals=8)
    (cold,), (hit,) = engine.attention([LONG], options), engine.attention([LONG], options)
    assert (cold.cache, hit.cache) == ("miss", "hit")
    np.testing.assert_array_equal(
        decoded(hit.attention), decoded(cold.attention)
    )  # bf16 -> f16: exact
