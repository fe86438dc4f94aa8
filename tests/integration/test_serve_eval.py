"""The evaluation-ready API over real HTTP (Ray Serve on 127.0.0.1): the openai client with each
new parameter, penalties and logit_bias against a reference from POST /v1/next-token, best_of,
max_tokens 0 scoring, a mixed concurrent batch, /tokenizer_info, /tokenize, /detokenize,
/v1/models/{id}, chat completions through the folder's chat template; and lm-evaluation-harness
(`local-completions` with only base_url and model) against its `hf` model on the same folder.
"""

from __future__ import annotations

import asyncio
import json
import math
import random

import httpx
import pytest

from tests.integration.helpers import CHAT_TEMPLATE as TEMPLATE
from tests.integration.helpers import (
    build_tiny_artifact,
    local_serve,
    wait_healthy,
    with_chat_template,
)
from tests.integration.test_serve import assert_error

ray = pytest.importorskip("ray")
openai = pytest.importorskip("openai")
from ray import serve  # noqa: E402

ITEMS = 12  # lm-eval's multiple-choice items


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """The tiny untrained folder, with a chat template in its tokenizer config."""
    return with_chat_template(build_tiny_artifact(tmp_path_factory.mktemp("eval") / "tiny"))


@pytest.fixture(scope="module")
def server(artifact):
    from serving.app import AttnLMServer

    with local_serve() as base:
        serve.run(AttnLMServer.bind(str(artifact)), name="eval", route_prefix="/", blocking=False)
        with httpx.Client(base_url=base, timeout=60) as client:
            wait_healthy(client, "/health")
            yield client


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused")


def test_tokenizer_routes_and_model_object(server, client):
    info = server.get("/tokenizer_info").json()
    assert info["eos_token"] == info["bos_token"] == "<|endoftext|>"
    assert info["chat_template"] == TEMPLATE and "pad_token" in info
    text = "The cats near the dog sleep."
    tokens = server.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"])
    assert tokens["max_model_len"] == 64
    nt = server.post("/v1/next-token", json={"text": text}).json()
    assert tokens["tokens"] == nt["token_ids"] and tokens["token_strs"] == nt["tokens"]
    back = server.post("/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert back == {"prompt": text}
    eos = server.post("/tokenize", json={"prompt": "<|endoftext|>"}).json()["tokens"]
    assert eos == [0]  # lm-eval's remote tokenizer takes the eos id from here
    assert_error(server.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def next_token_logits(server, text: str) -> dict[int, float]:
    """Every token's logprob after `text`, from POST /v1/next-token (top_k = the vocabulary)."""
    top = server.post("/v1/next-token", json={"text": text, "top_k": 300}).json()["top"]
    return {t["token_id"]: t["logprob"] for t in top}


def test_penalties_and_logit_bias_follow_the_next_token_reference(server, client):
    """Greedy tokens with the controls equal the argmax of next-token's logprobs adjusted by
    the definitions (logprobs differ from logits by a constant per step: same argmax)."""
    prompt = "The cats near the dog"
    controls = {"frequency_penalty": 1.2, "presence_penalty": 0.6, "logit_bias": {"7": 3.0}}
    got = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=0, **controls
    )
    tokens = got.choices[0].logprobs.tokens
    ids = server.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    sampled: list[int] = []
    compared = 0
    for token in tokens:
        text = server.post("/detokenize", json={"tokens": ids + sampled}).json()["prompt"]
        retokenized = server.post("/tokenize", json={"prompt": text}).json()["tokens"]
        scores = next_token_logits(server, text)
        scores[7] += 3.0
        for t in set(sampled):
            scores[t] -= 1.2 * sampled.count(t) + 0.6
        best = max(scores, key=scores.get)
        if retokenized == ids + sampled:  # next-token saw the ids the completion saw
            assert server.post("/detokenize", json={"tokens": [best]}).json()["prompt"] == token
            compared += 1
        sampled.append(server.post("/tokenize", json={"prompt": token}).json()["tokens"][0])
    assert compared >= 3, compared
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    assert plain.choices[0].text != got.choices[0].text


def test_openai_client_takes_every_new_parameter(server, client):
    common = {"model": "tiny", "prompt": "A dog", "max_tokens": 5, "seed": 4}
    extra = {"repetition_penalty": 1.3, "min_tokens": 2, "top_k": 20}
    first = client.completions.create(**common, presence_penalty=-0.5, extra_body=extra)
    again = client.completions.create(**common, presence_penalty=-0.5, extra_body=extra)
    assert first.choices[0].text == again.choices[0].text  # seeded with the controls
    streamed = client.completions.create(
        **common, presence_penalty=-0.5, extra_body=extra, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == first.choices[0].text
    best = client.completions.create(**common, n=2, best_of=4, logprobs=0)
    assert len(best.choices) == 2 and best.usage.completion_tokens >= 4
    scored = client.completions.create(
        model="tiny", prompt="A dog", max_tokens=0, echo=True, logprobs=1
    )
    assert scored.choices[0].text == "A dog" and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[0] is None
    for bad, param in (
        ({"max_tokens": 0}, "max_tokens"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"logit_bias": {"300": 1}}, "logit_bias"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
    ):
        body = {"model": "tiny", "prompt": "A dog", **bad}
        assert_error(server.post("/v1/completions", json=body), 400, param)


def test_best_of_returns_the_best_mean_logprob(server):
    body = {
        "model": "tiny",
        "prompt": "A dog",
        "max_tokens": 6,
        "seed": 9,
        "logprobs": 0,
        "logit_bias": {"0": -100},  # no end-of-text: every candidate has 6 reported tokens
    }
    candidates = server.post("/v1/completions", json={**body, "n": 4}).json()["choices"]
    means = {c["text"]: sum(c["logprobs"]["token_logprobs"]) / 6 for c in candidates}
    best = server.post("/v1/completions", json={**body, "best_of": 4}).json()["choices"]
    assert best[0]["text"] == max(means, key=means.get)


def test_mixed_concurrent_batch_gives_the_others_their_lone_answers(server):
    plain = [
        {"model": "tiny", "prompt": p, "max_tokens": 10, "temperature": t, "seed": s}
        for p, t, s in (("The cat", 0, 0), ("A dog", 0.8, 1), ("The dogs near", 1.0, 2))
    ]
    penalized = [
        {**b, "frequency_penalty": 2.0, "logit_bias": {"5": 5}, "repetition_penalty": 1.5}
        for b in plain
    ]
    alone = [server.post("/v1/completions", json=b).json()["choices"] for b in plain]

    async def burst():
        async with httpx.AsyncClient(base_url=str(server.base_url), timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/v1/completions", json=b) for b in penalized + plain + penalized)
            )

    responses = asyncio.run(burst())
    together = [r.json()["choices"] for r in responses[3:6]]
    assert together == alone


def test_chat_completions_through_the_template(server, client):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "The cat"}]},
    ]
    chat = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0
    )
    prompt = "system: Be brief.\nuser: The cat\nassistant:"
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == plain.choices[0].text
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])  # role in the first only
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    bad = {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}
    assert_error(server.post("/v1/chat/completions", json=bad), 400)


