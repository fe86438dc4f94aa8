"""Tests for attnlm.corpus: determinism, spans, agreement, depth, attractors, variety, file output."""

from __future__ import annotations

import doctest
import random
import time
from collections import Counter

import pytest

from attnlm import corpus
from attnlm.corpus import (
    AgreementSentence,
    generate_corpus,
    generate_sentence,
    iter_corpus,
    noun_number,
    write_corpus,
)

# The agreeing verbs that are not "<plural> + s".
IRREGULAR = {"is": "are", "was": "were", "has": "have", "does": "do"}


def _sentences(n: int, seed: int = 0, **kwargs) -> list[AgreementSentence]:
    rng = random.Random(seed)
    return [generate_sentence(rng, **kwargs) for _ in range(n)]


def _intervening_nouns(s: AgreementSentence) -> list[str]:
    """The nouns strictly between the subject head noun and the main verb."""
    between = s.text[s.subject_span[1] : s.verb_span[0]].split()
    return [w for w in between if noun_number(w) is not None]


def _is_singular_of(singular: str, plural: str) -> bool:
    if singular in IRREGULAR:
        return IRREGULAR[singular] == plural
    if plural.endswith("y") and plural[-2] not in "aeiou":
        return singular == plural[:-1] + "ies"
    return singular in (plural + "s", plural + "es")


def test_doctest_example_in_module_docstring():
    assert doctest.testmod(corpus).failed == 0


def test_same_seed_same_corpus_and_seeds_differ():
    a = generate_corpus(500, seed=7)
    assert a == generate_corpus(500, seed=7)
    assert a != generate_corpus(500, seed=8)
    assert len(set(a)) > 450  # not one sentence repeated
    assert list(iter_corpus(500, seed=7)) == a
    assert generate_corpus(100, seed=7) == a[:100]  # a prefix: no state hidden in num_sentences


def test_generation_uses_only_the_given_rng():
    random.seed(123)
    state = random.getstate()
    generate_corpus(50, seed=1)
    generate_sentence(random.Random(1))
    assert random.getstate() == state


def test_spans_point_at_subject_and_verb():
    for s in _sentences(2000):
        assert s.text[s.subject_span[0] : s.subject_span[1]] == s.subject
        assert s.text[s.verb_span[0] : s.verb_span[1]] == s.verb
        assert s.subject_span[1] < s.verb_span[0]
        # whole words: a space (or the sentence end) on each side
        assert s.text[s.subject_span[0] - 1] == " " and s.text[s.subject_span[1]] == " "
        assert s.text[s.verb_span[0] - 1] == " " and s.text[s.verb_span[1]] in " ."


def test_verb_agrees_with_subject_number():
    numbers = set()
    for s in _sentences(2000):
        assert s.number in ("singular", "plural")
        assert noun_number(s.subject) == s.number
        assert s.verb != s.wrong_verb
        singular, plural = (
            (s.verb, s.wrong_verb) if s.number == "singular" else (s.wrong_verb, s.verb)
        )
        assert _is_singular_of(singular, plural), s
        numbers.add(s.number)
    assert numbers == {"singular", "plural"}


def test_verbs_inside_relative_clauses_agree_with_their_noun():
    for s in _sentences(3000, min_depth=1, max_depth=3):
        words = s.text.rstrip(".").split()
        for i, word in enumerate(words):
            if word in ("was", "were") and words[i - 1] in ("that", "who", "which"):
                head = next(noun_number(w) for w in reversed(words[: i - 1]) if noun_number(w))
                assert (word == "was") == (head == "singular"), s.text


def test_text_between_subject_and_verb_holds_exactly_the_modifiers():
    for s in _sentences(3000, min_depth=0, max_depth=4):
        nouns = _intervening_nouns(s)
        assert len(nouns) == s.depth, s  # each modifier brings exactly one noun
        if s.depth == 0:
            assert s.text[s.subject_span[1] : s.verb_span[0]] == " "
        assert s.attractor == any(noun_number(n) != s.number for n in nouns), s
        assert s.attractors == sum(noun_number(n) != s.number for n in nouns), s


@pytest.mark.parametrize("count", [0, 1, 4])
def test_attractor_count_can_be_set_at_any_depth(count):
    rng = random.Random(count)
    for _ in range(300):
        s = generate_sentence(rng, min_depth=0, max_depth=12, attractors=count)
        nouns = _intervening_nouns(s)
        assert s.depth >= count and len(nouns) == s.depth
        assert s.attractors == count == sum(noun_number(n) != s.number for n in nouns), s
        assert s.attractor is (count > 0)


@pytest.mark.parametrize(("min_depth", "max_depth"), [(0, 0), (2, 2), (1, 3), (0, 3), (5, 6)])
def test_depth_bounds_are_honored(min_depth, max_depth):
    depths = Counter(s.depth for s in _sentences(600, min_depth=min_depth, max_depth=max_depth))
    assert set(depths) == set(range(min_depth, max_depth + 1))


