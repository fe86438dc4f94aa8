"""The agreement probe: its labels, its metric on toy models with known preferences, its parser."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from attnlm.corpus import generate_corpus, generate_sentence
from attnlm.model import GPTOutput
from attnlm.probe import (
    HARD_DISTANCE_BUCKETS,
    ItemScore,
    ProbeError,
    analyze,
    distance_bucket,
    hard_cells,
    hard_probe_set,
    make_item,
    nearest_noun_scores,
    probe_cells,
    probe_set,
    score_items,
    summarize,
)
from attnlm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(generate_corpus(3000, seed=3), vocab_size=600)


@pytest.fixture(scope="module")
def items(tokenizer):
    return probe_set(tokenizer, per_cell=12, seed=11, max_depth=3, block_size=64)


def test_probe_set_is_deterministic_and_balanced(tokenizer, items):
    again = probe_set(tokenizer, per_cell=12, seed=11, max_depth=3, block_size=64)
    assert [i.text for i in again] == [i.text for i in items]
    other = probe_set(tokenizer, per_cell=12, seed=12, max_depth=3, block_size=64)
    assert [i.text for i in other] != [i.text for i in items]
    cells = [(i.depth, i.attractor) for i in items]
    assert {c: cells.count(c) for c in cells} == {c: 12 for c in probe_cells(3)}
    assert all(1 + len(i.prefix_ids) + max(len(i.verb_ids), len(i.wrong_ids)) <= 64 for i in items)


def test_labels_point_at_the_right_tokens(tokenizer, items):
    for item in items:
        tokens = tokenizer.encode(item.text)
        assert tokens[: item.verb_position] == item.prefix_ids  # the prefix is the sentence's
        subject = tokenizer.decode([item.prefix_ids[p] for p in item.subject_positions])
        assert subject.strip() == item.subject
        assert tokenizer.decode(item.verb_ids) == " " + item.verb
        assert tokenizer.decode(item.wrong_ids) == " " + item.wrong_verb
        written = tokenizer.decode(tokens[item.verb_position :])
        assert written.startswith(" " + item.verb)  # the sentence's own verb is the correct form
        assert item.distance == item.verb_position - item.subject_positions[-1] >= 1
        if item.depth == 0:
            assert item.distance == 1  # "The cat | jumps"
        if item.attractor:
            assert item.depth >= 1


def test_held_out_sentences_are_excluded(tokenizer):
    first = probe_set(tokenizer, per_cell=3, seed=5, max_depth=1)
    held = probe_set(tokenizer, per_cell=3, seed=5, max_depth=1, exclude=[first[0].text])
    assert first[0].text not in {i.text for i in held}


class BiasModel(torch.nn.Module):
    """Ignores its input: every position predicts the same distribution softmax(bias)."""

    has_attention = False

    def __init__(self, bias: torch.Tensor) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(bias)

    def forward(self, idx, return_attention=False):
        return GPTOutput(self.bias.expand(*idx.shape, -1), None, None)


def test_agreement_metric_on_a_model_with_known_preferences(tokenizer, items):
    torch.manual_seed(0)
    bias = torch.randn(tokenizer.vocab_size)
    scores = score_items(BiasModel(bias), items, tokenizer.eot_id, batch_size=7)
    logp = F.log_softmax(bias, dim=-1)
    for item, score in zip(items, scores, strict=True):
        correct = float(logp[item.verb_ids].sum())
        wrong = float(logp[item.wrong_ids].sum())
        assert score.correct_logprob == pytest.approx(correct, abs=1e-4)
        assert score.wrong_logprob == pytest.approx(wrong, abs=1e-4)
        assert score.correct == (correct > wrong)
        assert score.attention_to_subject is None
    summary = summarize(items, scores)
    expected = sum(float(logp[i.verb_ids].sum()) > float(logp[i.wrong_ids].sum()) for i in items)
    assert summary.accuracy == pytest.approx(expected / len(items))
    assert summary.best_head is None


@pytest.fixture(scope="module")
def word_tokenizer() -> Tokenizer:
    """A vocabulary big enough that every word of the corpus is one token."""
    return Tokenizer.train(generate_corpus(20000, seed=4), vocab_size=2048)


def test_a_model_that_always_prefers_plural_is_right_on_plural_subjects_only(word_tokenizer):
    tokenizer = word_tokenizer
    items = probe_set(tokenizer, per_cell=12, seed=11, max_depth=3)
    assert all(len(i.verb_ids) == len(i.wrong_ids) == 1 for i in items)  # one token per form
    bias = torch.zeros(tokenizer.vocab_size)
    for item in items:  # every plural form 5 nats above every singular one
        plural = item.verb_ids if item.number == "plural" else item.wrong_ids
        bias[plural] = 5.0
    scores = score_items(BiasModel(bias), items, tokenizer.eot_id)
    for item, score in zip(items, scores, strict=True):
        assert score.correct == (item.number == "plural"), item.text
        assert abs(score.correct_logprob - score.wrong_logprob) == pytest.approx(5.0, abs=1e-4)
    summary = summarize(items, scores)
    assert summary.accuracy == pytest.approx(sum(i.number == "plural" for i in items) / len(items))
    for depth in range(4):
        cell = [i for i in items if i.depth == depth]
        assert summary.by_depth[depth].n == len(cell)
        assert summary.by_depth[depth].accuracy == pytest.approx(
            sum(i.number == "plural" for i in cell) / len(cell)
        )
    attracted = [i for i in items if i.attractor]
    assert summary.by_attractor[True].accuracy == pytest.approx(
        sum(i.number == "plural" for i in attracted) / len(attracted)
    )


class FixedAttentionModel(BiasModel):
    """Head 0 attends uniformly to every earlier position; head 1 only to position 2."""

    has_attention = True

    def forward(self, idx, return_attention=False):
        B, T = idx.shape
        uniform = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
        onehot = torch.zeros(T, T)
        onehot[:, 2] = 1.0
        onehot[:2] = torch.eye(T)[:2]
        att = torch.stack([uniform, onehot])[None, None].expand(1, B, 2, T, T)
        return GPTOutput(self.bias.expand(B, T, -1), None, att)


def test_attention_to_subject_reads_the_verb_predicting_row(tokenizer, items):
    model = FixedAttentionModel(torch.zeros(tokenizer.vocab_size))
    scores = score_items(model, items, tokenizer.eot_id)
    for item, score in zip(items, scores, strict=True):
        n_keys = 1 + len(item.prefix_ids)  # eot + prefix: the row of the last prefix token
        assert score.attention_to_subject[0, 0] == pytest.approx(
            len(item.subject_positions) / n_keys
        )
        # key 2 is prefix token 1 (after the eot): "The cat ..." puts the subject there
        assert score.attention_to_subject[0, 1] == float(1 in item.subject_positions)
    summary = summarize(items, [ItemScore(-1.0, -2.0, s.attention_to_subject) for s in scores])
    assert summary.head_attention.shape == (1, 2)
    assert summary.best_head == divmod(int(summary.head_attention.argmax()), 2)
    assert summary.accuracy == 1.0


@torch.no_grad()
def _score_each_form_alone(model, item, eot_id):
    """The reference: one unbatched forward per verb form, nothing shared."""
    logprobs = {}
    for name, ids in (("verb", item.verb_ids), ("wrong", item.wrong_ids)):
        seq = torch.tensor([[eot_id, *item.prefix_ids, *ids]])
        out = model(seq, return_attention=True)
        logp = F.log_softmax(out.logits[0].float(), dim=-1)
        first = 1 + len(item.prefix_ids)
        logprobs[name] = sum(float(logp[first - 1 + i, t]) for i, t in enumerate(ids))
        if name == "verb":
            subject = torch.tensor(item.subject_positions) + 1
            attention = out.attention[:, 0, :, first - 1].index_select(-1, subject).sum(-1)
    return logprobs["verb"], logprobs["wrong"], attention


def test_batched_scores_equal_one_forward_per_form(tokenizer, word_tokenizer):
    """Batches sorted by length, the other form read off the verb's forward when it is one
    token: the same numbers, in the items' order, as a forward per form alone."""
    from attnlm.config import GPTConfig
    from attnlm.model import GPT

    for tok in (tokenizer, word_tokenizer):  # forms of several tokens, then of one
        items = hard_probe_set(tok, per_cell=1, seed=5, block_size=128, strict=False)
        items = items[::-1]  # longest first: the batches reorder them
        torch.manual_seed(0)
        model = GPT(
            GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=32)
        )
        model.eval()
        scores = score_items(model, items, tok.eot_id, batch_size=5)
        for item, score in zip(items, scores, strict=True):
            correct, wrong, attention = _score_each_form_alone(model, item, tok.eot_id)
            assert score.correct_logprob == pytest.approx(correct, abs=1e-4)
            assert score.wrong_logprob == pytest.approx(wrong, abs=1e-4)
            torch.testing.assert_close(score.attention_to_subject, attention, atol=1e-5, rtol=0)
    assert any(len(i.wrong_ids) > 1 for i in hard_probe_set(tokenizer, per_cell=1, seed=5))


