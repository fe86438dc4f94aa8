"""The long-range agreement probe: does a model link the verb to its subject across a clause?

A probe item is an agreement sentence from `attnlm.corpus` (held out from the training corpus),
tokenized, with the token positions of its subject head noun and of its main verb:

    The cat that was sitting on the mat which was next to the dogs | jumps .
        ^^^ subject tokens                                            ^ verb (position p)

Two measurements per item, both from one batched forward of `<|endoftext|> + prefix + verb`:

- agreement: the model is right when log P(correct form | prefix) > log P(wrong form | prefix),
  e.g. " jumps" vs " jump" (summed over the form's tokens);
- attribution: for every layer and head, the attention weight that the position predicting the
  verb (the last prefix token, p - 1) gives to the subject's tokens, summed over those tokens.

`summarize` groups the results by clause depth, by distance in tokens and by attractor (an
intervening noun of the other number), and names the head that best finds the subject.

    items = probe_set(tokenizer, per_cell=100, seed=PROBE_SEED, block_size=64)
    scores = score_items(model, items, eot_id=tokenizer.eot_id)
    summary = summarize(items, scores)            # accuracy by depth/distance, best head, ...

`analyze` finds subject and main verb in a free sentence of the corpus grammar (used by the
server's `POST /v1/probe`).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from attnlm.corpus import (
    PAST_TENSE_FORMS,
    PLURAL,
    RELATIVE_PRONOUNS,
    SINGULAR,
    AgreementSentence,
    generate_corpus,
    generate_sentence,
    noun_number,
    verb_forms,
)
from attnlm.tokenizer import Tokenizer

PROBE_SEED = 20_251_128  # differs from every training seed in configs/
# token distance between the subject's last token and the verb's first: bucket edges (inclusive)
DISTANCE_BUCKETS: tuple[tuple[int, int], ...] = (
    (1, 1),
    (2, 5),
    (6, 10),
    (11, 15),
    (16, 20),
    (21, 10**6),
)


class ProbeError(ValueError):
    """A sentence the probe cannot use (no subject or verb found, too long, ...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param  # the request field at fault: "text", "subject" or "verb"


def bucket_label(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else (f"{lo}+" if hi >= 10**6 else f"{lo}-{hi}")


def distance_bucket(distance: int, buckets: Sequence[tuple[int, int]] = DISTANCE_BUCKETS) -> str:
    for lo, hi in buckets:
        if lo <= distance <= hi:
            return bucket_label(lo, hi)
    raise ValueError(f"distance must be >= 1, got {distance}")


@dataclass(frozen=True)
class ProbeItem:
    """One sentence, tokenized, with the positions the probe reads."""

    text: str
    subject: str  # head noun as written
    verb: str  # the form that agrees with the subject (or the verb as written, number unknown)
    wrong_verb: str | None  # the other-number form; None when the verb marks no number
    number: str | None  # subject number, "singular" / "plural", None if unknown
    depth: int | None  # modifiers between subject and verb (generated items)
    attractor: bool | None  # some noun in between has the other number (generated items)
    prefix_ids: list[int]  # tokens before the verb
    verb_ids: list[int]  # tokens of " " + verb
    wrong_ids: list[int] | None  # tokens of " " + wrong_verb
    subject_positions: list[int]  # indices into prefix_ids of the subject's tokens
    written_verb: str = ""  # the verb as the text has it (may be the wrong form)
    attractors: int | None = None  # nouns in between of the other number (generated items)

    @property
    def verb_position(self) -> int:
        """Index of the verb's first token in the sentence's tokens (= len(prefix_ids))."""
        return len(self.prefix_ids)

    @property
    def distance(self) -> int:
        """Tokens from the subject's last token to the verb's first (1 = adjacent)."""
        return self.verb_position - self.subject_positions[-1]


def _count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text)) if text else 0


