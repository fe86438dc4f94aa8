"""Soak test of the served app: N clients for M minutes over every endpoint, statuses, latency and
the replica's memory; optionally one replica SIGKILLed mid-run. Not part of the test suite.

    .venv/bin/python bench/soak.py                          # 32 clients, 10 minutes
    .venv/bin/python bench/soak.py --clients 16 --minutes 2 --json runs/soak.json
    .venv/bin/python bench/soak.py --kill                   # one SIGKILL of the replica at half time
    .venv/bin/python bench/soak.py --shipped                # compiled decode step, dtype auto

It deploys `serving.app.AttnLMServer` (one replica, num_cpus 1, the default user_config; eager
fp32 decode, or with --shipped the compiled step and `dtype: auto` of configs/serve.yaml) with Ray
Serve on 127.0.0.1, with serving/proxy.py's middleware in Ray's proxy, over an untrained model of
the tiny shape (4 layers, 128 wide, context 64; `--artifact` serves another). Each client loops,
one request at a time (bounded: a 60 s timeout each, stopped at the deadline), over a fixed mix:
next-token 30 %, attention 15 %, probe 10 %, completions 20 %, streamed completions 10 %, token-id
prompts 5 %, GET /v1/models, /health and /metrics 5 %, and bad requests 5 % (an empty text, a
lone surrogate, a layer the model lacks, a wrong model name: each must be a 4xx). Statuses other
than 2xx / 4xx / 503, and transport errors, are failures.

Reported: requests, statuses per endpoint, p50 / p99 latency per endpoint, requests/s, and the
replica's RSS (/proc/PID/status VmRSS, sampled every 5 s) at start, at minute 2
(`--rss-from-minute`) and at the end; with --kill, of the replica that replaced the killed one.
Targets: no failure without a kill; RSS growth from minute 2 to the end <= 5 %. With --kill: the
time from the kill to the first 2xx answer of a request sent after it, and what the requests in
flight got.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

APP = "soak"
TEXT = "The cats that were sitting on the mat near the dog are hungry."
PROBE = "The cat that was sitting on the mat which was next to the dogs jump."
RSS_EVERY_S = 5.0
REQUEST_TIMEOUT_S = 60.0


@dataclass
class Result:
    endpoint: str
    start: float  # time.monotonic()
    end: float
    status: int | str  # an HTTP status, or the name of a transport error


def mix(model: str, ids: list[int]) -> list[tuple[float, str, str, str, dict | None]]:
    """(weight, name, method, path, body) of the requests clients choose from."""
    completion = {"model": model, "prompt": "The cat", "max_tokens": 24, "temperature": 1.0}
    return [
        (30, "next-token", "POST", "/v1/next-token", {"text": TEXT, "top_k": 5}),
        (15, "attention", "POST", "/v1/attention", {"text": TEXT, "encoding": "base64"}),
        (10, "probe", "POST", "/v1/probe", {"text": PROBE}),
        (20, "completions", "POST", "/v1/completions", completion),
        (10, "stream", "POST", "/v1/completions", {**completion, "stream": True}),
        (5, "token-ids", "POST", "/v1/completions", {**completion, "prompt": ids}),
        (2, "models", "GET", "/v1/models", None),
        (2, "health", "GET", "/health", None),
        (1, "metrics", "GET", "/metrics", None),
        (2, "bad", "POST", "/v1/next-token", {"text": ""}),
        (1, "bad", "POST", "/v1/attention", {"text": "The cat", "layers": [99]}),
        (1, "bad", "POST", "/v1/probe", {"text": "ab\ud800cd"}),
        (1, "bad", "POST", "/v1/completions", {**completion, "model": "gpt-4"}),
    ]


def ok(status: int | str, endpoint: str) -> bool:
    """What the targets allow: 2xx, 503 (shed load or a lost replica, whatever was asked), 4xx;
    a bad request must never get a 2xx."""
    if not isinstance(status, int):
        return False
    if status == 503:
        return True
    if endpoint == "bad":
        return 400 <= status < 500
    return 200 <= status < 300 or 400 <= status < 500


async def client(base, choices, weights, rng, until, results) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_TIMEOUT_S) as http:
        while time.monotonic() < until:
            _, name, method, path, body = rng.choices(choices, weights)[0]
            start = time.monotonic()
            try:
                if body is not None and body.get("stream"):
                    async with http.stream(method, path, json=body) as response:
                        async for _ in response.aiter_lines():
                            pass
                        status = response.status_code
                else:
                    content = None if body is None else json.dumps(body)  # keeps "\ud800" escaped
                    headers = {"content-type": "application/json"} if body is not None else {}
                    response = await http.request(method, path, content=content, headers=headers)
                    status = response.status_code
            except httpx.HTTPError as err:
                status = type(err).__name__
            results.append(Result(name, start, time.monotonic(), status))


def replica_pid() -> int | None:
    """The soak replica's process id (its title is ray::ServeReplica:soak:...), or None."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith(f"ray::ServeReplica:{APP}:"):
            return int(proc.name)
    return None


