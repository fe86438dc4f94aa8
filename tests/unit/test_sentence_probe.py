"""serving.sentence_probe on a tiny untrained model: what /v1/probe reports, and the request
errors it names (a bad word, a sentence past the context, no subject)."""

import pytest
import torch

from attnlm.config import GPTConfig
from attnlm.corpus import generate_corpus
from attnlm.networks import build_model
from attnlm.tokenizer import Tokenizer
from serving.params import EngineError
from serving.sentence_probe import probe_sentence

TEXT = "The cat that was sitting on the mat which was next to the dogs jump."


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(generate_corpus(2000, seed=0), vocab_size=300)


def model(tokenizer: Tokenizer, arch: str = "transformer"):
    torch.manual_seed(0)
    heads = 2 if arch == "transformer" else 1
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        block_size=64,
        n_layer=2,
        n_head=heads,
        n_embd=32,
        arch=arch,
    )
    return build_model(config).eval()


def test_reports_subject_verb_verdict_and_heads(tokenizer):
    ids = tokenizer.encode(TEXT)
    result = probe_sentence(model(tokenizer), tokenizer, 64, TEXT, ids)
    assert result.token_ids == ids and result.tokens == tokenizer.token_strings(ids)
    assert result.subject["text"] == "cat" and result.number == "singular"
    assert (result.verb["as_written"], result.verb["correct"]) == ("jump", "jumps")
    agreement = result.agreement
    better = agreement["correct_logprob"] > agreement["wrong_logprob"]
    assert agreement["verdict"] == ("correct" if better else "wrong")
    heads = result.attention_to_subject  # [layer][head], rounded
    assert len(heads) == 2 and all(len(row) == 2 for row in heads)
    best = result.best_head
    assert heads[best["layer"]][best["head"]] == best["weight"] == max(map(max, heads))


def test_lstm_has_no_heads(tokenizer):
    ids = tokenizer.encode(TEXT)
    result = probe_sentence(model(tokenizer, "lstm"), tokenizer, 64, TEXT, ids)
    assert result.attention_to_subject is None and result.best_head is None
    assert result.agreement["verdict"] in ("correct", "wrong")


@pytest.mark.parametrize(
    "text, kwargs, max_context, param, code",
    [
        (TEXT, {"subject": " "}, 64, "subject", "invalid_value"),
        (TEXT, {"verb": "flies"}, 64, "verb", "probe_failed"),
        ("Nothing here runs.", {}, 64, "subject", "probe_failed"),
        (TEXT, {}, 12, "text", "context_length_exceeded"),
    ],
)
def test_errors_name_their_param(tokenizer, text, kwargs, max_context, param, code):
    ids = tokenizer.encode(text)
    with pytest.raises(EngineError) as info:
        probe_sentence(model(tokenizer), tokenizer, max_context, text, ids, **kwargs)
    assert (info.value.param, info.value.code, info.value.status) == (param, code, 400)


@pytest.mark.parametrize(
    "config",
    [{}, {"attention": "additive"}, {"arch": "lstm", "n_head": 1}],
    ids=["dot-product", "additive", "lstm"],
)
def test_probe_endpoint_on_a_256_token_model_and_a_hard_set_sentence(tmp_path, config):
    """/v1/probe's engine path on an exported 256-token model (the probe study's context) and
    sentences of the hard set's farthest bucket (150-200 tokens from subject to verb): it finds
    the generator's subject and verb, and scores them as the study's batched probe does."""
    from attnlm.probe import hard_probe_set, score_items
    from serving.engine import Engine
    from tests.integration.helpers import build_tiny_artifact

    folder = build_tiny_artifact(tmp_path / "m", block_size=256, **config)
    engine = Engine(folder, device="cpu")
    items = hard_probe_set(
        engine.tokenizer, per_cell=1, buckets=((151, 200),), attractor_counts=(0, 3), strict=False
    )
    assert items and all(it.distance > 150 for it in items)
    scores = score_items(engine.model, items, engine.tokenizer.eot_id)
    for item, score in zip(items, scores, strict=True):
        result = engine.probe(item.text)
        assert result.subject["token_positions"] == item.subject_positions
        assert (
            result.verb["token_position"] == item.verb_position and result.distance == item.distance
        )
        assert (result.verb["correct"], result.verb["wrong"]) == (item.verb, item.wrong_verb)
        got = result.agreement
        assert got["correct_logprob"] == pytest.approx(score.correct_logprob, abs=1e-3)
        assert got["wrong_logprob"] == pytest.approx(score.wrong_logprob, abs=1e-3)
        if "n_head" in config:
            assert result.attention_to_subject is None
        else:
            assert len(result.attention_to_subject) == 2 and result.best_head is not None
