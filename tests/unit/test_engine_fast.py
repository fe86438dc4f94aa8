"""serving.engine on the compiled decode step (`Engine(compile=True)`, a tiny artifact compiled once
for the module, ~10-40 s): completions greedy and seeded, with stop strings, n, logprobs and echo,
streams, concurrent requests and attention rows are what the eager engine gives."""

from pathlib import Path

import numpy as np
import pytest
import torch

from attnlm.artifact import save_artifact
from attnlm.config import GPTConfig
from attnlm.corpus import generate_corpus
from attnlm.model import GPT
from attnlm.tokenizer import Tokenizer
from serving.engine import AttentionOptions, CompletionParams, Engine
from tests.unit.together import complete_together

CASES = [
    ("The cats near the dog", CompletionParams(max_tokens=20, temperature=0)),
    ("A dog", CompletionParams(max_tokens=20, temperature=0.9, seed=7, n=3)),
    ("The", CompletionParams(max_tokens=15, temperature=1.0, top_k=40, seed=3, stop=["e"])),
    ("The cat", CompletionParams(max_tokens=10, temperature=0, logprobs=3, echo=True)),
    ("The cat that was sitting on the mat", CompletionParams(max_tokens=64, top_p=0.9, seed=1)),
    (  # the sampling controls: applied to the compiled step's logits as to the eager ones
        "A dog",
        CompletionParams(
            max_tokens=12,
            temperature=0.8,
            seed=5,
            n=2,
            frequency_penalty=1.0,
            presence_penalty=0.5,
            repetition_penalty=1.3,
            logit_bias={5: 3.0},
            min_tokens=3,
            logprobs=1,
        ),
    ),
]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    tokenizer = Tokenizer.train(generate_corpus(2000, seed=0), vocab_size=300)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size + 5, block_size=64, n_layer=2, n_head=2, n_embd=32
    )
    torch.manual_seed(0)
    return save_artifact(GPT(config), tokenizer, tmp_path_factory.mktemp("artifacts") / "tiny")


@pytest.fixture(scope="module")
def engines(artifact) -> tuple[Engine, Engine]:
    return Engine(artifact, device="cpu"), Engine(artifact, device="cpu", compile=True)


def assert_same_completion(got, want) -> None:
    assert [c.text for c in got.choices] == [c.text for c in want.choices]
    assert [c.finish_reason for c in got.choices] == [c.finish_reason for c in want.choices]
    assert got.completion_tokens == want.completion_tokens
    for g, w in zip(got.choices, want.choices, strict=True):
        if w.logprobs is None:
            assert g.logprobs is None
            continue
        assert g.logprobs["tokens"] == w.logprobs["tokens"]
        assert g.logprobs["text_offset"] == w.logprobs["text_offset"]
        got_lp = [np.nan if x is None else x for x in g.logprobs["token_logprobs"]]
        want_lp = [np.nan if x is None else x for x in w.logprobs["token_logprobs"]]
        np.testing.assert_allclose(got_lp, want_lp, atol=1e-4)


def test_the_engine_decodes_on_the_compiled_step(engines):
    eager, fast = engines
    assert fast._batcher._batch.decoder.mode == "inductor"
    assert eager._batcher._batch.decoder.mode == "eager"


def test_dtype_auto_follows_the_model_size(artifact, monkeypatch):
    """`dtype="auto"`: bfloat16 on a bf16 CPU only from CPU_BF16_MIN_BYTES of fp32 weights."""
    import attnlm.fastdecode as fastdecode

    path = artifact
    monkeypatch.setattr(fastdecode, "cpu_flags", lambda: {"avx512_bf16"})
    assert Engine(path, device="cpu", dtype="auto").dtype == torch.float32  # tiny: fp32
    monkeypatch.setattr(fastdecode, "CPU_BF16_MIN_BYTES", 1000)
    engine = Engine(path, device="cpu", dtype="auto")
    assert engine.dtype == torch.bfloat16 and engine.model.lm_head.weight.dtype == torch.bfloat16
    monkeypatch.setattr(fastdecode, "cpu_flags", lambda: {"avx2"})
    assert Engine(path, device="cpu", dtype="auto").dtype == torch.float32


def test_compiled_completions_equal_eager_ones(engines):
    eager, fast = engines
    for prompt, params in CASES:
        assert_same_completion(fast.complete(prompt, params), eager.complete(prompt, params))


def test_compiled_streams_equal_their_completions(engines):
    _, fast = engines
    for prompt, params in CASES:
        texts = [""] * params.n
        reasons = [None] * params.n
        for delta in fast.stream(prompt, params):
            texts[delta.index] += delta.text
            reasons[delta.index] = delta.finish_reason or reasons[delta.index]
        want = fast.complete(prompt, params)
        assert texts == [c.text for c in want.choices]
        assert reasons == [c.finish_reason for c in want.choices]


def test_concurrent_compiled_completions_equal_each_alone(engines):
    eager, fast = engines
    alone = [eager.complete(prompt, params) for prompt, params in CASES]
    results = complete_together(fast, CASES, timeout=120)
    for got, want in zip(results, alone, strict=True):
        assert_same_completion(got, want)


def test_attention_rows_beside_the_compiled_step(engines):
    """Completions with attention maps decode alone, eager (every layer through SDPA, their q
    and k kept); the compiled engine gives the same maps and text as the eager one."""
    eager, fast = engines
    params = CompletionParams(max_tokens=6, temperature=0, n=2, attention=AttentionOptions())
    got, want = fast.complete("The cat", params), eager.complete("The cat", params)
    assert_same_completion(got, want)
    for g, w in zip(got.choices, want.choices, strict=True):
        assert g.tokens == w.tokens
        np.testing.assert_allclose(
            g.attention["attention"]["data"], w.attention["attention"]["data"]
        )