def make_item(
    tokenizer: Tokenizer,
    text: str,
    subject_span: tuple[int, int],
    verb_span: tuple[int, int],
    verb: str,
    wrong_verb: str | None,
    number: str | None = None,
    depth: int | None = None,
    attractor: bool | None = None,
    attractors: int | None = None,
) -> ProbeItem:
    """Tokenize a labelled sentence. Spans are character offsets [start, end) into text; the verb
    must follow the subject and be preceded by a space (byte-level BPE puts the space in the
    word's token, so " jumps" is what the model predicts)."""
    s0, s1 = subject_span
    v0, v1 = verb_span
    if not (0 <= s0 < s1 <= v0 <= len(text)):
        raise ProbeError(f"subject span {subject_span} must lie before verb span {verb_span}")
    if v0 == 0 or text[v0 - 1] != " ":
        raise ProbeError("the verb must follow a space", "verb")
    prefix = text[: v0 - 1]
    prefix_ids = tokenizer.encode(prefix)
    # tokens before the subject: the text up to it without its trailing space (" cat" is a token)
    before = text[: s0 - 1] if s0 > 0 and text[s0 - 1] == " " else text[:s0]
    first, last = _count(tokenizer, before), _count(tokenizer, text[:s1])
    if last <= first or tokenizer.encode(text[:s1]) != prefix_ids[:last]:
        raise ProbeError(
            f"could not place the subject {text[s0:s1]!r} on token boundaries", "subject"
        )

    def continuation(word: str) -> list[int]:
        ids = tokenizer.encode(prefix + " " + word)
        if ids[: len(prefix_ids)] == prefix_ids:
            return ids[len(prefix_ids) :]
        return tokenizer.encode(" " + word)

    return ProbeItem(
        text=text,
        subject=text[s0:s1],
        verb=verb,
        wrong_verb=wrong_verb,
        number=number,
        depth=depth,
        attractor=attractor,
        prefix_ids=prefix_ids,
        verb_ids=continuation(verb),
        wrong_ids=None if wrong_verb is None else continuation(wrong_verb),
        subject_positions=list(range(first, last)),
        written_verb=text[v0:v1],
        attractors=attractors,
    )


def probe_cells(max_depth: int) -> list[tuple[int, bool]]:
    """(depth, attractor) cells of a balanced probe set: depth 0 has no attractor."""
    return [(0, False)] + [(d, a) for d in range(1, max_depth + 1) for a in (False, True)]


def probe_set(
    tokenizer: Tokenizer,
    per_cell: int = 100,
    seed: int = PROBE_SEED,
    max_depth: int = 3,
    block_size: int | None = None,
    exclude: Iterable[str] = (),
) -> list[ProbeItem]:
    """A deterministic, balanced probe set: `per_cell` sentences for every (depth, attractor)
    cell, none of them in `exclude` (pass the training sentences to hold them out), each fitting
    `block_size` tokens with the leading end-of-text token and the longer verb form."""
    if per_cell < 1:
        raise ValueError(f"per_cell must be >= 1, got {per_cell}")
    excluded = set(exclude)
    rng = random.Random(seed)
    items: list[ProbeItem] = []
    for depth, attractor in probe_cells(max_depth):
        made, tries = 0, 0
        while made < per_cell:
            tries += 1
            if tries > 50 * per_cell:
                raise ProbeError(
                    f"could not find {per_cell} held-out sentences of depth {depth} "
                    f"(attractor {attractor}) that fit {block_size} tokens"
                )
            s = generate_sentence(rng, depth, depth, attractor)
            if s.text in excluded:
                continue
            item = sentence_item(tokenizer, s)
            if block_size is not None and not fits(item, block_size):
                continue
            items.append(item)
            made += 1
    return items


def sentence_item(tokenizer: Tokenizer, s: AgreementSentence) -> ProbeItem:
    """The probe item of a generated sentence."""
    return make_item(
        tokenizer, s.text, s.subject_span, s.verb_span, s.verb, s.wrong_verb,
        s.number, s.depth, s.attractor, s.attractors,
    )  # fmt: skip


def fits(item: ProbeItem, block_size: int) -> bool:
    """Whether the item's forward (end-of-text token, prefix, longer verb form) fits the context."""
    longest = max(len(item.verb_ids), len(item.wrong_ids or []))
    return 1 + len(item.prefix_ids) + longest <= block_size