@pytest.mark.parametrize("forced", [True, False])
def test_attractor_can_be_forced(forced):
    for s in _sentences(1000, min_depth=0, max_depth=3, attractor=forced):
        assert s.attractor is forced
        assert any(noun_number(n) != s.number for n in _intervening_nouns(s)) is forced
        if forced:
            assert s.depth >= 1


def test_attractors_occur_naturally():
    flags = Counter(s.attractor for s in _sentences(2000, min_depth=1, max_depth=3))
    assert flags[True] > 500 and flags[False] > 300


def test_attractor_true_at_depth_zero_raises():
    with pytest.raises(ValueError, match="attractor"):
        generate_sentence(random.Random(0), min_depth=0, max_depth=0, attractor=True)


def test_sentence_shape():
    for text in generate_corpus(3000, seed=3):
        assert text.endswith(".") and text.count(".") == 1
        assert text[0].isupper() and text[1:].islower()
        assert "  " not in text and "\n" not in text
        assert text.isascii()


def test_vocabulary_variety_and_balance():
    sentences = _sentences(2000, seed=11)
    lemma = {form: pair[0] for pairs in corpus.NOUNS.values() for pair in pairs for form in pair}
    nouns = {lemma[n] for s in sentences for n in [s.subject, *_intervening_nouns(s)]}
    assert len(nouns) > 40
    assert len({lemma[s.subject] for s in sentences}) > 30
    assert len({s.verb for s in sentences}) > 30
    assert {s.depth for s in sentences} == {0, 1, 2, 3}
    plural_share = sum(s.number == "plural" for s in sentences) / len(sentences)
    assert 0.4 < plural_share < 0.6
    verbs = {s.verb for s in sentences}
    assert {"is", "are", "has", "have", "was", "were", "does", "do"} <= verbs  # all predicate kinds


def test_corpus_is_fast():
    start = time.perf_counter()
    texts = generate_corpus(100_000, seed=0)
    assert len(texts) == 100_000
    assert time.perf_counter() - start < 10.0  # ~1 s on a laptop core


def test_write_corpus_writes_lines_atomically(tmp_path):
    path = write_corpus(tmp_path / "nested" / "dir" / "corpus.txt", 250, seed=5, max_depth=2)
    assert path == tmp_path / "nested" / "dir" / "corpus.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == generate_corpus(250, seed=5, max_depth=2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["corpus.txt"]  # no temp file left
    write_corpus(str(path), 10, seed=6)  # str paths, and overwriting
    assert len(path.read_text(encoding="utf-8").splitlines()) == 10
    assert sorted(p.name for p in path.parent.iterdir()) == ["corpus.txt"]


def test_write_corpus_failure_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = write_corpus(tmp_path / "corpus.txt", 5)
    before = path.read_text(encoding="utf-8")

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(corpus.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        write_corpus(path, 50)
    assert path.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["corpus.txt"]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_sentences": 0}, "num_sentences"),
        ({"num_sentences": -3}, "num_sentences"),
        ({"num_sentences": 5, "min_depth": -1}, "min_depth"),
        ({"num_sentences": 5, "max_depth": -1}, "max_depth"),
        ({"num_sentences": 5, "min_depth": 3, "max_depth": 2}, "min_depth"),
    ],
)
def test_bad_corpus_arguments_raise_value_error(kwargs, name, tmp_path):
    with pytest.raises(ValueError, match=name):
        generate_corpus(**kwargs)
    with pytest.raises(ValueError, match=name):
        iter_corpus(**kwargs)  # raised on the call, not at the first next()
    with pytest.raises(ValueError, match=name):
        write_corpus(tmp_path / "c.txt", **kwargs)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"min_depth": -1}, "min_depth"),
        ({"max_depth": -2}, "max_depth"),
        ({"min_depth": 2, "max_depth": 1}, "min_depth"),
        ({"attractor": "yes"}, "attractor"),
        ({"attractors": -1}, "attractors"),
        ({"attractors": 4, "max_depth": 3}, "attractors"),
        ({"attractors": 1, "attractor": True}, "not both"),
    ],
)
def test_bad_sentence_arguments_raise_value_error(kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate_sentence(random.Random(0), **kwargs)


def test_wrong_types_raise_type_error():
    with pytest.raises(TypeError, match="rng"):
        generate_sentence(0)
    with pytest.raises(TypeError, match="num_sentences"):
        generate_corpus(2.5)
    with pytest.raises(TypeError, match="seed"):
        generate_corpus(5, seed="0")


def test_cli_prints_sentences(capsys, tmp_path):
    corpus.main(["--num-sentences", "5", "--seed", "0"])
    assert capsys.readouterr().out.splitlines() == generate_corpus(5, seed=0)
    corpus.main(["--num-sentences", "7", "--out", str(tmp_path / "c.txt")])
    assert len((tmp_path / "c.txt").read_text(encoding="utf-8").splitlines()) == 7
