"""serving.engine's sampling controls and evaluation helpers on a tiny untrained artifact:
penalties and logit_bias against a stepwise reference, best_of against its
candidates, max_tokens 0 scoring, a mixed concurrent batch, tokenize/detokenize, chat."""

import json
import math

import pytest
import torch

from serving.engine import CompletionParams, Engine, EngineError
from tests.integration.helpers import build_tiny_artifact
from tests.unit.together import complete_together


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    return Engine(build_tiny_artifact(tmp_path_factory.mktemp("artifacts") / "tiny"), device="cpu")


PENALIZED = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.2}


def reference_greedy(engine: Engine, prompt_ids: list[int], params: CompletionParams) -> list[int]:
    """Greedy tokens from full forwards, the controls applied by their definitions."""
    ids, out = list(prompt_ids), []
    for _ in range(params.max_tokens):
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids])).logits[0, -1].float().clone()
        for token, bias in params.logit_bias.items():
            logits[token] += bias
        for token in set(ids):
            r = params.repetition_penalty
            logits[token] = logits[token] / r if logits[token] > 0 else logits[token] * r
        for token in set(out):
            logits[token] -= params.frequency_penalty * out.count(token) + params.presence_penalty
        token = int(logits.argmax())
        out.append(token)
        if token == engine.tokenizer.eot_id:
            break
        ids.append(token)
    return out


@pytest.mark.parametrize(
    "controls",
    [PENALIZED, {"logit_bias": {7: 4.0, 11: -100.0}}, {"frequency_penalty": 2.0}],
)
def test_greedy_controls_equal_the_stepwise_reference(engine, controls):
    prompt = engine.encode("The cats near the dog")
    params = CompletionParams(max_tokens=12, temperature=0, logprobs=0, **controls)
    got = engine.complete(prompt, params)
    want = reference_greedy(engine, prompt, params)
    row = engine.tokenizer.decode([t for t in want if t != engine.tokenizer.eot_id])
    assert got.choices[0].text == row
    plain = engine.complete(prompt, CompletionParams(max_tokens=12, temperature=0))
    assert got.choices[0].text != plain.choices[0].text  # the controls changed something


def test_best_of_returns_the_candidates_of_best_mean_logprob(engine):
    no_end = {engine.tokenizer.eot_id: -100.0}  # every candidate runs max_tokens: all reported
    common = dict(max_tokens=6, temperature=1.0, seed=11, logprobs=0, logit_bias=no_end)
    candidates = engine.complete("A dog", CompletionParams(n=5, **common)).choices
    means = {c.text: sum(c.logprobs["token_logprobs"]) / 6 for c in candidates}
    best = engine.complete("A dog", CompletionParams(n=2, best_of=5, **common))
    assert [c.text for c in best.choices] == sorted(means, key=means.get, reverse=True)[:2]
    assert best.completion_tokens == 5 * 6  # every candidate's tokens count


def test_max_tokens_zero_scores_the_prompt(engine):
    prompt = "The cats near the dog sleep."
    ids = engine.encode(prompt)
    result = engine.complete(prompt, CompletionParams(max_tokens=0, echo=True, logprobs=1))
    (choice,) = result.choices
    assert choice.text == prompt and choice.finish_reason == "length"
    assert result.completion_tokens == 0
    scores = choice.logprobs["token_logprobs"]
    assert scores[0] is None and len(scores) == len(ids)
    compared = 0
    for i in range(1, len(ids)):  # each token's logprob after the text before it
        (nt,) = engine.next_token(
            [engine.tokenizer.decode(ids[:i])], top_k=engine.tokenizer.vocab_size
        )
        if nt.token_ids != ids[:i]:  # the prefix's text tokenizes otherwise: not comparable
            continue
        want = next(t["logprob"] for t in nt.top if t["token_id"] == ids[i])
        assert math.isclose(scores[i], want, abs_tol=1e-4)
        compared += 1
    assert compared >= len(ids) // 2


def test_mixed_concurrent_batch_leaves_the_plain_requests_alone(engine):
    requests = [
        ("The cats near the dog", CompletionParams(max_tokens=12, temperature=0)),
        ("A dog", CompletionParams(max_tokens=12, temperature=0.9, seed=3, n=2, **PENALIZED)),
        ("The cat that was sitting", CompletionParams(max_tokens=10, temperature=1.0, seed=5)),
        ("The", CompletionParams(max_tokens=10, temperature=0, logit_bias={5: 5.0}, min_tokens=4)),
        ("The dogs", CompletionParams(max_tokens=9, temperature=0.7, seed=8, n=3)),
    ]
    alone = [engine.complete(p, params) for p, params in requests]
    results = complete_together(engine, requests)
    for got, want in zip(results, alone, strict=True):
        assert [c.text for c in got.choices] == [c.text for c in want.choices]


@pytest.mark.parametrize(
    "params, code, param",
    [
        (dict(max_tokens=0), "conflicting_parameters", "max_tokens"),
        (dict(n=3, best_of=2), "conflicting_parameters", "best_of"),
        (dict(max_tokens=3, min_tokens=4), "conflicting_parameters", "min_tokens"),
        (dict(frequency_penalty=2.5), "invalid_value", "frequency_penalty"),
        (dict(logit_bias={1: 101}), "invalid_value", "logit_bias"),
        (dict(repetition_penalty=0.0), "invalid_value", "repetition_penalty"),
    ],
)
def test_bad_controls_are_engine_errors(params, code, param):
    with pytest.raises(EngineError) as err:
        CompletionParams(**params)
    assert (err.value.code, err.value.param) == (code, param)


def test_vocabulary_and_stream_checks(engine):
    with pytest.raises(EngineError, match="not in the vocabulary") as err:
        engine.complete("A", CompletionParams(logit_bias={engine.tokenizer.vocab_size: 1.0}))
    assert err.value.param == "logit_bias"
    with pytest.raises(EngineError, match="streamed") as err:
        engine.stream("A", CompletionParams(best_of=2))
    assert err.value.code == "conflicting_parameters"


def test_tokenize_detokenize_round_trip(engine):
    text = "The cats near the dog sleep. <|endoftext|>"
    ids = engine.tokenize(text)
    assert ids[-1] == engine.tokenizer.eot_id and engine.detokenize(ids) == text
    assert engine.tokenize("x" * 10 * engine.max_context)  # no context check
    with pytest.raises(EngineError) as err:
        engine.detokenize([engine.tokenizer.vocab_size])
    assert err.value.param == "tokens"


TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_chat_prompt_through_the_folder_s_template(engine, tmp_path):
    with pytest.raises(EngineError) as err:
        engine.chat_prompt([{"role": "user", "content": "Hi"}])
    assert (err.value.status, err.value.code) == (404, "chat_template_missing")
    folder = tmp_path / "chat"
    folder.mkdir()
    for f in engine.artifact_path.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    chat = Engine(folder, device="cpu")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "A"}, {"type": "text", "text": "B"}]},
    ]
    assert chat.chat_prompt(messages) == "system: Be brief.\nuser: A\nB\nassistant:"