def rss_mib(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_rss(t0: float, until: float, samples: list) -> None:
    while time.monotonic() < until:
        pid = replica_pid()
        samples.append((time.monotonic() - t0, pid, rss_mib(pid)))
        await asyncio.sleep(RSS_EVERY_S)
    pid = replica_pid()
    samples.append((time.monotonic() - t0, pid, rss_mib(pid)))


async def kill_once(at: float, killed: list) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    pid = replica_pid()
    if pid is not None:
        killed.append(time.monotonic())
        os.kill(pid, signal.SIGKILL)
        print(f"  killed the replica (pid {pid})", flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(
    results: list[Result], t0: float, seconds: float, rss: list, killed: list, rss_from_s: float
) -> dict:
    by_endpoint: dict = {}
    for name in sorted({r.endpoint for r in results}):
        mine = [r for r in results if r.endpoint == name]
        lat = [r.end - r.start for r in mine]
        by_endpoint[name] = {
            "requests": len(mine),
            "statuses": dict(collections.Counter(str(r.status) for r in mine)),
            "p50_ms": round(1e3 * statistics.median(lat), 1),
            "p99_ms": round(1e3 * percentile(lat, 0.99), 1),
        }
    failures = [r for r in results if not ok(r.status, r.endpoint)]
    out = {
        "requests": len(results),
        "requests_per_s": round(len(results) / seconds, 1),
        "statuses": dict(collections.Counter(str(r.status) for r in results)),
        "failures": len(failures),
        "failure_statuses": dict(collections.Counter(str(r.status) for r in failures)),
        "endpoints": by_endpoint,
    }
    alive = [(t, pid, m) for t, pid, m in rss if m is not None]
    if alive:
        last_pid = alive[-1][1]
        same = [(t, m) for t, pid, m in alive if pid == last_pid]  # the replica alive at the end
        at, base = next(((t, m) for t, m in same if t >= rss_from_s), same[0])
        out["rss_mib"] = {
            "start": round(alive[0][2], 1),
            "from_s": round(at, 1),  # the sample growth is measured from
            "from": round(base, 1),
            "end": round(same[-1][1], 1),
            "growth_pct": round(100 * (same[-1][1] - base) / base, 2),
            "samples": [(round(t, 1), round(m, 1)) for t, _, m in alive],
        }
    if killed:
        k = killed[0]
        after = [r for r in results if r.start > k and isinstance(r.status, int)]
        first_ok = min((r.end for r in after if 200 <= r.status < 300), default=None)
        in_flight = [r for r in results if r.start <= k < r.end]
        out["kill"] = {
            "at_s": round(k - t0, 1),
            "recovery_s": None if first_ok is None else round(first_ok - k, 2),
            "in_flight": len(in_flight),
            "in_flight_statuses": dict(collections.Counter(str(r.status) for r in in_flight)),
            "statuses_until_recovered": dict(
                collections.Counter(
                    str(r.status)
                    for r in results
                    if r.end >= k and (first_ok is None or r.start <= first_ok)
                )
            ),
        }
    return out


def build_artifact(out: Path) -> Path:
    import torch

    from attnlm.artifact import save_artifact
    from attnlm.config import GPTConfig
    from attnlm.corpus import generate_corpus
    from attnlm.model import GPT
    from attnlm.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(generate_corpus(5000), vocab_size=2048)
    torch.manual_seed(0)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=64, n_layer=4, n_head=4, n_embd=128
    )
    return save_artifact(GPT(config), tokenizer, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--kill", action="store_true", help="SIGKILL the replica once at half time")
    parser.add_argument(
        "--artifact", type=Path, help="an exported folder (default: untrained tiny)"
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--shipped",
        action="store_true",
        help="serve as configs/serve.yaml ships (compiled decode step, dtype auto); default eager fp32",
    )
    parser.add_argument(
        "--rss-from-minute", type=float, default=2.0, help="RSS growth is measured from here"
    )
    args = parser.parse_args(argv)

    import httpx
    from ray import serve

    from bench.serve_load import local_serve
    from serving.app import AttnLMServer

    workdir = Path(tempfile.mkdtemp(prefix="soak"))
    artifact = args.artifact or build_artifact(workdir / "tiny")
    # the proxy imports serving.proxy: the repository on the path of every Ray process
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "serving.proxy:middlewares"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with local_serve(str(workdir / "ray")) as base:
        shipped = {"compile": True, "dtype": "auto"} if args.shipped else {}
        app = AttnLMServer.options(name="Soak", ray_actor_options={"num_cpus": 1}).bind(
            str(artifact), **shipped
        )
        serve.run(app, name=APP, route_prefix="/")
        with httpx.Client(base_url=base, timeout=60) as http:
            model = http.get("/v1/models").json()["data"][0]["id"]
            ids = http.post("/v1/next-token", json={"text": "The cat sat"}).json()["token_ids"]
        choices = mix(model, ids)
        weights = [c[0] for c in choices]
        seconds = 60 * args.minutes
        print(
            f"soak: {args.clients} clients, {args.minutes:g} min, kill={args.kill}, "
            f"shipped={args.shipped}",
            flush=True,
        )

        async def run() -> tuple[list[Result], float, list, list]:
            results: list[Result] = []
            rss: list = []
            killed: list = []
            t0 = time.monotonic()
            until = t0 + seconds
            tasks = [
                client(base, choices, weights, random.Random(args.seed + i), until, results)
                for i in range(args.clients)
            ]
            tasks.append(sample_rss(t0, until, rss))
            if args.kill:
                tasks.append(kill_once(t0 + seconds / 2, killed))
            await asyncio.gather(*tasks)
            return results, t0, rss, killed

        results, t0, rss, killed = asyncio.run(run())
    report = summarize(results, t0, seconds, rss, killed, 60 * args.rss_from_minute)
    report["config"] = {
        "clients": args.clients,
        "minutes": args.minutes,
        "kill": args.kill,
        "shipped": args.shipped,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mib"}, indent=2))
    if "rss_mib" in report:
        print("rss_mib:", {k: v for k, v in report["rss_mib"].items() if k != "samples"})
        growth, start = report["rss_mib"]["growth_pct"], report["rss_mib"]["from_s"]
        print(f"{'PASS' if growth <= 5 else 'FAIL'} RSS growth from {start} s: {growth} % (<= 5 %)")
    if not args.kill:
        print(f"{'PASS' if report['failures'] == 0 else 'FAIL'} failures: {report['failures']} (0)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
