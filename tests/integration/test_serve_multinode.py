"""Ray Serve across two Ray nodes on one machine: `serve deploy` of configs/serve.yaml with 2 replicas.

A child process (this module run with `python -m`) starts a `ray.cluster_utils.Cluster` of two
nodes with 1 CPU each, all on 127.0.0.1, and deploys the app exactly as on a real cluster:
`serve deploy` of configs/serve.yaml (import_path `serving.app:build_app`) through the head
node's dashboard, with `num_replicas: 2`. A replica takes 1 CPU, so the two land on different
nodes. `RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0` makes the proxy spread requests over both
replicas instead of preferring the one on its own node; `GET /health` names the replica and its
node. Ray runs in the child only, so this pytest process (and test_serve.py's in-process Ray)
never sees it; the child shuts Serve, Ray and the cluster down, and on a timeout its whole
process group is killed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.helpers import REPO, build_tiny_artifact, clean_env, run_bounded

TIMEOUT_S = 180
HEALTH_REQUESTS = 40  # sequential GET /health once both replicas are up
RESULT_PREFIX = "RESULT "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the child process ------------------------------------------------------------------------------
def serve_config(artifact: Path, port: int) -> dict:
    """configs/serve.yaml with the test's artifact, port and 2 replicas, decoding eager. One HTTP
    proxy, on the head node: the nodes share one machine, so their proxies would compete for the
    one port. (Compiling the decode step takes each replica 20-60 s on 2 cores; placement is
    what this test is about.)"""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = port
    config["proxy_location"] = "HeadOnly"
    (app,) = config["applications"]
    app["args"]["artifact"] = str(artifact)
    app["args"]["compile"] = False
    (deployment,) = app["deployments"]
    deployment["num_replicas"] = 2
    return config


def serve_on_two_nodes(artifact: Path, workdir: Path) -> dict:
    """Start the cluster, `serve deploy`, query it, shut it all down; return what was seen."""
    import httpx
    import ray
    import yaml
    from ray import serve
    from ray.cluster_utils import Cluster

    t0 = time.perf_counter()
    dashboard_port, http_port = free_port(), free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": dashboard_port},
    )
    result: dict = {}
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        result["cluster_s"] = time.perf_counter() - t0
        config_path = workdir / "serve.yaml"
        config_path.write_text(yaml.safe_dump(serve_config(artifact, http_port)))
        serve_cli = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
        deploy = [serve_cli, "deploy", str(config_path)]
        deploy += ["--address", f"http://127.0.0.1:{dashboard_port}"]
        subprocess.run(deploy, check=True, timeout=60)
        seen: dict[str, str] = {}  # replica -> node id
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as client:
            for _ in range(240):  # up to ~60 s for both replicas to load the model
                try:
                    response = client.get("/health")
                    if response.status_code == 200:
                        body = response.json()
                        seen[body["replica"]] = body["node_id"]
                        if len(seen) == 2:
                            break
                except httpx.TransportError:
                    pass
                time.sleep(0.25)
            result["ready_s"] = time.perf_counter() - t0
            counts = Counter()
            for _ in range(HEALTH_REQUESTS):
                body = client.get("/health").json()
                seen[body["replica"]] = body["node_id"]
                counts[body["replica"]] += 1
            completion = client.post(
                "/v1/completions", json={"model": "tiny", "prompt": "The cat", "max_tokens": 4}
            )
        ray.init(address=cluster.address, log_to_driver=False)
        status = serve.status().applications["attnlm"]
        result.update(
            replicas=seen,
            counts=dict(counts),
            completion_status=completion.status_code,
            completion=completion.json(),
            nodes=sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
            node_ips=sorted({n["NodeManagerAddress"] for n in ray.nodes()}),
            app_status=str(status.status),
        )
        serve.shutdown()
        ray.shutdown()
    finally:
        cluster.shutdown()
    result["total_s"] = time.perf_counter() - t0
    return result


# -- the test -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_node_serve(tmp_path_factory) -> dict:
    pytest.importorskip("ray")
    workdir = tmp_path_factory.mktemp("serve_two_nodes")
    artifact = build_tiny_artifact(workdir / "tiny")
    env = clean_env()
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every node on 127.0.0.1
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=tempfile.mkdtemp(prefix="ray", dir="/tmp"),  # unix socket paths are short
        RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING="0",
    )
    command = [sys.executable, "-m", "tests.integration.test_serve_multinode", str(artifact)]
    try:
        code, output = run_bounded([*command, str(workdir)], env, TIMEOUT_S)
    finally:
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert code == 0, output[-4000:]
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    assert len(lines) == 1, output[-4000:]
    result = json.loads(lines[0].removeprefix(RESULT_PREFIX))
    print(
        f"2-node cluster up {result['cluster_s']:.1f}s, both replicas healthy "
        f"{result['ready_s']:.1f}s, all done {result['total_s']:.1f}s; "
        f"{HEALTH_REQUESTS} requests per replica: {result['counts']}"
    )
    return result


def test_two_replicas_run_on_two_nodes(two_node_serve):
    assert two_node_serve["app_status"].endswith("RUNNING")
    assert len(two_node_serve["nodes"]) == 2
    assert two_node_serve["node_ips"] == ["127.0.0.1"]  # nothing bound beyond the loopback
    replicas = two_node_serve["replicas"]
    assert len(replicas) == 2
    assert sorted(replicas.values()) == two_node_serve["nodes"]  # one replica per node


def test_requests_are_served_by_both_replicas(two_node_serve):
    counts = two_node_serve["counts"]
    assert sum(counts.values()) == HEALTH_REQUESTS
    assert set(counts) == set(two_node_serve["replicas"]) and min(counts.values()) >= 1
    assert two_node_serve["completion_status"] == 200
    (choice,) = two_node_serve["completion"]["choices"]
    assert choice["text"] and two_node_serve["completion"]["usage"]["completion_tokens"] >= 1


if __name__ == "__main__":
    outcome = serve_on_two_nodes(Path(sys.argv[1]), Path(sys.argv[2]))
    print(RESULT_PREFIX + json.dumps(outcome), flush=True)