# The hard set: distances far past what the training corpus holds (depth <= 3 there, about 25
# tokens), up to ~200 tokens in a 256-token context, crossed with counts of attractors.
HARD_DISTANCE_BUCKETS: tuple[tuple[int, int], ...] = (
    (1, 10),
    (11, 25),
    (26, 50),
    (51, 100),
    (101, 150),
    (151, 200),
)
HARD_ATTRACTORS = (0, 1, 2, 3, 4)
# a modifier adds at least 3 tokens ("near the dogs") and seldom more than 12: the depths worth
# drawing for a bucket of token distances (the subject's own phrase adds none)
_TOKENS_PER_MODIFIER = (3, 12)


def hard_cells(
    buckets: Sequence[tuple[int, int]] = HARD_DISTANCE_BUCKETS,
    attractor_counts: Sequence[int] = HARD_ATTRACTORS,
) -> list[tuple[tuple[int, int], int]]:
    """(distance bucket, attractors) cells that sentences can fill: k attractors need k
    modifiers, 3 tokens at the very least and seldom under 4 with a small vocabulary, so a bucket
    ending at `hi` holds k only if 4k <= hi."""
    return [(b, k) for b in buckets for k in attractor_counts if 4 * k <= b[1]]


def hard_buckets(block_size: int) -> tuple[tuple[int, int], ...]:
    """The hard distance buckets whose sentences fit `block_size` tokens: the subject's phrase,
    the verb and the end-of-text token take up to 16 more than the distance."""
    return tuple(b for b in HARD_DISTANCE_BUCKETS if b[1] <= block_size - 16)


