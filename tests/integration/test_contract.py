"""The OpenAPI contract, checked by schemathesis against the app served by Ray Serve on 127.0.0.1.

Two deployments of the tiny model: one open, one with API keys (its schema declares the bearer
scheme, so schemathesis also checks that a request without the key is a 401). Each schema gets
one `schemathesis run`: its default checks (`response_schema_conformance`, status codes,
content types, headers, 405s with `Allow`, negative data rejected, ...) over the examples,
coverage (boundary and negative cases) and fuzzing phases, seeded, a bounded number of
examples per operation (~25 s per schema on 2 cores). `positive_data_acceptance` is narrowed to
what a schema can promise (tests/integration/schemathesis_hooks.py). The CLI, not the pytest
plugin: schemathesis 4.32's lazy pytest schemas fail on pytest 9 (`Function._nodeid`).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import (
    REPO,
    build_tiny_artifact,
    local_serve,
    wait_healthy,
    with_chat_template,
)

pytest.importorskip("schemathesis")
ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
from ray import serve  # noqa: E402

KEY = "contract-test-key"
SEED = 20261201
MAX_EXAMPLES = 25  # per operation, in the fuzzing phase


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Base URLs of the open and the keyed deployment, and the artifact they serve."""
    from serving.app import AttnLMServer

    # a chat template: chat completions are fuzzed too
    artifact = with_chat_template(build_tiny_artifact(tmp_path_factory.mktemp("contract") / "tiny"))
    with local_serve() as base:
        options = {"ray_actor_options": {"num_cpus": 0}}
        open_app = AttnLMServer.options(**options).bind(str(artifact))
        serve.run(open_app, name="open", route_prefix="/")
        keyed = AttnLMServer.options(name="Keyed", **options).bind(str(artifact), api_keys=[KEY])
        serve.run(keyed, name="keyed", route_prefix="/keyed")
        with httpx.Client(base_url=base, timeout=60) as client:
            wait_healthy(client, "/health")
            wait_healthy(client, "/keyed/health")
        yield {"open": base, "keyed": f"{base}/keyed", "artifact": artifact}


def schemathesis_run(url: str, *options: str, cwd: Path) -> tuple[int, str]:
    """`schemathesis run` of the schema at `url`, from `cwd` (where it writes its cache)."""
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "NO_COLOR": "1",
    }
    command = [
        *(sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json"),
        *("--seed", str(SEED), "--max-examples", str(MAX_EXAMPLES), "--workers", "1"),
        *("--exclude-checks", "positive_data_acceptance", "--generation-database", "none"),
        *options,
    ]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("name", ["open", "keyed"])
def test_served_app_keeps_its_contract(served, name, tmp_path):
    options = ("--header", f"Authorization: Bearer {KEY}") if name == "keyed" else ()
    code, output = schemathesis_run(served[name], *options, cwd=tmp_path)
    assert code == 0, output[-6000:]
    assert "Tested: 13" in output, output[-3000:]  # every operation


def test_schema_states_what_the_server_checks(served):
    """The served schema: model-dependent bounds, documented errors, no 422, text/plain metrics."""
    spec = httpx.get(f"{served['keyed']}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    from attnlm.tokenizer import Tokenizer

    vocab = Tokenizer.from_file(served["artifact"] / "tokenizer.json").vocab_size
    assert schemas["NextTokenRequest"]["properties"]["top_k"]["maximum"] == vocab
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert prompt[2]["items"] == {"type": "integer", "minimum": 0, "maximum": vocab - 1}
    layers = schemas["AttentionRequest"]["properties"]["layers"]["anyOf"][0]["items"]
    assert (layers["minimum"], layers["maximum"]) == (0, 1)  # the 2-layer test model
    rows = schemas["AttentionRequest"]["properties"]["rows"]["anyOf"][0]["items"]
    assert (rows["minimum"], rows["maximum"]) == (-64, 63)  # positions in the 64-token context
    max_tokens = schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"][0]
    assert max_tokens["maximum"] == 64
    assert "64 tokens" in schemas["NextTokenRequest"]["properties"]["text"]["description"]
    paths = spec["paths"]
    for path in ("/v1/next-token", "/v1/attention", "/v1/probe", "/v1/completions"):
        documented = set(paths[path]["post"]["responses"])
        assert {"200", "400", "401", "404", "413", "500", "503"} <= documented, path
        assert "422" not in documented and paths[path]["post"]["security"] == [{"bearer": []}]
        assert "Retry-After" in paths[path]["post"]["responses"]["503"]["headers"]
    assert "504" in paths["/v1/completions"]["post"]["responses"]
    assert set(paths["/v1/completions"]["post"]["responses"]["200"]["content"]) == {
        "application/json",
        "text/event-stream",
    }
    assert "text/plain" in paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert "security" not in paths["/health"]["get"] and "security" not in paths["/"]["get"]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    open_spec = httpx.get(f"{served['open']}/openapi.json").json()
    assert "securitySchemes" not in open_spec["components"]
    assert "401" not in open_spec["paths"]["/v1/next-token"]["post"]["responses"]


def test_unsupported_methods_answer_405_with_allow(served):
    for method, path, allowed in (
        ("TRACE", "/", "GET"),
        ("TRACE", "/health", "GET"),
        ("TRACE", "/metrics", "GET"),
        ("DELETE", "/v1/models", "GET"),
        ("GET", "/v1/completions", "POST"),
    ):
        response = httpx.request(method, served["open"] + path)
        assert response.status_code == 405, (method, path)
        assert allowed in response.headers["allow"], (method, path)
        assert response.json()["error"]["code"] == "method_not_allowed"
