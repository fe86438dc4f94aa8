"""Built-in training corpus: English sentences with long-range subject-verb agreement.

The project's default corpus is generated here, from a small hand-written lexicon, with no download.
Each sentence has a subject noun phrase, then 0..max_depth nested modifiers (prepositional phrases
and relative clauses, each attached to the noun of the one before), then a main verb that agrees in
number with the subject's head noun::

    The cat that was sitting on the mat which was next to the dogs jumps.
        ^^^ subject  [------------- 2 modifiers, 2 nouns --------]  ^^^^^ verb

To predict "jumps" rather than "jump" a model has to look back across the modifiers to "cat"; the
nouns in between ("mat", "dogs") may have the other number (attractors). Verbs inside relative
clauses agree with their own subject ("the cats that were sitting", "the mat which was lying"), so
the agreement signal is consistent everywhere. Generation is pure stdlib, deterministic by seed, and
fast (about 100k sentences per second or two).

Example:
    >>> import random
    >>> from attnlm.corpus import generate_corpus, generate_sentence
    >>> s = generate_sentence(random.Random(0), min_depth=2, max_depth=2, attractor=True)
    >>> s.text[s.verb_span[0] : s.verb_span[1]] == s.verb, s.depth, s.attractor
    (True, 2, True)
    >>> len(generate_corpus(1000, seed=0))
    1000

Run:
    python -m attnlm.corpus --num-sentences 5 --seed 0
    python -m attnlm.corpus --num-sentences 100000 --seed 0 --out data_cache/agreement.txt
"""

from __future__ import annotations

import argparse
import os
import pathlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

from attnlm.atomic import atomic_write

SINGULAR = "singular"
PLURAL = "plural"
NUMBERS = (SINGULAR, PLURAL)

# ----------------------------------------------------------------------------------------------
# Lexicon. Noun forms are kept disjoint from every other word below, so `noun_number` can find
# the nouns of a sentence by looking words up (no "saw" the tool next to "saw" the verb).

PERSON, ANIMAL, THING = "person", "animal", "thing"
NOUN_CLASSES = (PERSON, ANIMAL, THING)
_ANIMATE = (PERSON, ANIMAL)

NOUNS: dict[str, tuple[tuple[str, str], ...]] = {  # class -> ((singular, plural), ...)
    PERSON: (
        ("farmer", "farmers"), ("teacher", "teachers"), ("child", "children"), ("woman", "women"),
        ("man", "men"), ("doctor", "doctors"), ("student", "students"), ("girl", "girls"),
        ("boy", "boys"), ("baker", "bakers"), ("pilot", "pilots"), ("singer", "singers"),
        ("nurse", "nurses"), ("king", "kings"), ("queen", "queens"), ("driver", "drivers"),
        ("sailor", "sailors"), ("lady", "ladies"), ("baby", "babies"), ("neighbor", "neighbors"),
    ),
    ANIMAL: (
        ("cat", "cats"), ("dog", "dogs"), ("mouse", "mice"), ("horse", "horses"),
        ("bird", "birds"), ("fox", "foxes"), ("rabbit", "rabbits"), ("goose", "geese"),
        ("wolf", "wolves"), ("cow", "cows"), ("pig", "pigs"), ("puppy", "puppies"),
        ("owl", "owls"), ("lion", "lions"), ("monkey", "monkeys"), ("donkey", "donkeys"),
    ),
    THING: (
        ("mat", "mats"), ("table", "tables"), ("box", "boxes"), ("chair", "chairs"),
        ("house", "houses"), ("tree", "trees"), ("bench", "benches"), ("window", "windows"),
        ("river", "rivers"), ("garden", "gardens"), ("road", "roads"), ("wall", "walls"),
        ("shelf", "shelves"), ("bus", "buses"), ("church", "churches"), ("bridge", "bridges"),
        ("ball", "balls"), ("basket", "baskets"), ("car", "cars"), ("door", "doors"),
        ("lamp", "lamps"), ("fence", "fences"), ("knife", "knives"), ("boat", "boats"),
        ("rug", "rugs"), ("bed", "beds"), ("bottle", "bottles"), ("cup", "cups"),
    ),
}  # fmt: skip

_NOUN_NUMBER: dict[str, str] = {
    form: number
    for pairs in NOUNS.values()
    for pair in pairs
    for form, number in zip(pair, NUMBERS, strict=True)
}