def hard_probe_set(
    tokenizer: Tokenizer,
    per_cell: int = 50,
    seed: int = PROBE_SEED,
    block_size: int = 256,
    buckets: Sequence[tuple[int, int]] = HARD_DISTANCE_BUCKETS,
    attractor_counts: Sequence[int] = HARD_ATTRACTORS,
    exclude: Iterable[str] = (),
    strict: bool = True,
) -> list[ProbeItem]:
    """A deterministic probe set balanced over (token distance bucket, number of attractors)
    cells (`hard_cells`): `per_cell` held-out sentences each, deep enough to put the verb that
    many tokens after the subject, each fitting `block_size` tokens with the end-of-text token.
    A cell the tokenizer cannot fill (a small vocabulary spends more tokens on a modifier) is a
    ProbeError, or with `strict=False` keeps the sentences found (maybe none)."""
    if per_cell < 1:
        raise ValueError(f"per_cell must be >= 1, got {per_cell}")
    excluded = set(exclude)
    rng = random.Random(seed)
    few, many = _TOKENS_PER_MODIFIER
    items: list[ProbeItem] = []
    for (lo, hi), k in hard_cells(buckets, attractor_counts):
        min_depth, max_depth = max(k, (lo - 1) // many), max(k, (hi - 1) // few)
        made, tries = 0, 0
        while made < per_cell:
            tries += 1
            if tries > 400 * per_cell:
                if not strict:
                    break
                raise ProbeError(
                    f"could not find {per_cell} held-out sentences {lo}-{hi} tokens from subject "
                    f"to verb with {k} attractors that fit {block_size} tokens"
                )
            depth = rng.randint(min_depth, max_depth)
            s = generate_sentence(rng, depth, depth, attractors=k)
            if s.text in excluded:
                continue
            item = sentence_item(tokenizer, s)
            if lo <= item.distance <= hi and fits(item, block_size):
                items.append(item)
                made += 1
    return items


def training_sentences(num_sentences: int, seed: int, max_depth: int = 3) -> set[str]:
    """The built-in training corpus's sentences (to hold them out of a probe set)."""
    return set(generate_corpus(num_sentences, seed=seed, max_depth=max_depth))


# -- scoring ------------------------------------------------------------------------------------------
@dataclass
class ItemScore:
    correct_logprob: float  # log P(verb | prefix), summed over its tokens
    wrong_logprob: float | None  # log P(wrong_verb | prefix)
    attention_to_subject: torch.Tensor | None  # (n_layer, n_head) float32, None without attention

    @property
    def correct(self) -> bool | None:
        if self.wrong_logprob is None:
            return None
        return self.correct_logprob > self.wrong_logprob


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _sequence_logprobs(logprobs: torch.Tensor, start: int, ids: Sequence[int]) -> float:
    """Sum of log P(ids[i]) read at rows start + i - 1 of logprobs (T, V)."""
    rows = torch.arange(start - 1, start - 1 + len(ids), device=logprobs.device)
    return float(logprobs[rows, torch.tensor(ids, device=logprobs.device)].sum())


@torch.inference_mode()
def score_items(
    model: torch.nn.Module,
    items: Sequence[ProbeItem],
    eot_id: int,
    batch_size: int = 64,
    vocab_size: int | None = None,
) -> list[ItemScore]:
    """Agreement log-probabilities and attention-to-subject for each item, in the items' order.

    One forward of `eot + prefix + form` per item, right-padded (causal models never look at the
    padding), in batches of similar lengths. The other form's first token is read off the same
    forward's verb-predicting row, so it costs a second sequence only when it spans several
    tokens.

    `model(idx, return_attention=...)` must return logits (B, T, V) and, when the model has
    attention (`model.has_attention`), attention (L, B, H, T, T). `vocab_size` cuts padded
    vocabulary rows off before the softmax.
    """
    device = _device(model)
    with_attention = bool(getattr(model, "has_attention", False))
    order = sorted(range(len(items)), key=lambda i: len(items[i].prefix_ids))
    scores: dict[int, ItemScore] = {}
    for start in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[start : start + batch_size]]
        seqs = [[eot_id, *it.prefix_ids, *it.verb_ids] for it in chunk]
        seqs += [[eot_id, *it.prefix_ids, *it.wrong_ids] for it in chunk if _own_forward(it)]
        idx = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for b, seq in enumerate(seqs):
            idx[b, : len(seq)] = torch.tensor(seq)
        out = model(idx.to(device), return_attention=with_attention)
        logits = out.logits.float()
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        logprobs = F.log_softmax(logits, dim=-1)  # (B, T, V)
        wrong_row = len(chunk)
        for b, item in enumerate(chunk):
            first = 1 + len(item.prefix_ids)  # the verb's first token in the sequence
            correct = _sequence_logprobs(logprobs[b], first, item.verb_ids)
            wrong = None
            if _own_forward(item):
                wrong = _sequence_logprobs(logprobs[wrong_row], first, item.wrong_ids)
                wrong_row += 1
            elif item.wrong_ids:  # one token, predicted from the row the verb's first is
                wrong = _sequence_logprobs(logprobs[b], first, item.wrong_ids)
            attention = None
            if with_attention:
                subject = torch.tensor(item.subject_positions, device=device) + 1  # after eot
                row = out.attention[:, b, :, first - 1]  # (L, H, T_k)
                attention = row.index_select(-1, subject).sum(-1).float().cpu()  # (L, H)
            scores[order[start + b]] = ItemScore(correct, wrong, attention)
    return [scores[i] for i in range(len(items))]


def _own_forward(item: ProbeItem) -> bool:
    """Whether the other verb form needs a forward of its own (it spans several tokens)."""
    return item.wrong_ids is not None and len(item.wrong_ids) > 1


# -- summary --------------------------------------------------------------------------------------------
@dataclass
class Group:
    n: int = 0
    correct: int = 0
    attention: float = 0.0  # sum of the best head's attention to the subject
    uniform: float = 0.0  # sum of what uniform attention over the prefix would give
    margin: float = 0.0  # sum of log P(correct form) - log P(wrong form), nats

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    @property
    def mean_attention(self) -> float | None:
        return self.attention / self.n if self.n else None

    @property
    def mean_uniform(self) -> float | None:
        return self.uniform / self.n if self.n else None

    @property
    def mean_margin(self) -> float | None:
        """How much more likely the agreeing form is, on average: mean log-prob difference."""
        return self.margin / self.n if self.n else None