def test_distance_buckets():
    assert [distance_bucket(d) for d in (1, 2, 5, 6, 15, 20, 21, 99)] == [
        "1", "2-5", "2-5", "6-10", "11-15", "16-20", "21+", "21+",
    ]  # fmt: skip
    with pytest.raises(ValueError):
        distance_bucket(0)


def test_analyze_finds_the_generator_labels(tokenizer):
    rng = random.Random(2)
    for _ in range(2000):
        s = generate_sentence(rng, 0, 4)
        item = analyze(tokenizer, s.text)
        label = make_item(tokenizer, s.text, s.subject_span, s.verb_span, s.verb, s.wrong_verb)
        assert (item.subject, item.verb, item.wrong_verb, item.number) == (
            s.subject, s.verb, s.wrong_verb, s.number,
        ), s.text  # fmt: skip
        assert item.subject_positions == label.subject_positions
        assert item.verb_position == label.verb_position


def test_analyze_free_sentences(tokenizer):
    seed = analyze(
        tokenizer, "The cat that was sitting on the mat which was next to the dog jumped."
    )
    assert (seed.subject, seed.verb, seed.wrong_verb) == ("cat", "jumped", None)
    wrong = analyze(tokenizer, "The keys near the cabinet is here.", subject="keys")
    assert (wrong.verb, wrong.wrong_verb, wrong.number) == ("is", "are", None)
    ungrammatical = analyze(tokenizer, "The cat near the dogs jump.")
    assert (ungrammatical.verb, ungrammatical.wrong_verb) == ("jumps", "jump")
    named = analyze(tokenizer, "The cat that the dog chases sleeps.", verb="sleeps")
    assert named.verb == "sleeps"
    with pytest.raises(ProbeError, match="no noun") as err:
        analyze(tokenizer, "Nothing here runs.")
    assert err.value.param == "subject"
    with pytest.raises(ProbeError, match="verb 'flies' does not occur") as err:
        analyze(tokenizer, "The cat sleeps.", verb="flies")
    assert err.value.param == "verb"
    with pytest.raises(ProbeError, match="no main verb"):
        analyze(tokenizer, "The cat on the mat.")


