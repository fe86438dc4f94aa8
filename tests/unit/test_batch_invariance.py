"""Batch invariance (`attnlm.invariance`, `Engine(batch_invariant=True)`): a text's numbers are
the same bits alone and among others, in fp32 and bf16. The model's forward with keys past 200
and the decode step with 16- and 32-wide heads; the engine's next-token, attention maps (every
aggregation, JSON at full precision and base64), and seeded sampled completions (n, logprobs,
echo, streamed, best_of and penalties, max_tokens 0 scoring) alone vs among 31 others in flight.
With the mode off the fp32 checks and the bf16 text forwards fail on the AVX-512 CPU this was
written on (bf16 decode steps and base64 float16 maps happened to agree there anyway)."""

import threading

import numpy as np
import pytest
import torch

from attnlm import invariance
from attnlm.artifact import save_artifact
from attnlm.batching import DecodeBatch
from attnlm.config import GPTConfig
from attnlm.corpus import generate_corpus
from attnlm.model import GPT
from attnlm.networks import build_model
from attnlm.tokenizer import Tokenizer
from serving.engine import AttentionOptions, CompletionParams, Engine
from serving.limits import AGGREGATIONS, MAX_DECIMALS
from tests.unit.test_attention_maps import decoded

DTYPES = ["float32", "bfloat16"]
SENTENCES = generate_corpus(64, seed=5)
TEXTS = [" ".join(SENTENCES[i : i + 3])[: 6 + 6 * i] for i in range(16)]  # 3-60 tokens
OTHERS = [" ".join(SENTENCES[20 + i : 23 + i])[: 90 - 5 * i] for i in range(16)]


def tiny_gpt(dtype: torch.dtype, head_size: int, block_size: int = 64) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=300, block_size=block_size, n_layer=2, n_head=2, n_embd=2 * head_size
    )
    model = GPT(config).eval().to(dtype)
    model.set_batch_invariant(True)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_forward_is_the_same_padded_and_batched_with_keys_past_200(dtype):
    model = tiny_gpt(dtype, head_size=16, block_size=256)
    torch.manual_seed(1)
    texts = [torch.randint(1, 300, (n,)) for n in (5, 37, 230)]
    others = [torch.randint(1, 300, (n,)) for n in (3, 120, 250, 9)]
    for ids in texts:
        alone = invariance._text_logits(model, [ids], invariance.padded_length(len(ids), 256))
        among = invariance._text_logits(model, [*others, ids], 256)[-1:]
        assert torch.equal(alone, among), len(ids)


@pytest.mark.parametrize("head_size", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_is_the_same_alone_and_among_other_requests(dtype, head_size):
    model = tiny_gpt(dtype, head_size)
    batch = DecodeBatch(model, slots=32)
    torch.manual_seed(2)
    prompt = torch.randint(1, 300, (9,))
    crowd = [torch.randint(1, 300, (n,)) for n in (1, 4, 17, 30, 2, 11)]
    alone = invariance._decoded(batch, [prompt], steps=20)
    among = invariance._decoded(batch, [*crowd, prompt], steps=20)
    assert len(alone) == len(among) == 20
    for step, (a, b) in enumerate(zip(alone, among, strict=True)):
        assert torch.equal(a, b), step
    assert not batch.requests and batch.free_slots == 32  # the check leaves the batch empty


def test_the_start_up_check_passes_and_names_a_model_not_in_the_mode():
    model = tiny_gpt(torch.float32, head_size=16)
    assert invariance.check(model, DecodeBatch(model, slots=32)) is None
    model.set_batch_invariant(False)
    assert "not in batch-invariant mode" in invariance.check(model)


def test_decode_shapes_have_16_rows_and_keys_in_sixteens_within_the_decoder():
    assert invariance.decode_shape(1, 1, slots=32, positions=64) == (16, 16)
    assert invariance.decode_shape(17, 33, slots=32, positions=64) == (17, 48)
    assert invariance.decode_shape(3, 60, slots=8, positions=50) == (8, 50)
    assert invariance.padded_length(3, 64) == 16
    assert invariance.padded_length(40, 64) == 48
    assert invariance.padded_length(16, 64) == 16
    assert invariance.padded_length(3, 8) == 8


# -- the engine ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    tokenizer = Tokenizer.train(generate_corpus(2000, seed=0), vocab_size=300)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32
    )  # 16-wide heads
    torch.manual_seed(0)
    return save_artifact(GPT(config), tokenizer, tmp_path_factory.mktemp("artifacts") / "tiny")


@pytest.fixture(scope="module", params=DTYPES)
def engine(request, artifact) -> Engine:
    return Engine(artifact, device="cpu", dtype=request.param, batch_invariant=True)


def test_the_engine_checked_the_mode_at_start_up(engine):
    assert engine.model.batch_invariant
    assert engine.invariance_problem is None
    engine.configure_attention(1 << 20, engine.max_attention_bytes)  # a hit's q, k are float16
    assert not engine._qk_cache.enabled