@dataclass
class ProbeSummary:
    n: int
    accuracy: float
    by_depth: dict[int, Group] = field(default_factory=dict)
    by_distance: dict[str, Group] = field(default_factory=dict)
    by_attractor: dict[bool, Group] = field(default_factory=dict)
    by_depth_attractor: dict[tuple[int, bool], Group] = field(default_factory=dict)
    by_attractors: dict[int, Group] = field(default_factory=dict)  # generated items: the count
    by_distance_attractors: dict[tuple[str, int], Group] = field(default_factory=dict)
    head_attention: torch.Tensor | None = None  # (L, H) mean attention to subject, depth >= 1
    best_head: tuple[int, int] | None = None  # (layer, head) with the highest such mean

    def to_dict(self) -> dict:
        def groups(d: dict) -> dict:
            return {
                str(k): {
                    "n": g.n,
                    "accuracy": g.accuracy,
                    "mean_margin_nats": g.mean_margin,
                    "best_head_attention": g.mean_attention,
                    "uniform_attention": g.mean_uniform,
                }
                for k, g in d.items()
            }

        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "by_depth": groups(self.by_depth),
            "by_distance": groups(self.by_distance),
            "by_attractor": groups(self.by_attractor),
            "by_attractors": groups(self.by_attractors),
            "by_distance_attractors": groups(
                {f"{d}|{k}": g for (d, k), g in self.by_distance_attractors.items()}
            ),
            "best_head": None if self.best_head is None else list(self.best_head),
            "head_attention": None
            if self.head_attention is None
            else [[round(float(x), 4) for x in row] for row in self.head_attention],
        }


def summarize(
    items: Sequence[ProbeItem],
    scores: Sequence[ItemScore],
    buckets: Sequence[tuple[int, int]] = DISTANCE_BUCKETS,
) -> ProbeSummary:
    """Accuracy by depth, distance bucket (`buckets`), attractor and number of attractors; the head that attends most to the subject
    from the verb-predicting position (mean over items with depth >= 1, where the subject is not
    simply the previous token), and that head's attention by group."""
    if len(items) != len(scores):
        raise ValueError(f"{len(items)} items but {len(scores)} scores")
    judged = [(it, sc) for it, sc in zip(items, scores, strict=True) if sc.correct is not None]
    if not judged:
        raise ProbeError("no item has a number-marked verb: nothing to judge")
    head_attention, best = None, None
    far = [sc.attention_to_subject for it, sc in judged if it.distance > 1]
    if far and far[0] is not None:
        head_attention = torch.stack(far).mean(0)  # (L, H)
        flat = int(head_attention.argmax())
        best = divmod(flat, head_attention.size(1))
    summary = ProbeSummary(
        n=len(judged),
        accuracy=sum(sc.correct for _, sc in judged) / len(judged),
        head_attention=head_attention,
        best_head=best,
    )
    for lo, hi in buckets:
        summary.by_distance[bucket_label(lo, hi)] = Group()
    for it, sc in judged:
        bucket = distance_bucket(it.distance, buckets)
        keys = [(summary.by_distance, bucket), (summary.by_attractor, bool(it.attractor))]
        if it.attractors is not None:
            keys += [
                (summary.by_attractors, it.attractors),
                (summary.by_distance_attractors, (bucket, it.attractors)),
            ]
        if it.depth is not None:
            keys += [
                (summary.by_depth, it.depth),
                (summary.by_depth_attractor, (it.depth, bool(it.attractor))),
            ]
        for table, key in keys:
            group = table.setdefault(key, Group())
            group.n += 1
            group.correct += int(sc.correct)
            group.margin += sc.correct_logprob - sc.wrong_logprob
            if best is not None:
                group.attention += float(sc.attention_to_subject[best])
                group.uniform += len(it.subject_positions) / (1 + len(it.prefix_ids))
    summary.by_distance = {k: g for k, g in summary.by_distance.items() if g.n}
    summary.by_depth = dict(sorted(summary.by_depth.items()))
    summary.by_attractors = dict(sorted(summary.by_attractors.items()))
    return summary