def write_tasks(folder) -> tuple[str, str]:
    """Two lm-eval tasks on 12 sentences of the built-in corpus: multiple choice (the sentence
    up to its main verb; the agreeing and the wrong verb form, shuffled) and generation (the
    same prefix, greedy, up to 8 tokens or a period)."""
    from attnlm.corpus import generate_sentence

    rng = random.Random(0)
    items = []
    while len(items) < ITEMS:
        s = generate_sentence(rng, 0, 2)
        choices = [s.verb, s.wrong_verb]
        label = len(items) % 2
        if label:
            choices.reverse()
        prefix = s.text[: s.verb_span[0]].rstrip()
        items.append({"prefix": prefix, "choices": choices, "label": label, "verb": s.verb})
    (folder / "items.json").write_text("\n".join(json.dumps(i) for i in items))
    data = (
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'items.json'}\n"
        "test_split: test\n"
        "doc_to_text: '{{prefix}}'\n"
    )
    (folder / "agreement.yaml").write_text(
        "task: attnlm_agreement\n" + data + "output_type: multiple_choice\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    (folder / "continue.yaml").write_text(
        "task: attnlm_continue\n" + data + "output_type: generate_until\n"
        "doc_to_target: ' {{verb}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return "attnlm_agreement", "attnlm_continue"


def test_lm_eval_local_completions_matches_its_hf_model(server, artifact, tmp_path):
    """lm-eval finds the tokenizer through /tokenizer_info and /tokenize (only base_url and
    model given), scores every choice through echo + logprobs, and gets the accuracy and the
    per-item log-likelihoods its `hf` model gets on the folder; its greedy generations (stop
    strings, max_gen_toks) are the `hf` model's too."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    task, generation = write_tasks(tmp_path)
    runs = {}
    for name, args in (
        ("local-completions", f"base_url={server.base_url}/v1/completions,model=tiny"),
        ("hf", f"pretrained={artifact},dtype=float32"),
    ):
        runs[name] = lm_eval.simple_evaluate(
            model=name,
            model_args=args,
            tasks=[task, generation],
            task_manager=TaskManager(include_path=str(tmp_path)),
            device="cpu",
            log_samples=True,
        )
    served, local = (runs[n] for n in ("local-completions", "hf"))
    assert served["results"][task]["acc,none"] == local["results"][task]["acc,none"]

    def loglikelihoods(run) -> list[list[float]]:
        samples = sorted(run["samples"][task], key=lambda s: s["doc_id"])
        return [[float(r[0][0]) for r in s["resps"]] for s in samples]

    got, want = loglikelihoods(served), loglikelihoods(local)
    assert len(got) == ITEMS and all(len(row) == 2 for row in got)
    for g, w in zip(got, want, strict=True):
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(g, w, strict=True)), (g, w)

    def generations(run) -> list[str]:
        samples = sorted(run["samples"][generation], key=lambda s: s["doc_id"])
        return [s["resps"][0][0] for s in samples]

    texts = generations(served)
    assert len(texts) == ITEMS and any(texts) and texts == generations(local)