def test_next_token_is_the_same_alone_and_among_others(engine):
    alone = [engine.next_token([text], top_k=20)[0].top for text in TEXTS]
    mixed = [t for pair in zip(OTHERS, TEXTS, strict=True) for t in pair]
    among = engine.next_token(mixed, top_k=20)[1::2]
    for a, b in zip(alone, (result.top for result in among), strict=True):
        assert a == b  # token ids, probabilities and logprobs: the same floats


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("encoding", ["json", "base64"])
def test_attention_maps_are_the_same_alone_and_among_others(engine, aggregation, encoding):
    options = AttentionOptions(aggregation=aggregation, encoding=encoding, decimals=MAX_DECIMALS)
    alone = [engine.attention([text], options)[0].attention for text in TEXTS]
    mixed = [t for pair in zip(TEXTS, OTHERS, strict=True) for t in pair]
    among = [m.attention for m in engine.attention(mixed, options)[::2]]
    for a, b in zip(alone, among, strict=True):
        if encoding == "base64":
            assert a["data"] == b["data"]
        else:
            assert np.array_equal(decoded(a), decoded(b))


def test_one_torch_thread_gives_the_bits_of_two(engine):
    """A Ray replica runs one thread (num_cpus 1), a process elsewhere more: replicas agree."""
    params = CompletionParams(max_tokens=16, temperature=0.9, seed=5, logprobs=2)
    answers = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            top = [r.top for r in engine.next_token(TEXTS, top_k=5)]
            full = AttentionOptions(decimals=MAX_DECIMALS)
            maps = [m.attention["data"].tolist() for m in engine.attention(TEXTS[:4], full)]
            answers.append((top, maps, completion_record(engine.complete(TEXTS[3], params))))
    finally:
        torch.set_num_threads(threads)
    assert answers[0] == answers[1]


def completion_record(completion) -> list:
    return [(c.text, c.finish_reason, c.logprobs) for c in completion.choices]


def test_seeded_completions_are_the_same_alone_and_among_31_others(engine):
    assert_completions_alone_equal_crowded(engine)


@pytest.mark.slow
def test_the_compiled_decode_step_is_batch_invariant_too(artifact):
    """configs/serve.yaml compiles the decode step: inductor's graph, fp32 (~20-50 s; the
    engine's start-up check covers it in every replica)."""
    engine = Engine(artifact, device="cpu", compile=True, batch_invariant=True)
    assert engine._batcher._batch.decoder.mode == "inductor"
    assert engine.invariance_problem is None
    assert_completions_alone_equal_crowded(engine)


def assert_completions_alone_equal_crowded(engine: Engine) -> None:
    cases = [
        ("The cats near the dog", CompletionParams(max_tokens=24, temperature=0.9, seed=7, n=2)),
        ("A dog", CompletionParams(max_tokens=20, temperature=0.9, seed=3, logprobs=3)),
        (
            "The cat",
            CompletionParams(max_tokens=12, temperature=1.0, seed=1, logprobs=2, echo=True),
        ),
        (
            "The dog",
            CompletionParams(
                max_tokens=10,
                temperature=0.8,
                seed=9,
                best_of=3,
                frequency_penalty=0.5,
                repetition_penalty=1.2,
                logit_bias={5: 2.0},
                min_tokens=4,
                logprobs=1,
            ),
        ),
        ("The keys", CompletionParams(max_tokens=0, echo=True, logprobs=3)),  # scoring
    ]
    alone = [completion_record(engine.complete(prompt, params)) for prompt, params in cases]
    streamed = [(p, params) for p, params in cases if params.best_of is None]  # not streamable
    streamed_alone = [
        [(d.index, d.text, d.logprobs) for d in engine.stream(p, params)] for p, params in streamed
    ]
    results: dict[int, list] = {}
    start = threading.Barrier(31 + len(streamed))

    def run(i: int, prompt: str, params: CompletionParams, stream: bool = False) -> None:
        start.wait()
        if stream:
            results[i] = [(d.index, d.text, d.logprobs) for d in engine.stream(prompt, params)]
        else:
            results[i] = completion_record(engine.complete(prompt, params))

    threads = [
        threading.Thread(
            target=run,
            args=(100 + i, OTHERS[i % 16][: 10 + i], CompletionParams(max_tokens=40, seed=i)),
        )
        for i in range(31 - len(cases))
    ]
    threads += [
        threading.Thread(target=run, args=(i, p, params)) for i, (p, params) in enumerate(cases)
    ]
    threads += [
        threading.Thread(target=run, args=(50 + i, p, params, True))
        for i, (p, params) in enumerate(streamed)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[i] for i in range(len(cases))] == alone
    assert [results[50 + i] for i in range(len(streamed))] == streamed_alone


def test_an_lstm_artifact_is_refused_one_line(tmp_path):
    tokenizer = Tokenizer.train(generate_corpus(300, seed=0), vocab_size=260)
    config = GPTConfig(arch="lstm", vocab_size=tokenizer.vocab_size, block_size=32, n_embd=16)
    path = save_artifact(build_model(config), tokenizer, tmp_path / "lstm")
    with pytest.raises(ValueError, match="batch_invariant needs a Transformer"):
        Engine(path, device="cpu", batch_invariant=True)
