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
