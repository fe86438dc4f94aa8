"""serving.detok: text held back until final (incomplete characters, stop-string starts), stop
strings cut, offsets per token, logprob records and OpenAI's logprobs dicts."""

import math

import pytest
import torch

from attnlm.corpus import generate_corpus
from attnlm.tokenizer import Tokenizer
from serving.detok import (
    Row,
    join_logprobs,
    logprobs_dict,
    prompt_logprobs,
    stop_prefix_length,
    token_records,
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(generate_corpus(2000, seed=0), vocab_size=300)


def test_row_holds_back_incomplete_characters_and_stop_prefixes(tokenizer):
    tok = tokenizer
    text = "héllo wörld ünd mehr"
    ids = tok.encode(text)
    assert "\ufffd" in tok.token_strings(ids)  # characters split across tokens
    for stops, expected in [((), text), (("xyz", "d me"), text[: text.find("d me")])]:
        row = Row(tok, stops)
        pieces = []
        for token in ids:
            row.add(token)
            piece, _, _ = row.take()
            assert "\ufffd" not in piece and (not stops or "d m" not in piece)
            pieces.append(piece)
            if row.finish_reason:
                break
        row.finish_reason = row.finish_reason or "length"
        pieces.append(row.take()[0])
        assert "".join(pieces) == expected
    row = Row(tok)
    for token in tok.encode("héllo"):  # h, é's two bytes, l, lo
        row.add(token)
    assert row.offsets == [0, 1, 1, 2, 3]


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("The ca", ["cat"], 2),  # "ca" may still become "cat"
        ("The c", ["cat", "The c!"], 5),  # the longest proper start wins
        ("The cat", ["cat"], 0),  # a whole stop string is no prefix: it was cut already
        ("The", ["xyz"], 0),
        ("", ["ab"], 0),
    ],
)
def test_stop_prefix_length(text, stops, expected):
    assert stop_prefix_length(text, stops) == expected


def test_row_ends_on_end_id_and_cut_tokens_are_not_reported(tokenizer):
    ids = tokenizer.encode("The cat sits. The dog")
    row = Row(tokenizer, stops=["sits"], end_id=tokenizer.eot_id)
    for token in ids:
        row.add(token, ("record", token))
        if row.finish_reason:
            break
    assert (row.finish_reason, row.cut) == ("stop", True)
    text, records, offsets = row.take()
    assert text == "The cat "
    assert len(records) == len(offsets) and all(o < len(text) for o in offsets)
    ended = Row(tokenizer, end_id=tokenizer.eot_id)
    ended.add(ids[0])
    ended.add(tokenizer.eot_id)
    assert ended.finish_reason == "stop" and ended.generated == [ids[0], tokenizer.eot_id]
    assert ended.take()[0] == tokenizer.decode(ids[:1])  # end-of-text adds no text


def test_token_records_hold_the_chosen_token_and_the_top_k(tokenizer):
    torch.manual_seed(0)
    logits = torch.randn(3, tokenizer.vocab_size)  # (n, V)
    tokens = torch.tensor([5, int(logits[1].argmax()), 7])
    assert token_records(tokenizer, tokens, logits, None) == [None, None, None]
    records = token_records(tokenizer, tokens, logits, 2)
    logprobs = torch.log_softmax(logits, dim=-1)
    for b, (string, logprob, top) in enumerate(records):
        assert string == tokenizer.token_strings([int(tokens[b])])[0]
        assert math.isclose(logprob, float(logprobs[b, tokens[b]]), rel_tol=1e-6)
        assert top[string] == logprob and 2 <= len(top) <= 3  # the chosen one, if not in the top
    assert len(records[1][2]) == 2  # the argmax is in its own top 2


def test_prompt_logprobs_first_token_has_none_and_offsets_add_up(tokenizer):
    ids = tokenizer.encode("The cats near the dog")
    torch.manual_seed(1)
    logits = torch.randn(len(ids), tokenizer.vocab_size)  # (T, V)
    lp = prompt_logprobs(tokenizer, ids, logits, 1)
    strings = tokenizer.token_strings(ids)
    assert lp["tokens"] == strings
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    logprobs = torch.log_softmax(logits, dim=-1)
    for i in range(1, len(ids)):
        assert math.isclose(lp["token_logprobs"][i], float(logprobs[i - 1, ids[i]]), rel_tol=1e-5)
    assert lp["text_offset"] == [sum(map(len, strings[:i])) for i in range(len(strings))]


def test_logprobs_dict_shifts_offsets_and_join_appends():
    records = [("a", -0.1, {"a": -0.1}), ("b", -0.2, {"b": -0.2})]
    second = logprobs_dict(records, [0, 1], base=3)
    assert second == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.1, -0.2],
        "top_logprobs": [{"a": -0.1}, {"b": -0.2}],
        "text_offset": [3, 4],
    }
    assert join_logprobs(None, second) is second
    first = logprobs_dict(records[:1], [0], base=0)
    joined = join_logprobs(first, second)
    assert joined["tokens"] == ["a", "a", "b"] and joined["text_offset"] == [0, 3, 4]
