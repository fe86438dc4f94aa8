"""serving.text and the engine on the edges of its input: lone surrogates, NUL and control
characters, very long words, token-id prompts; the bound that skips tokenizing a text surely over
the context never rejects one that fits. Also the deadline of a completion (a 504 that frees the
decode slots) and sampling at the far ends of top_p and temperature."""

from __future__ import annotations

import time

import pytest

from serving.engine import CompletionParams, Engine, EngineError
from serving.params import Deadline
from serving.text import check_text, check_token_ids, max_text_chars, unicode_error
from tests.integration.helpers import build_tiny_artifact


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return Engine(build_tiny_artifact(tmp_path_factory.mktemp("text") / "tiny"), device="cpu")


def test_unicode_error_names_the_lone_surrogate_and_where():
    assert unicode_error("plain, \x00 and \x1b[31m too") is None
    assert unicode_error("ab\ud800cd") == (
        "must be valid Unicode text: a lone surrogate (U+D800) at character 2"
    )
    assert "U+DFFF" in unicode_error("\udfff")
    assert unicode_error("\U0001f600") is None  # a pair decoded by JSON is one character


@pytest.mark.parametrize(
    "text, code",
    [
        ("", "empty_text"),
        ("ab\ud800cd", "invalid_text"),
        (42, "invalid_value"),
        (None, "invalid_value"),
    ],
)
def test_check_text_rejects_with_a_code(text, code):
    with pytest.raises(EngineError) as info:
        check_text(text, "prompt")
    assert (info.value.param, info.value.code, info.value.status) == ("prompt", code, 400)


def test_token_ids_are_checked_against_the_vocabulary():
    assert check_token_ids([0, 5, 9], 10, "prompt") == [0, 5, 9]
    for ids, fragment in (
        ([1, 10], "prompt[1]: token id 10"),
        ([-1], "token id -1"),
        ([True], "True"),
    ):
        with pytest.raises(EngineError, match=fragment.replace("[", r"\[")) as info:
            check_token_ids(ids, 10, "prompt")
        assert (info.value.param, info.value.code) == ("prompt", "invalid_token_id")
        assert "0..9" in str(info.value)
    with pytest.raises(EngineError, match="empty"):
        check_token_ids([], 10, "prompt")


def test_max_text_chars_is_an_upper_bound(engine):
    """No text of at most `context` tokens has more characters: the longest tokens, repeated."""
    context = engine.max_context
    bound = max_text_chars(engine.tokenizer, context)
    strings = engine.tokenizer.token_strings(range(engine.tokenizer.vocab_size))
    longest = max(strings, key=lambda s: len(s.encode("utf-8")))
    assert len(longest * context) <= bound
    assert len(engine.tokenizer.encode(longest * context)) <= context


@pytest.mark.parametrize(
    "text", ["a\x00b", "\x01\x02\x1f\x7f", "tab\there\r\n", "\x1b[31mred", "é\u2028"]
)
def test_control_characters_are_tokens_like_any_other(engine, text):
    ids = engine.encode(text)
    assert engine.tokenizer.decode(ids) == text
    (result,) = engine.next_token([text], top_k=2)
    assert result.token_ids == ids and len(result.top) == 2


def test_lone_surrogates_are_a_400_in_every_engine_text(engine):
    for call in (
        lambda: engine.next_token(["ab\ud800cd"]),
        lambda: engine.attention(["\udfff"]),
        lambda: engine.probe("The cat \ud800 sleeps."),
        lambda: engine.complete("x\ud800", CompletionParams(max_tokens=2)),
    ):
        with pytest.raises(EngineError) as info:
            call()
        assert (info.value.code, info.value.status) == ("invalid_text", 400)