def test_summarize_rejects_nothing_to_judge(tokenizer):
    item = analyze(tokenizer, "The cat jumped.")
    with pytest.raises(ProbeError, match="nothing to judge"):
        summarize([item], [ItemScore(-1.0, None, None)])


def test_hard_probe_set_fills_every_cell_far_past_the_training_depth(tokenizer):
    """Distances up to 200 tokens in a 256-token context, 0-4 attractors, held out, reproducible."""
    items = hard_probe_set(tokenizer, per_cell=4, seed=7, block_size=256)
    assert items == hard_probe_set(tokenizer, per_cell=4, seed=7, block_size=256)
    cells = Counter(
        (distance_bucket(it.distance, HARD_DISTANCE_BUCKETS), it.attractors) for it in items
    )
    labels = {(f"{lo}-{hi}", k) for (lo, hi), k in hard_cells()}
    assert set(cells) == labels and set(cells.values()) == {4}
    assert max(it.distance for it in items) > 150 and max(it.depth for it in items) > 20
    assert all(1 + len(it.prefix_ids) + len(it.verb_ids) <= 256 for it in items)
    assert (("1-10", 4) not in labels) and (("11-25", 4) in labels)  # 4 modifiers need >= 12
    held = hard_probe_set(tokenizer, per_cell=4, seed=7, exclude=[items[0].text])
    assert items[0].text not in {it.text for it in held}


def test_summary_by_attractor_count_and_cell(tokenizer):
    items = hard_probe_set(tokenizer, per_cell=2, seed=3, attractor_counts=(0, 2))
    right = [ItemScore(-1.0, -2.0 if it.attractors == 0 else 0.0, None) for it in items]
    summary = summarize(items, right, HARD_DISTANCE_BUCKETS)
    assert summary.by_attractors[0].accuracy == 1.0 and summary.by_attractors[2].accuracy == 0.0
    assert set(summary.by_distance) == {f"{lo}-{hi}" for lo, hi in HARD_DISTANCE_BUCKETS}
    assert summary.by_distance_attractors[("151-200", 2)].n == 2
    assert summary.to_dict()["by_distance_attractors"]["151-200|0"]["accuracy"] == 1.0


def test_nearest_noun_heuristic_goes_by_the_last_noun_before_the_verb(tokenizer):
    texts = {
        "The cat jumps.": True,  # nothing in between: the subject is the nearest noun
        "The cat near the dogs jumps.": False,
        "The cats that were sitting on the mat which was near the dogs sleep.": True,
        "The cat that was sitting on the mats jumps.": False,
    }
    items = [analyze(tokenizer, text) for text in texts]
    scores = nearest_noun_scores(tokenizer, items)
    assert [s.correct for s in scores] == list(texts.values())
