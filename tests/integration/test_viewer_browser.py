"""The attention viewer (serving/static/index.html) in headless Chromium, against a real tiny model;
with a server that needs an API key, the key form (a same-origin harness page types the key).

No Ray: a stdlib ThreadingHTTPServer serves the page at / and answers the API the page calls
(/v1/models, /v1/attention, /v1/next-token, /v1/completions) with `serving.engine.Engine` over a
tiny artifact, its requests checked by the HTTP layer's own pydantic models (serving/schemas.py).
The page runs from URL parameters (`/?text=...&layer=1&head=0`); Chromium dumps the DOM after the
scripts ran (`--dump-dom`) and takes a screenshot (`--screenshot`), see tests/integration/browser.py.
Chromium missing and not installable: the tests skip with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.integration.browser import Element, dump_dom, parse_html, require_chromium, screenshot

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "serving" / "static" / "index.html"
TEXT = "The cat that was sitting on the mat jumps."
WINDOW = (1200, 900)


# -- fixtures: a tiny artifact, its engine, a server -------------------------------------------------
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from attnlm.artifact import save_artifact
    from attnlm.config import GPTConfig
    from attnlm.corpus import generate_corpus
    from attnlm.model import GPT
    from attnlm.tokenizer import Tokenizer
    from serving.engine import Engine

    tok = Tokenizer.train(generate_corpus(2000, seed=0), vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # untrained attention is near uniform; sharpen it for a telling picture
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(12.0)
    folder = save_artifact(model, tok, tmp_path_factory.mktemp("artifact") / "tiny")
    return Engine(folder, device="cpu")


class _Api:
    """The API of serving/app.py, without Ray or FastAPI: same validation, same bodies."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.requests: list[tuple[str, Any]] = []  # (path, body) as the page sent them

    def handle(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        from pydantic import ValidationError

        from serving.engine import EngineError

        self.requests.append((path, body))
        try:
            with self.lock:
                if method == "GET" and path == "/v1/models":
                    config = self.engine.config
                    return 200, {
                        "object": "list",
                        "data": [
                            {
                                "id": self.engine.model_name,
                                "object": "model",
                                "arch": config.arch,
                                "attention": config.attention if config.has_attention else None,
                            }
                        ],
                    }
                if method == "POST" and path == "/v1/attention":
                    return 200, self.attention(body)
                if method == "POST" and path == "/v1/next-token":
                    return 200, self.next_token(body)
                if method == "POST" and path == "/v1/completions":
                    return 200, self.completions(body)
                if method == "POST" and path == "/v1/probe":
                    return 200, self.probe(body)
            return 404, _error(f"no route {method} {path}", code="not_found")
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            return 400, _error(f"{param}: {first['msg']}", param=param, code=first["type"])
        except EngineError as err:
            return err.status, _error(str(err), param=err.param, code=err.code)

    def _check_model(self, name: str | None) -> None:
        from serving.engine import EngineError

        if name is not None and name != self.engine.model_name:
            raise EngineError(f"the model {name!r} does not exist", param="model", status=404)

    def attention(self, body: Any) -> dict:
        from serving.api_params import attention_options as _attention_options
        from serving.schemas import AttentionRequest

        req = AttentionRequest.model_validate(body)
        self._check_model(req.model)
        options = _attention_options(req)
        (result,) = self.engine.attention([req.text], [options])
        return {"model": self.engine.model_name, **result.body()}

    def next_token(self, body: Any) -> dict:
        from serving.schemas import NextTokenRequest

        req = NextTokenRequest.model_validate(body)
        self._check_model(req.model)
        (nt,) = self.engine.next_token([req.text], req.top_k)
        return {
            "model": self.engine.model_name,
            "tokens": nt.tokens,
            "token_ids": nt.token_ids,
            "top": nt.top,
        }

    def probe(self, body: Any) -> dict:
        from serving.schemas import ProbeRequest

        req = ProbeRequest.model_validate(body)
        self._check_model(req.model)
        result = self.engine.probe(req.text, req.subject, req.verb)
        return {"model": self.engine.model_name, **dataclasses.asdict(result)}

    def completions(self, body: Any) -> dict:
        from serving.api_params import completion_params as _completion_params
        from serving.schemas import CompletionRequest

        req = CompletionRequest.model_validate(body)
        self._check_model(req.model)
        assert isinstance(req.prompt, str) and not req.stream, (
            "the page sends one prompt, no stream"
        )
        result = self.engine.complete(req.prompt, _completion_params(req))
        choices = []
        for c in result.choices:
            entry = {
                "text": c.text,
                "index": c.index,
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
            }
            if c.attention is not None:
                entry["attention"], entry["tokens"] = c.attention, c.tokens
            choices.append(entry)
        return {
            "id": "cmpl-test",
            "object": "text_completion",
            "created": 0,
            "model": self.engine.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
        }


def _error(message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


@pytest.fixture(scope="module")
def server(engine) -> Iterator[tuple[str, _Api]]:
    yield from _serve(engine)


@pytest.fixture(scope="module")
def lstm_server(tmp_path_factory) -> Iterator[tuple[str, _Api]]:
    from serving.engine import Engine
    from tests.integration.helpers import build_tiny_artifact

    folder = build_tiny_artifact(
        tmp_path_factory.mktemp("lstm") / "tiny-lstm", arch="lstm", n_head=1
    )
    yield from _serve(Engine(folder, device="cpu"))


KEY = "sk-browser-key"
# A same-origin page that opens the viewer in a frame, gives the key when the viewer asks for it
# (as a person would: type it, press the button) and writes what happened into its own DOM.
KEY_HARNESS = (
    """<!doctype html><html><body><pre id="out">waiting</pre>
<iframe id="viewer" src="/?text=The+cat+sat." width="1000" height="700"></iframe>
<script>
const frame = document.getElementById("viewer"), out = document.getElementById("out");
const asked = [];
function tick() {
  const d = frame.contentDocument, form = d && d.getElementById("key-form");
  if (form && !form.hidden) {
    const key = asked.length ? "__KEY__" : "sk-wrong";     // a wrong key first, then the right one
    asked.push(d.getElementById("key-why").textContent);
    d.getElementById("api-key").value = key;
    d.getElementById("key-submit").click();
  }
  const status = d && d.getElementById("status");
  if (status && status.textContent.trim() === "ready") {
    out.textContent = JSON.stringify({asked, formHidden: form.hidden,
                                      stored: sessionStorage.getItem("attnlm-api-key")});
    return;
  }
  setTimeout(tick, 50);
}
frame.addEventListener("load", tick);
</script></body></html>"""
).replace("__KEY__", KEY)


def _serve(
    engine, key: str | None = None, pages: dict[str, str] | None = None
) -> Iterator[tuple[str, _Api]]:
    """The page and the API; with `key`, the API answers 401 without `Authorization: Bearer key`
    (as serving/auth.py), and /key-harness drives the viewer's key form. `pages`: more pages by
    path; a page that loads /hold keeps its load event (and Chromium's --dump-dom without a
    virtual-time budget) waiting until it POSTs its results to /done (`api.results`)."""
    api = _Api(engine)
    api.authorizations = []  # the Authorization header of every API request
    api.results = None
    done = threading.Event()
    pages = {"/key-harness": KEY_HARNESS, **(pages or {})}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, status: int, payload: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _json(self, status: int, data: Any) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _unauthorized(self) -> bool:
            api.authorizations.append(self.headers.get("Authorization"))
            if key is None or self.headers.get("Authorization") == f"Bearer {key}":
                return False
            self._json(401, _error("incorrect API key provided", code="invalid_api_key"))
            return True

        def do_GET(self) -> None:
            path = urllib.parse.urlsplit(self.path).path
            if path == "/":
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif path in pages:
                self._send(200, pages[path].encode(), "text/html; charset=utf-8")
            elif path == "/hold":
                done.wait(timeout=120)
                self._send(200, b"", "text/plain")
            elif not self._unauthorized():
                self._json(*api.handle("GET", path, None))

        def do_POST(self) -> None:
            if self._unauthorized():
                return
            length = int(self.headers.get("Content-Length") or 0)
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except json.JSONDecodeError:
                self._json(400, _error("request body is not valid JSON", code="invalid_json"))
                return
            if urllib.parse.urlsplit(self.path).path == "/done":
                api.results = body
                done.set()
                self._json(200, {})
                return
            self._json(*api.handle("POST", urllib.parse.urlsplit(self.path).path, body))

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", api
    finally:
        done.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def keyed_server(engine) -> Iterator[tuple[str, _Api]]:
    yield from _serve(engine, key=KEY)


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium()


# -- helpers -------------------------------------------------------------------------------------------
def _url(base: str, **params: Any) -> str:
    return f"{base}/?{urllib.parse.urlencode(params)}"


def _visible(token: str) -> str:
    """The page's chip label: spaces as "·", newlines "⏎", tabs "⇥"."""
    return token.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥").replace("\r", "␍")


def _chip_label(chip: Element) -> str:
    """A chip's token text without its weight caption (span.w)."""
    return "".join(
        c if isinstance(c, str) else c.text
        for c in chip.children
        if isinstance(c, str) or "w" not in c.classes
    )


def _ready(dom: Element) -> Element:
    status = dom.by_id("status")
    error = dom.by_id("error")
    assert error is not None and "hidden" in error.attrs, f"error box shown: {error.text!r}"
    assert status is not None and status.text.strip() == "ready", (
        f"status is {status.text if status else None!r}"
    )
    return status


def _read_png(path: Path) -> np.ndarray:
    from matplotlib.image import imread

    img = imread(str(path))  # float32 in [0, 1], (H, W, 3 or 4)
    return img[..., :3]


# -- tests ---------------------------------------------------------------------------------------------
def test_analyze_renders_tokens_heatmap_and_next_tokens(chromium, server, engine, tmp_path):
    base, api = server
    api.requests.clear()
    url = _url(base, text=TEXT, layer=1, head=0, pin=5)
    dom = parse_html(dump_dom(chromium, url, size=WINDOW))

    status = _ready(dom)
    ids = engine.encode(TEXT)
    tokens = engine.tokenizer.token_strings(ids)
    assert status.attrs["data-layers"] == "2"
    assert status.attrs["data-heads"] == "2"
    assert status.attrs["data-tokens"] == str(len(ids))
    assert status.attrs["data-mode"] == "analyze"

    chips = dom.by_id("tokens").by_class("token")
    assert [_chip_label(c) for c in chips] == [_visible(t) for t in tokens]
    assert any("·" in _chip_label(c) for c in chips), "spaces are shown visibly"

    heatmap = dom.by_id("heatmap")
    assert heatmap.tag == "canvas"
    assert (heatmap.attrs["data-layer"], heatmap.attrs["data-head"]) == ("1", "0")
    assert "layer 1 · head 0" in heatmap.attrs["aria-label"]
    # Selectors: 2 layers; 2 heads plus "mean" and "rollout".
    layer_options = [e.attrs["value"] for e in dom.by_id("layer").iter() if e.tag == "option"]
    assert layer_options == ["0", "1"]
    head_options = [e.attrs["value"] for e in dom.by_id("head").iter() if e.tag == "option"]
    assert head_options == ["0", "1", "mean", "rollout"]
    thumbs = dom.by_class("thumb")
    assert len(thumbs) == 4 and sum("selected" in t.classes for t in thumbs) == 1

    # The pinned token's chips show the weights it gives each earlier token: the float16 base64
    # decode in the page agrees with the engine's map (layer 1, head 0, row 5).
    (expected,) = engine.attention([TEXT])  # json encoding: float32 values, 4 decimals
    want = np.array(expected.attention["data"])[1, 0, 5]
    captions = [next((e.text for e in c.iter() if "w" in e.classes), None) for c in chips]
    assert all(captions[j] is not None for j in range(6)) and all(c is None for c in captions[6:])
    for j in range(6):
        assert abs(float(captions[j]) - float(want[j])) <= 0.006, (j, captions[j], want[j])
    assert abs(sum(float(want[j]) for j in range(6)) - 1) < 0.01

    nexts = dom.by_id("next-tokens").by_class("next-token")
    assert len(nexts) == 10
    (nt,) = engine.next_token([TEXT], top_k=10)
    assert [int(n.attrs["data-token-id"]) for n in nexts] == [t["token_id"] for t in nt.top]
    for n, t in zip(nexts, nt.top, strict=True):
        assert abs(float(n.attrs["data-prob"]) - t["prob"]) < 1e-6
        label = next(e for e in n.iter() if "nt" in e.classes).text
        assert label.startswith(_visible(t["token"]))

    # What the page asked for.
    sent = {path: body for path, body in api.requests}
    # every head pooled to <= 64 x 64: for this short text, the maps themselves (one request)
    assert sent["/v1/attention"] == {
        "text": TEXT, "aggregation": "none", "encoding": "base64", "pool": 64
    }  # fmt: skip
    assert [path for path, _ in api.requests].count("/v1/attention") == 1
    assert sent["/v1/next-token"] == {"text": TEXT, "top_k": 10}

    # The screenshot: the heatmap region is drawn (many colours, not the blank background).
    png = screenshot(chromium, url, tmp_path / "viewer.png", size=WINDOW)
    img = _read_png(png)
    assert img.shape[:2] == (WINDOW[1], WINDOW[0])
    x, y, w, h = (int(v) for v in heatmap.attrs["data-rect"].split(","))
    assert w > 100 and h > 100 and y + h // 2 < WINDOW[1], f"heatmap at {x, y, w, h} is off-screen"
    region = img[y : min(y + h, WINDOW[1]), x : x + w]
    colours = {tuple(c) for c in (region * 31).round().astype(np.int32).reshape(-1, 3)}
    drawn = ((1 - region).max(axis=-1) > 0.03).mean()  # not the white background
    blue = (region[..., 2] - region[..., 0] > 0.15).mean()  # cells of the colour scale
    assert len(colours) >= 12, f"heatmap region has {len(colours)} colours"
    assert drawn > 0.3, f"only {drawn:.0%} of the heatmap region is drawn"
    assert blue > 0.05, f"only {blue:.0%} of the heatmap region is coloured by weight"


def test_complete_shows_prompt_and_completion(chromium, server, engine):
    base, api = server
    api.requests.clear()
    prompt = "The cat"
    url = _url(
        base, text=prompt, action="complete", max_tokens=6, temperature=0, layer=0, head="mean"
    )
    dom = parse_html(dump_dom(chromium, url, size=WINDOW))

    status = _ready(dom)
    assert status.attrs["data-mode"] == "complete"
    sent = [body for path, body in api.requests if path == "/v1/completions"]
    assert sent == [
        {
            "model": engine.model_name,
            "prompt": prompt,
            "max_tokens": 6,
            "temperature": 0,
            "return_attention": {"aggregation": "none", "encoding": "base64", "pool": 64},
        }
    ]

    from serving.engine import AttentionOptions, CompletionParams

    result = engine.complete(
        prompt, CompletionParams(max_tokens=6, temperature=0, attention=AttentionOptions())
    )
    choice = result.choices[0]
    chips = dom.by_id("tokens").by_class("token")
    assert [_chip_label(c) for c in chips] == [_visible(t) for t in choice.tokens]
    n_prompt = result.prompt_tokens
    assert status.attrs["data-tokens"] == str(len(choice.tokens))
    assert status.attrs["data-prompt-tokens"] == str(n_prompt)
    assert all("prompt" in c.classes for c in chips[:n_prompt])
    assert all("completion" in c.classes for c in chips[n_prompt:])
    assert len(chips) > n_prompt
    shown = dom.by_id("completion")
    assert "hidden" not in shown.attrs
    assert shown.text == prompt + choice.text
    marks = [e for e in shown.iter() if e.tag == "mark"]
    assert len(marks) == 1 and marks[0].text == choice.text
    heatmap = dom.by_id("heatmap")
    assert (heatmap.attrs["data-layer"], heatmap.attrs["data-head"]) == ("0", "mean")


def test_api_error_is_shown(chromium, server):
    base, _ = server
    too_long = " ".join(["the cat sits on the mat."] * 40)  # far over the 64-token context
    dom = parse_html(dump_dom(chromium, _url(base, text=too_long), size=WINDOW))
    error = dom.by_id("error")
    assert "hidden" not in error.attrs
    assert "context window is 64 tokens" in error.text
    assert dom.by_id("status").text.strip() == "error"
    assert dom.by_id("tokens").by_class("token") == []


SENTENCE = "The cats near the dog sleep."


def test_probe_highlights_subject_verb_and_the_subject_finding_head(chromium, server, engine):
    base, _ = server
    dom = parse_html(dump_dom(chromium, _url(base, text=SENTENCE), size=WINDOW))
    _ready(dom)
    result = engine.probe(SENTENCE)
    box = dom.by_id("probe")
    best = result.best_head
    assert (box.attrs["data-best-layer"], box.attrs["data-best-head"]) == (
        str(best["layer"]), str(best["head"]),
    )  # fmt: skip
    assert box.attrs["data-verdict"] == result.agreement["verdict"]
    assert "cats" in box.text and "sleep" in box.text and dom.by_id("probe-show") is not None
    chips = dom.by_id("tokens").by_class("token")
    subject = [i for i, c in enumerate(chips) if "subject" in c.classes]
    verb = [i for i, c in enumerate(chips) if "verb" in c.classes]
    assert subject == result.subject["token_positions"] and verb == [result.verb["token_position"]]
    # with no layer/head in the URL the page shows the best head, the verb-predicting row pinned
    heatmap = dom.by_id("heatmap")
    assert (heatmap.attrs["data-layer"], heatmap.attrs["data-head"]) == (
        str(best["layer"]), str(best["head"]),
    )  # fmt: skip
    pinned = [i for i, c in enumerate(chips) if "pinned" in c.classes]
    assert pinned == [result.verb["token_position"] - 1]
    marked = [t for t in dom.by_class("thumb") if "best" in t.classes]
    assert [(t.attrs["data-layer"], t.attrs["data-head"]) for t in marked] == [
        (str(best["layer"]), str(best["head"]))
    ]


def test_lstm_model_shows_tokens_predictions_and_probe_without_a_map(chromium, lstm_server):
    base, api = lstm_server
    api.requests.clear()
    dom = parse_html(dump_dom(chromium, _url(base, text=SENTENCE), size=WINDOW))
    _ready(dom)
    assert "/v1/attention" not in [path for path, _ in api.requests]
    assert "has no attention" in dom.by_id("map-empty").text
    assert len(dom.by_id("next-tokens").by_class("next-token")) == 10
    chips = dom.by_id("tokens").by_class("token")
    assert "".join(_chip_label(c) for c in chips) == _visible(SENTENCE)
    assert any("subject" in c.classes for c in chips)
    box = dom.by_id("probe")
    assert box.attrs["data-verdict"] in ("correct", "wrong") and "data-best-layer" not in box.attrs
    assert dom.by_class("thumb") == []


def test_a_server_that_needs_a_key_gets_the_key_form(chromium, keyed_server):
    base, _ = keyed_server
    dom = parse_html(dump_dom(chromium, _url(base, text=TEXT), size=WINDOW))
    form = dom.by_id("key-form")
    assert "hidden" not in form.attrs  # asked for, nothing analyzed without it
    assert "needs an API key" in dom.by_id("key-why").text
    assert dom.by_id("status").text.strip() != "ready"


def test_the_key_given_is_sent_kept_for_the_tab_and_asked_again_when_wrong(chromium, keyed_server):
    base, api = keyed_server
    api.authorizations.clear()
    dom = parse_html(dump_dom(chromium, f"{base}/key-harness", size=WINDOW, budget_ms=15000))
    result = json.loads(dom.by_id("out").text)
    assert result["formHidden"] and result["stored"] == KEY  # sessionStorage: this tab only
    first, second = result["asked"]
    assert "needs an API key" in first and "not accepted" in second  # a wrong key: asked again
    sent = set(api.authorizations)
    assert f"Bearer {KEY}" in sent and "Bearer sk-wrong" in sent and None in sent
    assert api.authorizations[-1] == f"Bearer {KEY}"