def test_a_very_long_word_is_over_the_context_without_being_tokenized(engine, monkeypatch):
    word = "a" * (1 << 20)
    calls = []
    monkeypatch.setattr(engine.tokenizer, "encode", lambda t: calls.append(t) or [1] * len(t))
    start = time.perf_counter()
    with pytest.raises(EngineError) as info:
        engine.encode(word, param="prompt")
    assert time.perf_counter() - start < 0.05 and not calls  # not tokenized
    assert (info.value.param, info.value.code) == ("prompt", "context_length_exceeded")
    assert f"{len(word)} characters" in str(info.value) and "64 tokens" in str(info.value)


def test_a_word_just_over_the_context_is_tokenized_and_counted(engine):
    word = "x" * (engine.max_context + 1)  # one byte per token at worst: over by tokens
    with pytest.raises(EngineError, match=r"\d+ tokens; the context window is 64") as info:
        engine.encode(word)
    assert info.value.code == "context_length_exceeded"


def test_token_id_prompts_decode_as_given(engine):
    ids = engine.tokenizer.encode("The cat sat")
    by_ids = engine.complete(ids, CompletionParams(max_tokens=4, temperature=0, echo=True))
    by_text = engine.complete(
        "The cat sat", CompletionParams(max_tokens=4, temperature=0, echo=True)
    )
    assert by_ids.choices[0].text == by_text.choices[0].text  # the same ids, the same greedy text
    assert by_ids.prompt_tokens == len(ids)
    # ids that are not the tokenizer's own split of their text are taken as they are
    split = [engine.tokenizer.encode(c)[0] for c in "The"]
    result = engine.complete(split, CompletionParams(max_tokens=1, temperature=0, echo=True))
    assert result.prompt_tokens == 3 and result.choices[0].text.startswith("The")
    deltas = list(engine.stream(ids, CompletionParams(max_tokens=4, temperature=0)))
    assert "".join(d.text for d in deltas) == by_text.choices[0].text[len("The cat sat") :]
    with pytest.raises(EngineError, match="token id 100000") as info:
        engine.complete([1, 100000], CompletionParams())
    assert info.value.param == "prompt"


def test_past_deadline_is_a_504_and_frees_the_decode_slots(engine):
    batcher = engine._batcher
    past = Deadline(time.monotonic() - 1, limit_s=0.5)
    for _ in range(3 * batcher.n_slots // 16):  # more rows than the batcher has slots
        with pytest.raises(EngineError) as info:
            engine.complete("The dog", CompletionParams(max_tokens=30, n=16, deadline=past))
        assert (info.value.status, info.value.code) == (504, "timeout")
        assert "0.5 s" in str(info.value)
        stream = engine.stream("The dog", CompletionParams(max_tokens=30, n=16, deadline=past))
        with pytest.raises(EngineError, match="time limit"):
            list(stream)
    result = engine.complete("The dog", CompletionParams(max_tokens=3, n=16, temperature=0))
    assert len(result.choices) == 16  # every slot came back
    later = Deadline.after(60)
    assert 59 < later.remaining() <= 60
    later.check()  # not passed: nothing raised
    fine = engine.complete("The dog", CompletionParams(max_tokens=3, deadline=later))
    assert fine.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("temperature, top_p", [(5e-324, None), (1e-129, 0.5), (1.0, 5e-324)])
def test_extreme_sampling_parameters_sample_the_most_likely_token(engine, temperature, top_p):
    greedy = engine.complete("The cat", CompletionParams(max_tokens=5, temperature=0))
    params = CompletionParams(max_tokens=5, temperature=temperature, top_p=top_p, seed=1)
    assert engine.complete("The cat", params).choices[0].text == greedy.choices[0].text


def test_seeds_are_bounded_to_exact_json_integers():
    from serving.limits import MAX_SEED, MIN_SEED

    CompletionParams(seed=MAX_SEED)
    CompletionParams(seed=MIN_SEED)
    for seed in (MAX_SEED + 1, MIN_SEED - 1):
        with pytest.raises(EngineError) as info:
            CompletionParams(seed=seed)
        assert info.value.param == "seed"
    assert float(MAX_SEED) == MAX_SEED and float(MAX_SEED + 1) == MAX_SEED + 1
