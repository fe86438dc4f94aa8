"""serving.attention_maps: rollout by hand, selection shapes, both encodings, the options a model
cannot answer."""

import base64

import numpy as np
import pytest
import torch

from attnlm.config import GPTConfig
from attnlm.corpus import generate_corpus
from attnlm.tokenizer import Tokenizer
from serving.attention_maps import (
    attention_map,
    check_attention_options,
    encode_array,
    rollout,
    select_attention,
)
from serving.params import AttentionOptions, EngineError


def decoded(attention: dict) -> np.ndarray:
    """The values of an `encode_array` dict, as float64."""
    if attention["encoding"] == "json":
        return np.array(attention["data"], dtype=np.float64)
    raw = base64.b64decode(attention["data"])
    return np.frombuffer(raw, dtype="<f2").reshape(attention["shape"]).astype(np.float64)


def causal_maps(L: int, H: int, T: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    att = torch.rand(L, H, T, T).tril()
    return att / att.sum(-1, keepdim=True)  # (L, H, T, T) causal, row-stochastic


CONFIG = GPTConfig(vocab_size=300, block_size=16, n_layer=3, n_head=2, n_embd=16)


def test_rollout_rows_sum_to_one_and_match_hand_computation():
    torch.manual_seed(0)
    att = torch.rand(2, 3, 5, 5).tril()
    att = att / att.sum(-1, keepdim=True)  # (L, H, T, T) causal, row-stochastic
    result = rollout(att)
    assert result.shape == (2, 5, 5)
    torch.testing.assert_close(result.sum(-1), torch.ones(2, 5))
    eye = torch.eye(5)
    first = 0.5 * att[0].mean(0) + 0.5 * eye  # rows already sum to 1
    torch.testing.assert_close(rollout(att[:1])[0], first)
    second = 0.5 * att[1].mean(0) + 0.5 * eye
    torch.testing.assert_close(result[1], second @ first)


def test_encode_array_json_and_base64():
    t = torch.tensor([[0.123456, 1.0], [0.5, -2.25]])
    as_json = encode_array(t, "json", 2)
    data = as_json.pop("data")
    assert as_json == {"encoding": "json", "shape": [2, 2], "dtype": "float32"}
    # a contiguous array the server writes as nested lists of the rounded values
    assert isinstance(data, np.ndarray) and data.flags.c_contiguous
    assert data.tolist() == [[0.12, 1.0], [0.5, -2.25]]
    from serving.http import dumps

    assert dumps(data) == b"[[0.12,1.0],[0.5,-2.25]]"
    as_b64 = encode_array(t, "base64", 4)
    assert as_b64["dtype"] == "float16" and as_b64["shape"] == [2, 2]
    np.testing.assert_array_equal(decoded(as_b64), t.half().double().numpy())


def test_encode_array_rejects_unknown_encoding():
    with pytest.raises(EngineError) as info:
        encode_array(torch.zeros(2, 2), "xml")
    assert (info.value.param, info.value.code) == ("encoding", "invalid_value")


def test_select_attention_shapes_and_values():
    att = causal_maps(3, 2, 5)
    picked = select_attention(att, [2, 0], [1], "none")
    assert picked.shape == (2, 1, 5, 5)
    torch.testing.assert_close(picked, att[[2, 0]][:, [1]])
    mean = select_attention(att, [1], [0, 1], "mean")
    torch.testing.assert_close(mean, att[[1]].mean(dim=1))
    # rollout mixes the selected heads through every layer up to the selected one
    rolled = select_attention(att, [1], [0], "rollout")
    torch.testing.assert_close(rolled, rollout(att[:2, [0]])[[1]])
    with pytest.raises(EngineError) as info:
        select_attention(att, [0], [0], "max")
    assert info.value.param == "aggregation"


def test_check_attention_options_names_the_bad_index_and_the_model_without_attention():
    check_attention_options(CONFIG, AttentionOptions(layers=[0, 2], heads=[1]), "tiny")
    for options, param in (
        (AttentionOptions(layers=[3]), "layers"),
        (AttentionOptions(heads=[2]), "heads"),
    ):
        with pytest.raises(EngineError, match=r"indices 0\.\.") as info:
            check_attention_options(CONFIG, options, "tiny")
        assert (info.value.param, info.value.code) == (param, "out_of_range")
    with pytest.raises(EngineError) as info:
        check_attention_options(CONFIG, {"layers": [0]}, "tiny")
    assert info.value.param == "attention"
    lstm = GPTConfig(vocab_size=300, block_size=16, n_layer=1, n_head=1, n_embd=16, arch="lstm")
    with pytest.raises(EngineError, match="LSTM") as info:
        check_attention_options(lstm, AttentionOptions(), "tiny-lstm")
    assert (info.value.param, info.value.code) == ("return_attention", "attention_unavailable")


def test_attention_map_reports_selection_and_tokens():
    tokenizer = Tokenizer.train(generate_corpus(500, seed=0), vocab_size=300)
    ids = tokenizer.encode("The cat sits.")
    att = causal_maps(3, 2, len(ids))
    result = attention_map(tokenizer, CONFIG, ids, AttentionOptions(heads=[1], decimals=8), att=att)
    assert result.tokens == tokenizer.token_strings(ids) and result.token_ids == ids
    assert (result.n_layers, result.n_heads) == (3, 2)
    assert result.layers == [0, 1, 2] and result.heads == [1] and result.aggregation == "none"
    assert result.attention["shape"] == [3, 1, len(ids), len(ids)]
    np.testing.assert_allclose(decoded(result.attention), att[:, [1]].double().numpy(), atol=1e-8)