_ADJECTIVES: dict[str, tuple[str, ...]] = {
    PERSON: ("old", "young", "kind", "tall", "happy", "tired", "hungry", "brave", "lazy",
             "clever", "quiet", "sleepy", "angry", "friendly", "busy"),
    ANIMAL: ("old", "young", "little", "big", "happy", "tired", "hungry", "brave", "lazy",
             "clever", "quiet", "sleepy", "angry", "friendly", "small"),
    THING: ("old", "new", "broken", "heavy", "red", "blue", "green", "wooden", "small", "big",
            "dirty", "clean", "empty", "tall", "wet"),
}  # fmt: skip

_NEUTRAL_DETERMINERS = ("my", "our", "his", "her", "their")
_NUMBER_DETERMINERS = {
    SINGULAR: ("a", "this", "every", "each"),
    PLURAL: ("some", "these", "those", "many", "two", "three", "several"),
}
_RELATIVE_PRONOUNS = {PERSON: ("who", "that"), ANIMAL: ("that", "which"), THING: ("that", "which")}

_GENERAL_PREPOSITIONS = ("near", "next to", "behind", "beside", "by", "in front of", "across from",
                         "close to", "with")  # fmt: skip
_LOCATION_PREPOSITIONS = ("on", "under", "inside", "above", "below", "on top of", "underneath")
_PREPOSITIONS = _GENERAL_PREPOSITIONS + _LOCATION_PREPOSITIONS

# "<noun> that was sitting on ..." / "<noun> was sleeping."
_ING_FORMS: dict[str, tuple[str, ...]] = {
    PERSON: ("sitting", "standing", "sleeping", "waiting", "hiding", "playing", "resting",
             "walking", "reading", "working", "singing", "dancing"),
    ANIMAL: ("sitting", "standing", "sleeping", "waiting", "hiding", "playing", "resting",
             "lying", "running", "eating", "walking"),
    THING: ("lying", "standing", "sitting", "hanging", "shaking", "leaning"),
}  # fmt: skip
# "<noun> that lives near ..." (verb + prepositional phrase)
_LOCATIVE_VERBS: dict[str, tuple[str, ...]] = {
    PERSON: ("live", "sleep", "wait", "play", "sit", "stand", "hide", "rest", "work"),
    ANIMAL: ("live", "sleep", "wait", "play", "sit", "stand", "hide", "rest"),
    THING: ("stand", "sit", "lie", "hang"),
}
# "<noun> jumps." (intransitive main verbs)
_INTRANSITIVE_VERBS: dict[str, tuple[str, ...]] = {
    PERSON: ("jump", "sleep", "run", "sing", "laugh", "wait", "smile", "dance", "swim", "shout",
             "cry", "rest", "work", "walk", "play"),
    ANIMAL: ("jump", "sleep", "run", "wait", "swim", "rest", "play", "hide", "eat", "walk"),
    THING: ("fall", "shake", "move", "break"),
}  # fmt: skip
_ADVERBS = ("quickly", "slowly", "quietly", "loudly", "again", "today", "outside", "suddenly")

_ANY = NOUN_CLASSES
# class of the doer -> ((verb, classes its object may have), ...)
_TRANSITIVE_VERBS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    PERSON: (
        ("like", _ANY), ("watch", _ANY), ("see", _ANY), ("find", _ANY), ("follow", _ANIMATE),
        ("help", _ANIMATE), ("know", _ANIMATE), ("feed", (ANIMAL,)), ("visit", (PERSON,)),
        ("carry", (ANIMAL, THING)), ("clean", (THING,)), ("paint", (THING,)), ("fix", (THING,)),
    ),
    ANIMAL: (
        ("like", _ANY), ("watch", _ANY), ("see", _ANY), ("find", _ANY), ("chase", _ANIMATE),
        ("follow", _ANIMATE), ("bite", _ANIMATE),
    ),
    THING: (("face", _ANY), ("hide", _ANY), ("block", (THING,)), ("cover", (THING,)),
            ("touch", (THING,))),
}  # fmt: skip
_PAST_TENSE = {
    "like": "liked", "watch": "watched", "see": "saw", "find": "found", "follow": "followed",
    "help": "helped", "know": "knew", "feed": "fed", "visit": "visited", "carry": "carried",
    "clean": "cleaned", "paint": "painted", "fix": "fixed", "chase": "chased", "bite": "bit",
}  # fmt: skip


def noun_number(word: str) -> str | None:
    """Return "singular" or "plural" if `word` is a noun form of the lexicon, else None."""
    return _NOUN_NUMBER.get(word.lower())


# ----------------------------------------------------------------------------------------------
# Sentences


