"""serving.engine on a tiny untrained artifact: maps equal the model's, completions equal the
full forward's argmax, streams equal completions, bad input is an EngineError naming its param."""

import numpy as np
import pytest
import torch

from attnlm.config import GPTConfig
from attnlm.corpus import generate_corpus
from attnlm.model import GPT
from attnlm.tokenizer import Tokenizer
from serving.engine import (
    AttentionOptions,
    AttentionQuery,
    CompletionParams,
    Engine,
    EngineError,
)
from tests.unit.test_artifact_vocab import write_padded_folder
from tests.unit.test_attention_maps import decoded
from tests.unit.test_generate import explicit_softmaxes
from tests.unit.together import complete_together

EXTRA_IDS = 5  # model vocabulary past the tokenizer's: ids without text
TEXTS = ["The cats near the dog sleep.", "A dog", " "]


@pytest.fixture(scope="module")
def padded_model() -> tuple[GPT, Tokenizer]:
    tokenizer = Tokenizer.train(generate_corpus(2000, seed=0), vocab_size=300)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size + EXTRA_IDS, block_size=64, n_layer=2, n_head=2, n_embd=32
    )
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():  # make the text-less ids the model's favourites, unless cropped
        model.lm_head.weight[tokenizer.vocab_size :].normal_(std=1.0)
    return model, tokenizer


@pytest.fixture(scope="module")
def engine(tmp_path_factory, padded_model) -> Engine:
    """Serves a folder as exports were before they cropped the text-less rows."""
    path = write_padded_folder(*padded_model, tmp_path_factory.mktemp("artifacts") / "tiny")
    return Engine(path, device="cpu")