def nearest_noun_scores(tokenizer: Tokenizer, items: Sequence[ProbeItem]) -> list[ItemScore]:
    """The scores of a heuristic that agrees the verb with the lexicon noun nearest before it
    (the subject itself when nothing intervenes): right exactly when that noun has the subject's
    number. A reference line for the models: it needs no memory of the subject at all. The
    log-probabilities are 0 and -1 (or -1 and 0), so only the accuracy means something."""
    scores = []
    for it in items:
        between = tokenizer.decode(it.prefix_ids[it.subject_positions[-1] + 1 :])
        numbers = [n for n in map(noun_number, _WORD.findall(between)) if n is not None]
        agrees = (numbers[-1] if numbers else it.number) == it.number
        scores.append(ItemScore(0.0 if agrees else -1.0, -1.0 if agrees else 0.0, None))
    return scores


# -- free sentences ---------------------------------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z']+")


def _is_verb_like(word: str, loose: bool = False) -> bool:
    """A verb form of the lexicon; with `loose`, also any other word ending in "ed"."""
    w = word.lower()
    if verb_forms(w) is not None or w in PAST_TENSE_FORMS:
        return True
    return loose and w.endswith("ed") and noun_number(w) is None


_AUXILIARIES = frozenset(("is", "are", "was", "were", "has", "have", "does", "do"))


def _main_verb(words: list[tuple[str, int, int]], s: int, loose: bool) -> int | None:
    for j in range(s + 1, len(words)):
        if not _is_verb_like(words[j][0], loose) or words[j - 1][0].lower() in RELATIVE_PRONOUNS:
            continue
        following = words[j + 1][0] if j + 1 < len(words) else ""
        if _is_verb_like(following, loose) and words[j][0].lower() not in _AUXILIARIES:
            continue  # the verb of an object relative, followed by the main verb
        if noun_number(following) is not None:
            continue  # an adjective that is also a verb: "the clean cups"
        return j
    return None


def analyze(
    tokenizer: Tokenizer, text: str, subject: str | None = None, verb: str | None = None
) -> ProbeItem:
    """A probe item for a free sentence: the subject is the first noun of the corpus lexicon (or
    the first occurrence of `subject`), the main verb the first verb form after it that does not
    open a relative clause ("that was ..."), nor close an object relative ("which the dog
    chases | is ..."), or the first occurrence of `verb` after the subject.

    The correct form is the one agreeing with the subject's number when both are in the lexicon
    ("The cat near the dogs jump." is judged against "jumps"); a verb without number marking
    ("jumped") gets no wrong form and no verdict. Raises ProbeError when nothing fits.
    """
    words = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
    if subject is not None:
        hits = [i for i, (w, _, _) in enumerate(words) if w.lower() == subject.lower()]
        if not hits:
            raise ProbeError(f"subject {subject!r} is not a word of the text", "subject")
    else:
        hits = [i for i, (w, _, _) in enumerate(words) if noun_number(w) is not None]
        if not hits:
            raise ProbeError(
                "found no noun of the corpus lexicon to be the subject; name it with 'subject'",
                "subject",
            )
    s = hits[0]
    if verb is not None:
        found = [j for j in range(s + 1, len(words)) if words[j][0].lower() == verb.lower()]
        if not found:
            raise ProbeError(
                f"verb {verb!r} does not occur after the subject {words[s][0]!r}", "verb"
            )
        v = found[0]
    else:
        v = _main_verb(words, s, loose=False)
        if v is None:  # a verb outside the lexicon: "... the dog jumped."
            v = _main_verb(words, s, loose=True)
        if v is None:
            raise ProbeError("found no main verb after the subject; name it with 'verb'", "verb")
    written = words[v][0]
    number = noun_number(words[s][0])
    forms = verb_forms(written)
    if forms is None:
        correct, wrong = written, None
    elif number is None:
        correct = written
        wrong = forms[PLURAL] if forms[SINGULAR] == written.lower() else forms[SINGULAR]
    else:
        other = PLURAL if number == SINGULAR else SINGULAR
        correct, wrong = forms[number], forms[other]
    return make_item(
        tokenizer, text, (words[s][1], words[s][2]), (words[v][1], words[v][2]),
        correct, wrong, number,
    )  # fmt: skip