@dataclass(frozen=True)
class AgreementSentence:
    """One generated sentence with the positions a subject-verb agreement probe needs."""

    text: str  # the full sentence, e.g. "The cat that was sitting on the mat jumps."
    subject: str  # head noun as written, e.g. "cat"
    subject_span: tuple[int, int]  # character offsets [start, end) of the head noun in text
    verb: str  # main verb form as written (agreeing), e.g. "jumps" / "is" / "has" / "were"
    wrong_verb: str  # the same verb in the other number, e.g. "jump" / "are" / "have" / "was"
    verb_span: tuple[int, int]  # character offsets [start, end) of the main verb in text
    number: str  # "singular" or "plural"
    depth: int  # number of modifiers (clauses/phrases) between subject and verb
    attractor: bool  # True if some noun between subject and verb has the other number
    attractors: int = 0  # how many nouns between subject and verb have the other number


def _third_person_singular(base: str) -> str:
    """Inflect a regular verb for a singular subject: "jump" -> "jumps", "watch" -> "watches"."""
    if base.endswith(("s", "sh", "ch", "x", "z", "o")):
        return base + "es"
    if base.endswith("y") and base[-2] not in "aeiou":
        return base[:-1] + "ies"
    return base + "s"


def _agreeing_forms(base: str) -> dict[str, str]:
    """Present-tense forms by subject number, e.g. {"singular": "has", "plural": "have"}."""
    singular = {"be": "is", "have": "has", "do": "does"}.get(base) or _third_person_singular(base)
    plural = "are" if base == "be" else base
    return {SINGULAR: singular, PLURAL: plural}


_WAS_WERE = {SINGULAR: "was", PLURAL: "were"}
_FORMS = {
    base: _agreeing_forms(base)
    for base in {
        "be", "have", "do",
        *(v for verbs in (_LOCATIVE_VERBS, _INTRANSITIVE_VERBS) for vs in verbs.values() for v in vs),
        *(v for vs in _TRANSITIVE_VERBS.values() for v, _ in vs),
    }
}  # fmt: skip


_VERB_FORMS: dict[str, dict[str, str]] = {
    form: forms for forms in (*_FORMS.values(), _WAS_WERE) for form in forms.values()
}
RELATIVE_PRONOUNS = frozenset(p for pronouns in _RELATIVE_PRONOUNS.values() for p in pronouns)
PAST_TENSE_FORMS = frozenset(_PAST_TENSE.values())


def verb_forms(word: str) -> dict[str, str] | None:
    """{"singular": ..., "plural": ...} if `word` is a number-marked verb form of the lexicon
    ("jumps", "jump", "is", "were", ...), else None."""
    return _VERB_FORMS.get(word.lower())


def _noun_phrase(rng: random.Random, noun_class: str, number: str) -> list[str]:
    """Words of a noun phrase ending in its head noun: ["the", "old", "mat"], ["two", "dogs"]."""
    roll = rng.random()
    if roll < 0.65:
        determiner = "the"
    elif roll < 0.8:
        determiner = rng.choice(_NEUTRAL_DETERMINERS)
    else:
        determiner = rng.choice(_NUMBER_DETERMINERS[number])
    noun = rng.choice(NOUNS[noun_class])[number == PLURAL]
    words = [determiner, rng.choice(_ADJECTIVES[noun_class]), noun]
    if rng.random() >= 0.3:
        del words[1]
    if determiner == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return words


def _modifier(
    rng: random.Random, head_class: str, head_number: str, inner_number: str, last: bool
) -> tuple[list[str], str]:
    """A phrase or relative clause attached to a head noun; it introduces exactly one new noun.

    The new noun comes last (so the next modifier can attach to it), except in an object relative
    ("which the farmers saw"), which is therefore only used as the last modifier.

    Returns:
        (words, class of the new noun)
    """
    kind = rng.random()
    if last and kind < 0.15:  # object relative: "which the farmers saw" / "that the dog chases"
        inner_class = rng.choice(_ANIMATE)
        verbs = [v for v, objects in _TRANSITIVE_VERBS[inner_class] if head_class in objects]
        verb = rng.choice(verbs)
        verb = _PAST_TENSE[verb] if rng.random() < 0.6 else _FORMS[verb][inner_number]
        pronoun = rng.choice(_RELATIVE_PRONOUNS[head_class])
        return [pronoun, *_noun_phrase(rng, inner_class, inner_number), verb], inner_class
    if kind < 0.5:  # prepositional phrase: "next to the dogs"
        preposition = rng.choice(_PREPOSITIONS)
        inner_class = THING if preposition in _LOCATION_PREPOSITIONS else rng.choice(NOUN_CLASSES)
        return [*preposition.split(), *_noun_phrase(rng, inner_class, inner_number)], inner_class
    pronoun = rng.choice(_RELATIVE_PRONOUNS[head_class])
    if kind < 0.85:  # subject relative + phrase: "that was sitting on", "who lives near"
        if kind < 0.7:
            verb_words = [_WAS_WERE[head_number], rng.choice(_ING_FORMS[head_class])]
        else:
            verb_words = [_FORMS[rng.choice(_LOCATIVE_VERBS[head_class])][head_number]]
        preposition = rng.choice(_PREPOSITIONS)
        inner_class = THING if preposition in _LOCATION_PREPOSITIONS else rng.choice(NOUN_CLASSES)
        words = [pronoun, *verb_words, *preposition.split()]
    else:  # transitive subject relative: "that chases the ball"
        verb, objects = rng.choice(_TRANSITIVE_VERBS[head_class])
        inner_class = rng.choice(objects)
        words = [pronoun, _FORMS[verb][head_number]]
    return [*words, *_noun_phrase(rng, inner_class, inner_number)], inner_class