def full_attention(engine: Engine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = engine.model(torch.tensor([ids]), return_attention=True)
    return out.attention[:, 0]  # (L, H, T, T)


def test_engine_loads_artifact(engine):
    assert engine.model_name == "tiny"
    assert engine.max_context == 64
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    # the padded folder is served with the tokenizer's vocabulary: the text-less rows cropped
    assert engine.config.vocab_size == engine.tokenizer.vocab_size
    assert engine.model.lm_head.weight.shape[0] == engine.tokenizer.vocab_size


def test_greedy_completion_equals_stepwise_argmax_of_full_forward(engine, padded_model):
    vocab = engine.tokenizer.vocab_size
    ids = engine.encode("The cat")
    expected, picked_text_less = [], False
    with torch.no_grad():
        for _ in range(12):
            logits = padded_model[0](torch.tensor([ids + expected])).logits[0, -1]
            picked_text_less |= int(logits.argmax()) >= vocab
            token = int(logits[:vocab].argmax())
            if token == engine.tokenizer.eot_id:
                break
            expected.append(token)
    assert picked_text_less  # cropping the folder's rows is what keeps those ids out
    result = engine.complete("The cat", CompletionParams(max_tokens=12, temperature=0))
    assert result.choices[0].text == engine.tokenizer.decode(expected)
    assert result.prompt_tokens == len(ids)
    if len(expected) == 12:
        assert result.choices[0].finish_reason == "length"


def test_attention_equals_model_explicit_path(engine):
    opts = [AttentionOptions(decimals=8), AttentionOptions(encoding="base64")]
    maps = engine.attention(TEXTS[:2], opts)
    for text, att_map, opt in zip(TEXTS[:2], maps, opts, strict=True):
        ids = engine.encode(text)
        expected = full_attention(engine, ids).double().numpy()
        assert att_map.token_ids == ids
        assert att_map.tokens == engine.tokenizer.token_strings(ids)
        assert (att_map.n_layers, att_map.n_heads) == (2, 2)
        assert att_map.layers == [0, 1] and att_map.heads == [0, 1]
        assert att_map.attention["shape"] == [2, 2, len(ids), len(ids)]
        atol = 1e-6 if opt.encoding == "json" else 1e-3  # float16: 11 significant bits
        np.testing.assert_allclose(decoded(att_map.attention), expected, atol=atol)
    assert maps[0].attention["dtype"] == "float32"
    assert maps[1].attention["dtype"] == "float16"


def test_attention_of_token_ids_is_the_attention_of_their_text(engine):
    ids = engine.encode(TEXTS[0])
    by_ids, by_text = engine.attention([ids, TEXTS[0]], AttentionOptions(layers=[1], decimals=8))
    assert by_ids.token_ids == ids and by_ids.tokens == by_text.tokens
    np.testing.assert_allclose(decoded(by_ids.attention), decoded(by_text.attention), atol=1e-6)
    with pytest.raises(EngineError, match="vocabulary") as err:
        engine.attention([[engine.tokenizer.vocab_size]])
    assert err.value.param == "text"


def test_attention_accepts_queries(engine):
    query = AttentionQuery("A dog", AttentionOptions(layers=[1], aggregation="mean"))
    (att_map,) = engine.attention([query])
    assert att_map.layers == [1] and att_map.aggregation == "mean"


def test_layer_and_head_selection_and_mean(engine):
    text = TEXTS[0]
    ids = engine.encode(text)
    T = len(ids)
    full = full_attention(engine, ids).double().numpy()
    picked, mean = engine.attention(
        [text, text],
        [
            AttentionOptions(layers=[1], heads=[0], decimals=8),
            AttentionOptions(layers=[1, 0], aggregation="mean", decimals=8),
        ],
    )
    assert picked.attention["shape"] == [1, 1, T, T]
    # maps come from q, k kept after an SDPA forward: the layers below differ from the explicit
    # path's by float32 rounding (~1e-6 here), no more
    np.testing.assert_allclose(decoded(picked.attention), full[[1]][:, [0]], atol=1e-5)
    assert mean.attention["shape"] == [2, T, T] and mean.layers == [1, 0]
    np.testing.assert_allclose(decoded(mean.attention), full.mean(axis=1)[[1, 0]], atol=1e-5)


def test_rollout_endpoint_rows_sum_to_one(engine):
    (att_map,) = engine.attention([TEXTS[0]], AttentionOptions(aggregation="rollout", decimals=8))
    data = decoded(att_map.attention)
    assert data.shape[0] == 2
    np.testing.assert_allclose(data.sum(-1), 1.0, atol=1e-6)


def test_completion_attention_equals_full_forward_map(engine):
    params = CompletionParams(
        max_tokens=6, temperature=0, n=2, attention=AttentionOptions(decimals=8)
    )
    result = engine.complete("The dog", params)
    for choice in result.choices:
        att = choice.attention
        ids = att["token_ids"]
        assert ids[: len(engine.encode("The dog"))] == engine.encode("The dog")
        assert choice.tokens == att["tokens"] == engine.tokenizer.token_strings(ids)
        assert att["attention"]["shape"] == [2, 2, len(ids), len(ids)]
        expected = full_attention(engine, ids).double().numpy()
        np.testing.assert_allclose(decoded(att["attention"]), expected, atol=1e-5)


def test_completion_attention_computes_the_layers_heads_and_rows_asked_for_only(engine):
    """A completion's maps come from the q and k its decode kept, every layer through SDPA:
    one layer's and head's map equals that layer's and head's in an every-layer answer, no
    softmax of another layer (or head, or row) is ever computed, none while decoding."""
    prompt = "The dog"
    every = engine.complete(
        prompt,
        CompletionParams(max_tokens=6, temperature=0, n=2, attention=AttentionOptions(decimals=8)),
    )
    for options, shape in (
        (AttentionOptions(layers=[1], heads=[0], decimals=8), lambda T: (1, 1, T, T)),
        (AttentionOptions(layers=[1], rows="last", decimals=8), lambda T: (1, 2, 1, T)),
    ):
        params = CompletionParams(max_tokens=6, temperature=0, n=2, attention=options)
        with explicit_softmaxes(engine.model) as calls:
            some = engine.complete(prompt, params)
        lengths = [len(choice.attention["token_ids"]) for choice in some.choices]
        assert calls == [(1, shape(T)) for T in lengths]  # one per choice, after decoding
        for got, want in zip(some.choices, every.choices, strict=True):
            assert got.text == want.text and got.tokens == want.tokens
            full = decoded(want.attention["attention"])  # (L, H, T, T)
            picked = full[[1]][:, options.heads or [0, 1]]
            if options.rows == "last":
                picked = picked[..., -1:, :]
            np.testing.assert_allclose(decoded(got.attention["attention"]), picked, atol=1e-6)


def test_stream_concatenates_to_completion(engine):
    params = CompletionParams(max_tokens=20, temperature=1.0, seed=3, n=2, logprobs=2)
    result = engine.complete("The cats", params)
    texts, reasons = ["", ""], [None, None]
    logprobs = [{"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}] * 2
    for delta in engine.stream("The cats", params):
        assert reasons[delta.index] is None  # nothing after the final delta
        texts[delta.index] += delta.text
        reasons[delta.index] = delta.finish_reason
        logprobs[delta.index] = {k: v + delta.logprobs[k] for k, v in logprobs[delta.index].items()}
    assert texts == [c.text for c in result.choices]
    assert reasons == [c.finish_reason for c in result.choices]
    assert logprobs == [c.logprobs for c in result.choices]
    for choice in result.choices:
        lp = choice.logprobs
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"])
        assert all(
            tok in top and len(top) <= 3
            for tok, top in zip(lp["tokens"], lp["top_logprobs"], strict=True)
        )
        assert "".join(lp["tokens"]) == choice.text or "\ufffd" in "".join(lp["tokens"])


def test_seed_reproduces_samples(engine):
    params = CompletionParams(max_tokens=10, temperature=1.0, seed=11, n=3)
    first = [c.text for c in engine.complete("A dog", params).choices]
    second = [c.text for c in engine.complete("A dog", params).choices]
    assert first == second


def test_stop_strings_cut_text(engine):
    full = engine.complete("The cat", CompletionParams(max_tokens=20, temperature=0)).choices[0]
    assert len(full.text) >= 5, full.text
    stop = full.text[3:5]
    params = CompletionParams(max_tokens=20, temperature=0, stop=["\x00never", stop])
    cut = engine.complete("The cat", params).choices[0]
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    streamed = list(engine.stream("The cat", params))
    assert "".join(d.text for d in streamed) == cut.text
    assert streamed[-1].finish_reason == "stop"


def test_echo_prepends_prompt_with_logprobs(engine):
    params = CompletionParams(max_tokens=4, temperature=0, echo=True, logprobs=1)
    choice = engine.complete("The cat", params).choices[0]
    plain = engine.complete("The cat", CompletionParams(max_tokens=4, temperature=0, logprobs=0))
    plain = plain.choices[0]
    assert choice.text == "The cat" + plain.text
    assert all(
        list(top) == [tok]
        for tok, top in zip(plain.logprobs["tokens"], plain.logprobs["top_logprobs"], strict=True)
    )
    lp = choice.logprobs
    strings = engine.tokenizer.token_strings(engine.encode("The cat")) + plain.logprobs["tokens"]
    assert lp["tokens"] == strings
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [sum(map(len, strings[:i])) for i in range(len(strings))]


def test_next_token_batched_equals_single(engine):
    batched = engine.next_token(TEXTS, top_k=8)
    for text, result in zip(TEXTS, batched, strict=True):
        (single,) = engine.next_token([text], top_k=8)
        assert result.token_ids == single.token_ids == engine.encode(text)
        assert [t["token_id"] for t in result.top] == [t["token_id"] for t in single.top]
        np.testing.assert_allclose(
            [t["prob"] for t in result.top], [t["prob"] for t in single.top], atol=1e-5
        )
        probs = [t["prob"] for t in result.top]
        assert probs == sorted(probs, reverse=True)
        assert all(t["token_id"] < engine.tokenizer.vocab_size for t in result.top)
        assert all(abs(np.exp(t["logprob"]) - t["prob"]) < 1e-9 for t in result.top)


@pytest.mark.parametrize(
    "call, param",
    [
        (lambda e: e.next_token([""]), "text"),
        (lambda e: e.next_token(["A dog"], top_k=0), "top_k"),
        (lambda e: e.attention(["A dog"], AttentionOptions(layers=[5])), "layers"),
        (lambda e: e.attention(["A dog"], AttentionOptions(heads=[-1])), "heads"),
        (lambda e: AttentionOptions(aggregation="max"), "aggregation"),
        (lambda e: AttentionOptions(encoding="xml"), "encoding"),
        (lambda e: AttentionOptions(decimals=9), "decimals"),
        (lambda e: CompletionParams(temperature=-1), "temperature"),
        (lambda e: CompletionParams(top_p=0), "top_p"),
        (lambda e: CompletionParams(top_k=0), "top_k"),
        (lambda e: CompletionParams(n=0), "n"),
        (lambda e: CompletionParams(logprobs=6), "logprobs"),
        (lambda e: CompletionParams(max_tokens=0), "max_tokens"),
        (lambda e: CompletionParams(stop=[""]), "stop"),
        (lambda e: e.complete("A dog", CompletionParams(max_tokens=65)), "max_tokens"),
        (lambda e: e.stream("", CompletionParams()), "prompt"),
        (
            lambda e: e.complete("A", CompletionParams(attention=AttentionOptions(layers=[2]))),
            "layers",
        ),
    ],
)
def test_bad_input_raises_engine_error(engine, call, param):
    with pytest.raises(EngineError) as info:
        call(engine)
    assert info.value.param == param
    assert info.value.status == 400


def test_too_long_text_states_both_lengths(engine):
    text = "The cat sits. " * 40
    n = len(engine.tokenizer.encode(text))
    with pytest.raises(EngineError) as info:
        engine.attention([text])
    err = info.value
    assert (err.param, err.code, err.status) == ("text", "context_length_exceeded", 400)
    assert f"{n} tokens" in str(err) and "64 tokens" in str(err)
    assert engine.encode("  ") == engine.tokenizer.encode("  ")  # whitespace is a text


def test_out_of_range_message_names_valid_range(engine):
    with pytest.raises(EngineError, match=r"0\.\.1") as info:
        engine.check_attention_options(AttentionOptions(layers=[0, 5]))
    assert info.value.code == "out_of_range"


def test_generation_ends_with_length_when_context_is_full(engine):
    ids = engine.tokenizer.encode("The cat sits near the dog. " * 6)
    prompt = engine.tokenizer.decode(ids[:62])
    n_prompt = len(engine.encode(prompt))
    assert 60 <= n_prompt <= 64
    for attention, room in ((None, 64 - n_prompt + 1), (AttentionOptions(), 64 - n_prompt)):
        params = CompletionParams(max_tokens=64, temperature=0, attention=attention)
        result = engine.complete(prompt, params)
        assert result.completion_tokens <= room
        if result.completion_tokens == room:
            assert result.choices[0].finish_reason == "length"
        if attention is not None:
            shape = result.choices[0].attention["attention"]["shape"]
            assert shape[-1] == n_prompt + result.completion_tokens <= 64


def test_interleaved_streams_keep_their_own_kv_cache(engine):
    params = CompletionParams(max_tokens=15, temperature=1.0, seed=5)
    prompts = ["The cats near the dog", "A"]
    expected = [engine.complete(p, params).choices[0].text for p in prompts]
    streams = [engine.stream(p, params) for p in prompts]
    texts = ["", ""]
    active = [True, True]
    while any(active):
        for i, deltas in enumerate(streams):
            if active[i]:
                delta = next(deltas, None)
                active[i] = delta is not None
                texts[i] += delta.text if delta else ""
    assert texts == expected


def test_many_texts_packed_equal_each_text_alone(engine):
    texts = generate_corpus(40, seed=5, max_depth=1) + TEXTS  # many texts in each packed row
    maps = engine.attention(texts, AttentionOptions(decimals=8))
    batched = engine.next_token(texts, top_k=5)
    for text, att_map, nt in zip(texts, maps, batched, strict=True):
        ids = engine.encode(text)
        expected = full_attention(engine, ids).double().numpy()
        np.testing.assert_allclose(decoded(att_map.attention), expected, atol=1e-5)
        (single,) = engine.next_token([text], top_k=5)
        assert [t["token_id"] for t in nt.top] == [t["token_id"] for t in single.top]
        np.testing.assert_allclose(
            [t["logprob"] for t in nt.top], [t["logprob"] for t in single.top], atol=1e-4
        )


def test_lstm_engine_batches_by_length_buckets(tmp_path):
    from tests.integration.helpers import build_tiny_artifact

    lstm = Engine(build_tiny_artifact(tmp_path / "lstm", arch="lstm", n_head=1), device="cpu")
    texts = list(generate_corpus(12, seed=6))
    batched = lstm.next_token(texts, top_k=4)
    for text, result in zip(texts, batched, strict=True):
        (single,) = lstm.next_token([text], top_k=4)
        np.testing.assert_allclose(
            [t["logprob"] for t in result.top], [t["logprob"] for t in single.top], atol=1e-4
        )
    with pytest.raises(EngineError, match="no attention") as err:
        lstm.attention(["The cat"])
    assert err.value.code == "attention_unavailable"


def test_concurrent_completions_decode_together_and_match_alone(engine, monkeypatch):
    """Requests in flight at the same time share decode forwards (rows at their own positions)
    and each gets what it gets alone: greedy text, seeded samples, stop strings, n > 1."""

    requests = [
        ("The cats near the dog", CompletionParams(max_tokens=12, temperature=0)),
        ("A dog", CompletionParams(max_tokens=20, temperature=0.9, seed=7, n=3)),
        ("The cat that was sitting on the mat", CompletionParams(max_tokens=8, temperature=0)),
        ("The", CompletionParams(max_tokens=15, temperature=1.0, seed=3, stop=["e"])),
    ]
    alone = [engine.complete(prompt, params) for prompt, params in requests]

    widths = []
    forward = engine.model.forward

    def counting_forward(idx, *args, **kwargs):
        if isinstance(kwargs.get("row_positions"), torch.Tensor):
            widths.append(idx.size(0))
        return forward(idx, *args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counting_forward)
    results = complete_together(engine, requests)
    for got, want in zip(results, alone, strict=True):
        assert [c.text for c in got.choices] == [c.text for c in want.choices]
        assert [c.finish_reason for c in got.choices] == [c.finish_reason for c in want.choices]
        assert got.completion_tokens == want.completion_tokens
    assert max(widths) > 3, widths  # some decode step carried rows of several requests


def test_cancelled_stream_frees_its_decode_slots(engine):
    batcher = engine._batcher
    for _ in range(3 * batcher.n_slots // 16):  # more requests of n=16 than there are slots
        stream = engine.stream("The dog", CompletionParams(max_tokens=30, n=16, temperature=1.0))
        next(iter(stream))
        stream.close()
    result = engine.complete("The dog", CompletionParams(max_tokens=3, n=16, temperature=0))
    assert len(result.choices) == 16