def _predicate(rng: random.Random, subject_class: str) -> tuple[str, list[str]]:
    """The main predicate: (verb base agreeing with the subject, words after the verb)."""
    kind = rng.random()
    if subject_class == THING and 0.65 <= kind < 0.75:  # things possess nothing here
        kind = rng.random() * 0.65
    if kind < 0.25:  # "jumps", "sleeps quietly"
        base = rng.choice(_INTRANSITIVE_VERBS[subject_class])
        return base, [rng.choice(_ADVERBS)] if rng.random() < 0.3 else []
    if kind < 0.45:  # "is happy", "are very old"
        rest = ["very"] if rng.random() < 0.2 else []
        return "be", [*rest, rng.choice(_ADJECTIVES[subject_class])]
    if kind < 0.65:  # "chases the ball"
        verb, objects = rng.choice(_TRANSITIVE_VERBS[subject_class])
        return verb, _noun_phrase(rng, rng.choice(objects), rng.choice(NUMBERS))
    if kind < 0.75:  # "has a red ball"
        return "have", _noun_phrase(rng, rng.choice(NOUN_CLASSES), rng.choice(NUMBERS))
    if kind < 0.9:  # "was sleeping", "were sitting under the table"
        rest = [rng.choice(_ING_FORMS[subject_class])]
        if rng.random() < 0.5:
            preposition = rng.choice(_PREPOSITIONS)
            noun_class = (
                THING if preposition in _LOCATION_PREPOSITIONS else rng.choice(NOUN_CLASSES)
            )
            rest += [*preposition.split(), *_noun_phrase(rng, noun_class, rng.choice(NUMBERS))]
        return "was", rest
    return "do", ["not", rng.choice(_INTRANSITIVE_VERBS[subject_class])]  # "does not sleep"


def _sample_sentence(
    rng: random.Random,
    min_depth: int,
    max_depth: int,
    attractor: bool | None,
    attractors: int | None = None,
) -> AgreementSentence:
    """`generate_sentence` without argument checks (the corpus loop checks once)."""
    floor = attractors if attractors is not None else (1 if attractor else 0)
    depth = rng.randint(max(min_depth, floor), max_depth)
    number = rng.choice(NUMBERS)
    other = PLURAL if number == SINGULAR else SINGULAR
    if attractors is not None:  # exactly that many of the other number, at random places
        flipped = set(rng.sample(range(depth), attractors))
        inner_numbers = [other if i in flipped else number for i in range(depth)]
    elif attractor is False:
        inner_numbers = [number] * depth
    else:
        inner_numbers = [rng.choice(NUMBERS) for _ in range(depth)]
        while attractor and other not in inner_numbers:  # rejection keeps the others independent
            inner_numbers = [rng.choice(NUMBERS) for _ in range(depth)]

    subject_class = rng.choices(NOUN_CLASSES, weights=(0.4, 0.35, 0.25))[0]
    words = _noun_phrase(rng, subject_class, number)
    subject_index = len(words) - 1
    head_class, head_number = subject_class, number
    for i, inner_number in enumerate(inner_numbers):
        modifier, head_class = _modifier(rng, head_class, head_number, inner_number, i == depth - 1)
        words += modifier
        head_number = inner_number
    base, rest = _predicate(rng, subject_class)
    forms = _WAS_WERE if base == "was" else _FORMS[base]
    verb_index = len(words)
    words += [forms[number], *rest]

    words[0] = words[0].capitalize()
    starts, offset = [], 0
    for word in words:
        starts.append(offset)
        offset += len(word) + 1
    subject_start, verb_start = starts[subject_index], starts[verb_index]
    return AgreementSentence(
        text=" ".join(words) + ".",
        subject=words[subject_index],
        subject_span=(subject_start, subject_start + len(words[subject_index])),
        verb=forms[number],
        wrong_verb=forms[other],
        verb_span=(verb_start, verb_start + len(forms[number])),
        number=number,
        depth=depth,
        attractor=other in inner_numbers,
        attractors=inner_numbers.count(other),
    )


def _check_int(name: str, value: object, minimum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_depths(min_depth: int, max_depth: int) -> None:
    _check_int("min_depth", min_depth, 0)
    _check_int("max_depth", max_depth, 0)
    if min_depth > max_depth:
        raise ValueError(f"min_depth ({min_depth}) must be <= max_depth ({max_depth})")


def generate_sentence(
    rng: random.Random,
    min_depth: int = 0,
    max_depth: int = 3,
    attractor: bool | None = None,
    attractors: int | None = None,
) -> AgreementSentence:
    """Generate one sentence, its depth drawn uniformly from [min_depth, max_depth].

    Args:
        rng: the random generator to draw from (never the global one).
        min_depth, max_depth: bounds, inclusive, on the number of modifiers between subject and verb.
        attractor: None for whatever comes out (each intervening noun's number is a coin flip);
            True to force at least one intervening noun of the other number (depth >= 1 then);
            False to give every intervening noun the subject's number.
        attractors: instead of `attractor`, exactly this many intervening nouns of the other
            number (the depth is then at least this); the others have the subject's number.

    Returns:
        The sentence with the spans of its subject head noun and main verb.
    """
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    _check_depths(min_depth, max_depth)
    if attractor not in (None, True, False):
        raise ValueError(f"attractor must be None, True or False, got {attractor!r}")
    if attractor and max_depth == 0:
        raise ValueError("attractor=True needs max_depth >= 1: at depth 0 nothing intervenes")
    if attractors is not None:
        _check_int("attractors", attractors, 0)
        if attractor is not None:
            raise ValueError("give attractor or attractors, not both")
        if attractors > max_depth:
            raise ValueError(f"attractors ({attractors}) must be <= max_depth ({max_depth})")
    return _sample_sentence(rng, min_depth, max_depth, attractor, attractors)


def iter_corpus(
    num_sentences: int, seed: int = 0, min_depth: int = 0, max_depth: int = 3
) -> Iterator[str]:
    """Yield `num_sentences` sentence texts lazily; the same sequence as `generate_corpus`."""
    _check_int("num_sentences", num_sentences, 1)
    _check_int("seed", seed)
    _check_depths(min_depth, max_depth)
    return _iter_texts(
        num_sentences, seed, min_depth, max_depth
    )  # checked now, not at first next()


def _iter_texts(num_sentences: int, seed: int, min_depth: int, max_depth: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(num_sentences):
        yield _sample_sentence(rng, min_depth, max_depth, None).text


def generate_corpus(
    num_sentences: int, seed: int = 0, min_depth: int = 0, max_depth: int = 3
) -> list[str]:
    """Generate `num_sentences` sentence texts, deterministic for a given seed."""
    return list(iter_corpus(num_sentences, seed, min_depth, max_depth))


def write_corpus(
    path: str | os.PathLike,
    num_sentences: int,
    seed: int = 0,
    min_depth: int = 0,
    max_depth: int = 3,
) -> pathlib.Path:
    """Write the corpus to `path`, one sentence per line, UTF-8, atomically.

    The lines go to a temporary file in the same directory, which then replaces `path`, so readers
    never see a partial file. Parent directories are created.

    Returns:
        The path written.
    """
    sentences = iter_corpus(num_sentences, seed, min_depth, max_depth)
    path = pathlib.Path(path)
    with atomic_write(path, "w", encoding="utf-8", newline="\n") as f:
        for sentence in sentences:
            f.write(sentence + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    """Print (or, with --out, write) a few sentences of the corpus."""
    parser = argparse.ArgumentParser(
        prog="python -m attnlm.corpus", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--num-sentences", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-depth", type=int, default=0)
    parser.add_argument("--max-depth", type=int, default=3)
    parser.add_argument(
        "--out", type=pathlib.Path, default=None, help="write here instead of printing"
    )
    args = parser.parse_args(argv)
    if args.out is not None:
        path = write_corpus(args.out, args.num_sentences, args.seed, args.min_depth, args.max_depth)
        print(f"wrote {args.num_sentences} sentences to {path}")
        return
    for text in iter_corpus(args.num_sentences, args.seed, args.min_depth, args.max_depth):
        print(text)


if __name__ == "__main__":
    main()
